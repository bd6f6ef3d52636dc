"""State-aware zero-bubble pipeline schedules, stdlib only.

Zero-bubble pipelining (Qi et al., ICLR 2024) splits each backward in two: ``I``, the gradients
of the stage input and, for a chain's chunk, of the chain's key/value state (what the previous
stage and the chain's earlier chunks wait for), and ``W``, the parameters' gradients (what
nobody waits for). The ``W`` then fills the bubbles. A chain's chunks keep every rule of
state-aware 1F1B (:mod:`chunkflow.plan.pipeline`): forwards ascending, ``I`` descending (a
chunk's key/value gradient is complete only after every later chunk's ``I``), ``R`` right before
its ``I``, and at most ``k`` graphs per chain alive, a graph now being alive until its ``W``.

Each stage's schedule is built in two steps:

1. its *main sequence*: the state-aware 1F1B list with every ``B`` an ``I``
   (:func:`~chunkflow.plan.pipeline.state_aware_1f1b`'s order); ``zb-h2`` lets stage s run
   2(p-1-s) forwards ahead instead of p-1-s, so the first stages do not wait for the first
   backwards;
2. list scheduling in simulated time (``duration``, by default proportional to tokens with
   ``I`` and ``W`` each half of a ``B``): every stage runs its main sequence and puts each
   ``W`` off until it is idle (its next action's input has not arrived) or until memory
   requires it: before a forward or recompute that would hold more graphs than the busiest
   stage of the main sequence ever holds (the first stage's; so ``zb-h1`` keeps the peak
   in-flight activations of state-aware 1F1B, as ZB-H1 keeps 1F1B's), or more than ``k`` of
   one chain.

:func:`zero_bubble` builds a few candidates (forward orders; each stage kept in its main
sequence's order or allowed to run a ready backward or forward ahead) and keeps the fastest in
simulation within memory. The result is one static action list per stage, as 1F1B's: the
runtime executes it whatever the real timings, and the simulator prices it
(:mod:`chunkflow.sim`); the durations only decide where the ``W`` go. Neighbouring stages' lists
do not mirror each other as 1F1B's do, so the runtime sends their messages on channels of their
own (:mod:`chunkflow.parallel.pipeline`).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

from chunkflow.plan.chunks import ChunkPlan, check_positive_int
from chunkflow.plan.pipeline import (
    B,
    F,
    I,
    R,
    S,
    Stages,
    W,
    _group,
    peak_held,
    run_pipeline,
    state_aware_1f1b,
    structured_orders,
    validate_pipeline,
)
from chunkflow.plan.scheduling import Action

SCHEDULES = ("1f1b", "zb-h1", "zb-h2")
"""Pipeline schedules by name: state-aware 1F1B; zero-bubble with 1F1B's memory (``zb-h1``);
zero-bubble with about twice the in-flight activations on the first stages (``zb-h2``)."""


def check_schedule_name(name: str) -> str:
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return name


def token_duration(plan: ChunkPlan) -> Callable[[int, Action], float]:
    """Time proportional to a chunk's tokens: forward (and recompute) 1, ``B`` 2, ``I`` and
    ``W`` 1 each (the paper's figure's units)."""
    tokens = [c.num_tokens for c in plan.chunks]

    def duration(stage: int, a: Action) -> float:
        return tokens[a.chunk_id] * (2 if a.kind is B else 1)

    return duration


def pipeline_schedule(plan: ChunkPlan, num_stages: int, *, k: int, schedule: str = "1f1b",
                      order: Sequence[int] | None = None, recompute: str = "full",
                      duration: Callable[[int, Action], float] | None = None,
                      fits: Callable[[Stages], bool] | None = None) -> Stages:
    """The per-stage action lists of ``schedule`` (one of :data:`SCHEDULES`) for ``plan``.

    ``duration(stage, action)``: what the zero-bubble schedules place the ``W`` by (default
    :func:`token_duration`); the lists are valid whatever the real timings. ``order`` and
    ``recompute``: as :func:`~chunkflow.plan.pipeline.state_aware_1f1b`. ``fits(stages)``:
    whether lists fit in the device's memory (a memory model's answer), which lets ``zb-h2``
    take the faster of its candidates up to that memory instead of its own warm-up's."""
    check_schedule_name(schedule)
    if schedule == "1f1b":
        return state_aware_1f1b(plan, num_stages, k=k, order=order, recompute=recompute)
    return zero_bubble(plan, num_stages, k=k, order=order, recompute=recompute,
                       duration=duration, extra_warmup=schedule == "zb-h2",
                       fits=fits if schedule == "zb-h2" else None)


