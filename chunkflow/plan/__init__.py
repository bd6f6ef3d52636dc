"""Planning layer (stdlib only): chunk construction (Algorithm 1) and schedules (Algorithm 2)."""

from chunkflow.plan.chunks import Chain, Chunk, ChunkPlan, Segment, build_chunks
from chunkflow.plan.scheduling import (
    Action,
    ActionKind,
    ScheduleError,
    format_schedule,
    parse_schedule,
    schedule,
    validate_schedule,
)

__all__ = [
    "Action", "ActionKind", "Chain", "Chunk", "ChunkPlan", "ScheduleError", "Segment",
    "build_chunks", "format_schedule", "parse_schedule", "schedule", "validate_schedule",
]
