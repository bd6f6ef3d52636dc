"""chunkflow: efficient long-context fine-tuning with ChunkFlow (Yuan et al., ICML 2025).

``chunkflow.plan`` and ``chunkflow.sim`` need only the standard library, so this package imports
torch lazily: ``from chunkflow import ChunkFlowEngine`` loads the runtime on first use.
"""

__version__ = "0.1.0"
__all__ = ["ChunkFlowEngine", "ChunkingOptions", "StepResult"]


def __getattr__(name: str):
    if name in __all__:
        from chunkflow.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'chunkflow' has no attribute {name!r}")