def zero_bubble(plan: ChunkPlan, num_stages: int, *, k: int, order: Sequence[int] | None = None,
                recompute: str = "full", duration: Callable[[int, Action], float] | None = None,
                extra_warmup: bool = False, fits: Callable[[Stages], bool] | None = None
                ) -> Stages:
    """State-aware zero-bubble lists (module docstring): ``extra_warmup=False`` is ``zb-h1``,
    True ``zb-h2``. The candidates: forward orders (:func:`~chunkflow.plan.pipeline.
    structured_orders`, unless ``order`` is given) and each stage in or out of its main
    sequence's order; the fastest in simulation wins among those within memory: ``fits`` if
    given, else the memory of the first candidate or of its main sequence run as 1F1B (``B``
    for ``I``), whichever is more, counted in tokens of graphs and key/value state on the
    busiest stage (so ``zb-h1`` stays memory-neutral)."""
    p = check_positive_int("num_stages", num_stages)
    k = check_positive_int("k", k)
    duration = duration or token_duration(plan)
    if order is not None:
        orders = [order]
    else:  # what the bubbles depend on most: where the chains go
        named = structured_orders(plan)
        orders = [named[n] for n in ("plan", "longest chains first", "chains interleaved")]
    warmup_factor = 2 if extra_warmup else 1
    reference = state_aware_1f1b(plan, p, k=k, order=orders[0], recompute=recompute,
                                 warmup_factor=warmup_factor)
    budget = max(_peak_tokens(plan, acts) for acts in reference)
    best = None
    for candidate in orders:  # the fastest lists within the budget
        main = [_main_sequence(acts) for acts in
                state_aware_1f1b(plan, p, k=k, order=candidate, recompute=recompute,
                                 warmup_factor=warmup_factor)]
        for reorder in (False, True):
            stages = _ListScheduler(plan, main, k=k, duration=duration, reorder=reorder,
                                    more_memory=extra_warmup).run()
            peak = max(_peak_tokens(plan, acts) for acts in stages)
            if best is None:  # the first candidate always counts
                budget = max(budget, peak)
            elif not (fits(stages) if fits is not None else peak <= budget):
                continue
            makespan = max(end for times in run_pipeline(stages, duration=duration)
                           for _, end in times)
            if best is None or makespan < best[0]:
                best = (makespan, stages)
    validate_pipeline(best[1], plan, k=k)
    return best[1]


def _peak_tokens(plan: ChunkPlan, acts: list[Action]) -> float:
    """What a stage's list holds at its peak in the simulator's memory model
    (:func:`~chunkflow.plan.pipeline.peak_held`), a token a unit: each graph, and each chain
    chunk's key/value state."""
    tokens = [c.num_tokens for c in plan.chunks]
    return peak_held(acts, graph=lambda c: tokens[c],
                     state=lambda c: tokens[c] if plan.chunks[c].chain_id is not None else 0)


def _main_sequence(acts: list[Action]) -> list[Action]:
    return [Action(I, a.chunk_id) if a.kind is B else a for a in acts]


def _peak_alive(acts: list[Action]) -> int:
    """Most graphs ``acts`` holds at once when each is freed by its ``I``."""
    alive = peak = 0
    for a in acts:
        if a.kind in (F, R):
            alive += 1
            peak = max(peak, alive)
        elif a.kind in (B, I):
            alive -= 1
    return peak


