"""Single-device runtime: chunk attention over a carried KV prefix, KV state, loss, executor."""

from chunkflow.runtime.engine import ChunkFlowEngine, StepResult
from chunkflow.runtime.options import ChunkingOptions

__all__ = ["ChunkFlowEngine", "ChunkingOptions", "StepResult"]
