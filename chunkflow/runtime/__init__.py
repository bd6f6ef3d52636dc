"""Single-device runtime: chunk attention over a carried KV prefix, KV state, loss, executor."""

from chunkflow.runtime.engine import ChunkFlowEngine, StepResult

__all__ = ["ChunkFlowEngine", "StepResult"]
