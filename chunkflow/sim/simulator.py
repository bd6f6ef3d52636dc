"""Execute per-stage action lists in simulated time: makespan, bubbles, busy time, memory.

``simulate(stages, duration=..., p2p=...)`` runs the very lists the runtime executes (see
:mod:`chunkflow.plan.pipeline`): each stage runs its actions in order, an action starts once the
stage is free and its cross-stage dependency has finished plus the ``p2p`` transfer time, and
lasts ``duration(stage, action)`` seconds (from a cost model, or tokens for the paper figures).

Memory per stage, when ``graph_bytes``/``state_bytes`` are given: a chunk's graph is held from its
``F``/``R`` until its ``B`` ends, or under a zero-bubble schedule its ``W`` (the input backward
``I`` keeps the graph for the weight gradients); its key/value state from its ``F``/``S`` until
its ``B`` or ``I`` ends (later chunks of the chain read it until then; a ``W`` does not); with
``kept_bytes``, what a
selective ``s`` keeps (attention outputs) from the ``s`` until its ``r``, where it becomes part
of the graph; with ``grad_bytes``, the stage's parameter gradients from the end of its first
``B`` or ``W`` on (a runtime that allocates them as its first backward produces them, as
torch's ``.grad`` is).
The peak is taken over action boundaries.

bubble ratio = 1 - (sum of busy time over stages) / (stages x makespan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from chunkflow.plan.pipeline import Stages, peak_held, run_pipeline
from chunkflow.plan.scheduling import Action


@dataclass(frozen=True)
class Event:
    stage: int
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    bubble_ratio: float
    peak_memory: list[float]
    events: list[Event] = field(repr=False)

    def summary(self) -> str:
        peak = (f", peak memory per stage {[round(m / 2**30, 2) for m in self.peak_memory]} GiB"
                if any(self.peak_memory) else "")
        return (f"makespan {self.makespan:.4g}, bubble ratio {self.bubble_ratio:.2%}, busy per "
                f"stage {[round(b, 4) for b in self.busy]}{peak}")


def simulate(stages: Stages, *, duration: Callable[[int, Action], float], p2p: float = 0,
             graph_bytes: Callable[[int, int], float] | None = None,
             state_bytes: Callable[[int, int], float] | None = None,
             kept_bytes: Callable[[int, int], float] | None = None,
             grad_bytes: Callable[[int], float] | None = None) -> SimResult:
    """Simulate ``stages``; raises ``ScheduleError`` (with the grid) if the lists deadlock."""
    times = run_pipeline(stages, duration=duration, p2p=p2p)
    events = [Event(s, a, start, end) for s, acts in enumerate(stages)
              for a, (start, end) in zip(acts, times[s])]
    makespan = max((e.end for e in events), default=0)
    busy = [sum(end - start for start, end in t) for t in times]
    bubble = 1 - sum(busy) / (len(stages) * makespan) if makespan > 0 else 0.0
    peaks = [_peak_memory(s, acts, graph_bytes, state_bytes, kept_bytes, grad_bytes)
             for s, acts in enumerate(stages)]
    return SimResult(makespan=makespan, busy=busy, bubble_ratio=bubble, peak_memory=peaks,
                     events=events)


def _peak_memory(stage: int, acts: list[Action], graph_bytes, state_bytes,
                 kept_bytes=None, grad_bytes=None) -> float:
    none = lambda c: 0.0  # noqa: E731
    return peak_held(
        acts, graph=(lambda c: graph_bytes(stage, c)) if graph_bytes else none,
        state=(lambda c: state_bytes(stage, c)) if state_bytes else none,
        kept=(lambda c: kept_bytes(stage, c)) if kept_bytes else none,
        grads=grad_bytes(stage) if grad_bytes else 0.0)


def chrome_trace(result: SimResult, *, time_unit: float = 1.0) -> dict:
    """The events as Chrome trace JSON (chrome://tracing, Perfetto): one row per stage.

    ``time_unit``: seconds per simulated time unit (1.0 when durations are in seconds)."""
    return {
        "displayTimeUnit": "ms",
        "traceEvents": [
            {"name": str(e.action), "cat": e.action.kind.name.lower(), "ph": "X", "pid": 0,
             "tid": e.stage, "ts": e.start * time_unit * 1e6,
             "dur": (e.end - e.start) * time_unit * 1e6}
            for e in result.events
        ] + [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s,
              "args": {"name": f"stage {s}"}} for s in range(len(result.busy))],
    }