class _ListScheduler:
    """Step 2 of the module docstring: every stage's actions in simulated time; ``run``
    returns the per-stage lists. ``reorder``: a stage may also run its next backward (its
    input is here) or else its next forward (its input is here and it fits in memory) ahead
    of the main sequence's order. The chunks' forwards, and their backwards, keep one order on
    every stage either way, which the pipeline's channels rely on
    (:mod:`chunkflow.parallel.pipeline`)."""

    def __init__(self, plan: ChunkPlan, main: Stages, *, k: int,
                 duration: Callable[[int, Action], float], reorder: bool = False,
                 more_memory: bool = False):
        self.plan, self.k, self.duration, self.reorder = plan, k, duration, reorder
        self.more_memory = more_memory
        p = self.p = len(main)
        self.main = [deque(acts) for acts in main]  # what is left, in the main order
        self.forwards = [deque(a for a in acts if a.kind in (F, S)) for acts in main]
        self.backwards = [deque(a for a in acts if a.kind in (R, I)) for acts in main]
        # memory-neutral: no stage holds more graphs than the busiest stage of the main
        # sequence (1F1B's peak, the first stage's), nor more than k of a chain
        self.limit = max(_peak_alive(acts) for acts in main)
        self.out: Stages = [[] for _ in range(p)]
        self.end: list[dict[tuple[str, int], float]] = [{} for _ in range(p)]
        self.free = [0.0] * p
        self.alive: list[set[int]] = [set() for _ in range(p)]
        self.pending: list[deque[int]] = [deque() for _ in range(p)]  # I ran, W not yet

    def run(self) -> Stages:
        while any(self.main) or any(self.pending):
            best = None
            for s in range(self.p):
                cand = self.candidate(s)
                if cand is not None and (best is None or cand[0] < best[1][0]):
                    best = (s, cand)
            if best is None:  # cannot happen for lists state_aware_1f1b accepts
                raise AssertionError("zero-bubble list scheduling found no runnable stage")
            s, (start, unit) = best
            for a in unit:
                ready = self.ready_time(s, a)
                self.emit(s, a, max(start, self.free[s], ready if ready is not None else start))
        return self.out

    def emit(self, s: int, a: Action, start: float) -> None:
        self.out[s].append(a)
        self.free[s] = start + self.duration(s, a)
        self.end[s][_group(a), a.chunk_id] = self.free[s]
        if a.kind is W:
            self.pending[s].remove(a.chunk_id)
            self.alive[s].discard(a.chunk_id)
            return
        self.main[s].remove(a)
        (self.forwards if a.kind in (F, S) else self.backwards)[s].remove(a)
        if a.kind in (F, R):
            self.alive[s].add(a.chunk_id)
        elif a.kind is I:
            self.pending[s].append(a.chunk_id)

    def ready_time(self, s: int, a: Action) -> float | None:
        """When ``a``'s input is here (the neighbour's action ended); None: not scheduled yet."""
        if a.kind in (R, W) or (a.kind in (F, S) and s == 0) or (
                a.kind is I and s == self.p - 1):
            return float("-inf")
        other = s - 1 if a.kind in (F, S) else s + 1
        return self.end[other].get((_group(a), a.chunk_id))

    def forced_w(self, s: int, a: Action) -> int | None:
        """A pending ``W`` that must run before ``a`` to keep the memory bounds, or None."""
        pending = self.pending[s]
        if a.kind not in (F, R) or not pending:
            return None
        chain = self.plan.chunks[a.chunk_id].chain_id
        if chain is not None:
            same = [c for c in self.alive[s] if self.plan.chunks[c].chain_id == chain]
            waiting = [c for c in pending if self.plan.chunks[c].chain_id == chain]
            if len(same) >= self.k and waiting:
                return waiting[0]
        return pending[0] if len(self.alive[s]) >= self.limit else None

    def is_ready(self, s: int, a: Action) -> bool:
        ready = self.ready_time(s, Action(I, a.chunk_id) if a.kind is R else a)
        return ready is not None and ready <= self.free[s]

    def next_main(self, s: int) -> Action:
        """The stage's next forward or backward (see the class docstring)."""
        if self.reorder and self.forwards[s] and self.backwards[s]:
            fwd, bwd = self.forwards[s][0], self.backwards[s][0]
            forwarded = all(a.chunk_id != bwd.chunk_id for a in self.forwards[s])
            if forwarded and self.is_ready(s, bwd):
                return bwd
            # ahead of the main order only within memory: no more graphs than the limit, and
            # (unless the schedule trades memory) no new chain's key/value state, which the
            # runtime allocates at the chain's start
            starts_chain = self.plan.chunks[fwd.chunk_id].chain_idx == 0
            fits = (self.more_memory or not starts_chain) and (fwd.kind is S or (
                self.forced_w(s, fwd) is None and len(self.alive[s]) < self.limit))
            if fits and self.is_ready(s, fwd):
                return fwd
        return self.main[s][0]

    def candidate(self, s: int) -> tuple[float, list[Action]] | None:
        """What stage ``s`` runs next and when it starts; None: it waits for a neighbour's
        action that is not scheduled yet and has no ``W`` to fill the time with."""
        pending = self.pending[s]
        if not self.main[s]:
            return (self.free[s], [Action(W, pending[0])]) if pending else None
        a = self.next_main(s)
        c = self.forced_w(s, a)
        if c is not None:
            return self.free[s], [Action(W, c)]
        unit = [a, Action(I, a.chunk_id)] if a.kind is R else [a]  # R right before its I
        ready = self.ready_time(s, unit[-1])
        if ready is not None and ready <= self.free[s]:
            return self.free[s], unit
        if pending:
            return self.free[s], [Action(W, pending[0])]  # fill the wait
        return None if ready is None else (ready, unit)
