"""Distributed training on torch.distributed: data parallel (DDP, FSDP2), tensor parallel (with
sequence parallelism) and state-aware pipeline parallel. The only package that imports
torch.distributed."""

from chunkflow.parallel.engine import ParallelEngine, ParallelStepResult
from chunkflow.parallel.mesh import (
    Layout,
    LocalContext,
    ParallelContext,
    init_distributed,
    is_distributed_launch,
)
from chunkflow.parallel.parallelize import Parallelized, parallelize
from chunkflow.parallel.pipeline import split_stage, stage_layer_ranges

__all__ = ["Layout", "LocalContext", "ParallelContext", "ParallelEngine", "ParallelStepResult",
           "Parallelized", "init_distributed", "is_distributed_launch",
           "parallelize", "split_stage", "stage_layer_ranges"]
