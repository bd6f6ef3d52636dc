"""Planning layer (stdlib only): chunk construction (Algorithm 1), schedules (Algorithm 2) for one
device and for pipelines (state-aware 1F1B), data-parallel sharding, memory estimates."""

from chunkflow.plan.balance import (
    Sharding,
    balance_chunks,
    chunk_train_flops,
    subplan,
    unit_costs,
)
from chunkflow.plan.chunks import Chain, Chunk, ChunkPlan, Segment, build_chunks
from chunkflow.plan.pipeline import (
    format_pipeline,
    one_f_one_b,
    parse_pipeline,
    state_aware_1f1b,
    validate_pipeline,
)
from chunkflow.plan.scheduling import (
    Action,
    ActionKind,
    ScheduleError,
    format_schedule,
    forward_only,
    parse_schedule,
    schedule,
    validate_schedule,
)

__all__ = [
    "Action", "ActionKind", "Chain", "Chunk", "ChunkPlan", "ScheduleError", "Segment", "Sharding",
    "balance_chunks", "build_chunks", "chunk_train_flops", "format_pipeline", "format_schedule",
    "forward_only", "one_f_one_b", "parse_pipeline", "parse_schedule", "schedule",
    "state_aware_1f1b", "subplan", "unit_costs", "validate_pipeline", "validate_schedule",
]
