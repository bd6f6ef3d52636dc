"""Pipeline schedules as data, stdlib only: plain 1F1B and state-aware 1F1B over a chunk plan.

A pipeline schedule is one action list per stage (``list[list[Action]]``, the actions of
:mod:`chunkflow.plan.scheduling`); it prints as a grid, one ``stage s: F0 F1 B0 ...`` line per
stage, and parses back. The distributed runtime executes these lists and :mod:`chunkflow.sim`
simulates the same lists, so what we predict at scale is what we run.

* ``one_f_one_b(m, p)``: the standard 1F1B schedule of ``m`` micro-batches (ids 0..m-1) on ``p``
  stages: stage s runs min(p-1-s, m) forwards, then alternates one forward and one backward, then
  drains the remaining backwards.
* ``state_aware_1f1b(plan, p, k=...)``: the same pattern over the chunks of ``plan``. Standalone
  chunks are ordinary micro-batches. On every stage a chain's chunks run forward in ascending order
  (the first N-k as ``S``, state only, the last k as ``F``) and backward in descending order (each
  ``S`` chunk recomputed, ``R``, right before its ``B``); a chain's first backward waits until all
  its forwards ran on that stage, the stage running further forwards meanwhile. So at most k graphs
  per chain and stage are alive.

Dependencies (what :func:`run_pipeline` and :func:`validate_pipeline` enforce): a chunk's forward
(``F``/``S``) on stage s after its forward on stage s-1; its backward on stage s after its backward
on stage s+1; ``R`` is local (the stage kept the chunk's input); each stage runs its list in order.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

from chunkflow.plan.chunks import ChunkPlan, check_positive_int
from chunkflow.plan.scheduling import (
    Action,
    ActionKind,
    ScheduleError,
    check_actions,
    check_recompute,
)

F, S, R, B = (ActionKind.FORWARD, ActionKind.STATE_FORWARD, ActionKind.RECOMPUTE,
              ActionKind.BACKWARD)
I, W = ActionKind.INPUT_BACKWARD, ActionKind.WEIGHT_BACKWARD
Stages = list[list[Action]]


def format_pipeline(stages: Stages) -> str:
    """One ``stage s: A A A`` line per stage."""
    return "\n".join(f"stage {s}: " + " ".join(str(a) for a in acts)
                     for s, acts in enumerate(stages))


def parse_pipeline(text: str) -> Stages:
    """Inverse of :func:`format_pipeline` (lines ``stage s: ...`` or ``s: ...``, in order)."""
    stages = []
    for line_no, line in enumerate(text.strip().splitlines(), 1):
        head, sep, body = line.partition(":")
        label = head.strip().removeprefix("stage").strip()
        if not sep or not label.isdigit() or int(label) != len(stages):
            raise ValueError(f"line {line_no}: {line!r}: expected 'stage {len(stages)}: F0 B0 ...'")
        stages.append([Action.parse(tok) for tok in body.split()])
    return stages


def one_f_one_b(num_microbatches: int, num_stages: int) -> Stages:
    """Standard 1F1B: micro-batch ids 0..m-1, ``F``/``B`` actions per stage."""
    m = check_positive_int("num_microbatches", num_microbatches)
    p = check_positive_int("num_stages", num_stages)
    stages = []
    for s in range(p):
        warmup = min(p - 1 - s, m)
        acts = [Action(F, i) for i in range(warmup)]
        for i in range(warmup, m):
            acts += [Action(F, i), Action(B, i - warmup)]
        acts += [Action(B, i) for i in range(m - warmup, m)]
        stages.append(acts)
    return stages


def state_aware_1f1b(plan: ChunkPlan, num_stages: int, *, k: int,
                     order: Sequence[int] | None = None, recompute: str = "full",
                     warmup_factor: int = 1) -> Stages:
    """State-aware 1F1B for ``plan`` on ``num_stages`` stages, ``k`` graphs per chain and stage.
    ``recompute="selective"``: the chains' ``S``/``R`` pairs are selective (``s``/``r``, see
    :mod:`chunkflow.plan.scheduling`). ``warmup_factor``: stage s keeps
    ``warmup_factor * (p-1-s)`` chunks in flight before its first backward (1: 1F1B; the
    zero-bubble ``zb-h2`` takes 2, :mod:`chunkflow.plan.zero_bubble`).

    ``order``: the forward order of the chunks; a chain's chunks must appear in ascending order.
    Default: plan order, chains first (the paper's figure puts the standalone chunks first;
    chains first lets their backward backlog drain while the standalone chunks fill the pipeline
    and simulates faster, see ``benchmarks/pipeline_order.py``;
    ``chunkflow.sim.search.best_order`` searches further).
    """
    p = check_positive_int("num_stages", num_stages)
    k = check_positive_int("k", k)
    sel = check_recompute(recompute)
    order = list(range(plan.num_chunks)) if order is None else list(order)
    if sorted(order) != list(range(plan.num_chunks)):
        raise ValueError(f"order must be a permutation of the plan's chunk ids "
                         f"0..{plan.num_chunks - 1}, got {order}")
    for chain in plan.chains:
        positions = [order.index(c) for c in chain.chunk_ids]
        if positions != sorted(positions):
            raise ValueError(f"order {order} runs chain {chain.chain_id}'s chunks "
                             f"{list(chain.chunk_ids)} out of ascending order")
    factor = check_positive_int("warmup_factor", warmup_factor)
    return [_stage_actions(plan, order, warmup=min(factor * (p - 1 - s), len(order)), k=k,
                           sel=sel) for s in range(p)]


def _stage_actions(plan: ChunkPlan, order: list[int], *, warmup: int, k: int,
                   sel: bool) -> list[Action]:
    acts: list[Action] = []
    forwards = deque(order)
    done: set[int] = set()
    # Backward work in forward order: a standalone chunk, or a chain (its chunks descending).
    due: deque[list[int]] = deque()

    def forward() -> None:
        c = forwards.popleft()
        chunk = plan.chunks[c]
        chain = plan.chain_of(chunk)
        if chain is None:
            acts.append(Action(F, c))
            due.append([c])
            return
        if chunk.chain_idx == 0:
            due.append(list(reversed(chain.chunk_ids)))
        recomputed = chunk.chain_idx < chain.num_chunks - k
        acts.append(Action(S, c, sel) if recomputed else Action(F, c))
        done.add(c)

    def ready() -> bool:
        """The oldest due backward can run: a chain only once all its chunks ran forward."""
        return bool(due) and all(c in done or plan.chunks[c].chain_id is None for c in due[0])

    def backward() -> None:
        pending = due[0]
        c = pending.pop(0)
        if not pending:
            due.popleft()
        chunk = plan.chunks[c]
        chain = plan.chain_of(chunk)
        if chain is not None and chunk.chain_idx < chain.num_chunks - k:
            acts.append(Action(R, c, sel))
        acts.append(Action(B, c))

    # 1F1B: keep `warmup` chunks in flight and run a backward whenever there is one more. A
    # chain that is not ready yet lets forwards run ahead; once it is, backwards drain the
    # backlog down to `warmup` again (one backward per forward would never drain it).
    in_flight = 0
    while forwards or due:
        if ready() and (in_flight > warmup or not forwards):
            backward()
            in_flight -= 1
        else:
            assert forwards, "a chain cannot be waiting once every forward ran"
            forward()
            in_flight += 1
    return acts


def structured_orders(plan: ChunkPlan) -> dict[str, list[int]]:
    """Named forward orders for :func:`state_aware_1f1b`'s ``order`` (each chain's chunks stay
    ascending): plan order (chains first), the standalone chunks first (the paper's figure),
    the chains longest first, and the chains, longest first, each chunk followed by a
    standalone one. :func:`chunkflow.sim.search.best_order` simulates them (and random ones),
    the zero-bubble schedules too (:mod:`chunkflow.plan.zero_bubble`)."""
    chains = [list(c.chunk_ids) for c in plan.chains]
    alone = [c.chunk_id for c in plan.chunks if c.chain_id is None]
    longest_first = [c for chain in sorted(chains, key=len, reverse=True) for c in chain]
    interleaved, rest = [], list(alone)
    for chain in sorted(chains, key=len, reverse=True):
        for c in chain:
            interleaved.append(c)
            if rest:
                interleaved.append(rest.pop(0))
    return {
        "plan": list(range(plan.num_chunks)),
        "standalone first": alone + [c for chain in chains for c in chain],
        "longest chains first": longest_first + alone,
        "chains interleaved": interleaved + rest,
    }


def run_pipeline(stages: Stages, *, duration: Callable[[int, Action], float],
                 p2p: float = 0) -> list[list[tuple[float, float]]]:
    """(start, end) of every action: each stage runs its list in order, each action as soon as
    its dependencies (module docstring) are met; a send between stages takes ``p2p``.

    Raises :class:`ScheduleError` with the grid, the stuck actions marked, on a deadlock.
    """
    p = len(stages)
    index = [{(_group(a), a.chunk_id): i for i, a in enumerate(acts)} for acts in stages]
    for s, acts in enumerate(stages):  # each stage: one forward, then one backward, per chunk
        forwarded, backwarded, weighted = set(), set(), set()
        for i, a in enumerate(acts):
            if a.kind in (F, S) and a.chunk_id in forwarded or (
                    a.kind in (B, I) and (a.chunk_id not in forwarded
                                          or a.chunk_id in backwarded)) or (
                    a.kind is W and (a.chunk_id not in backwarded or a.chunk_id in weighted)):
                raise ScheduleError(f"stage {s} runs {a} out of turn (each chunk: one forward, "
                                    f"then one backward: B, or I then W)\n"
                                    + _grid(stages, {(s, i)}))
            if a.kind in (B, I):
                backwarded.add(a.chunk_id)
            elif a.kind is W:
                weighted.add(a.chunk_id)
            elif a.kind is not R:
                forwarded.add(a.chunk_id)
    times: list[list[tuple[float, float]]] = [[] for _ in range(p)]
    free = [0] * p  # ints, so exact durations (Fraction) stay exact
    while True:
        progressed = False
        for s, acts in enumerate(stages):
            while len(times[s]) < len(acts):
                a = acts[len(times[s])]
                ready = _dependency_end(a, s, stages, index, times)
                if ready is None:
                    break
                start = max(free[s], ready + (p2p if ready > float("-inf") else 0.0))
                free[s] = start + duration(s, a)
                times[s].append((start, free[s]))
                progressed = True
        if all(len(t) == len(a) for t, a in zip(times, stages)):
            return times
        if not progressed:
            stuck = {(s, len(times[s])) for s in range(p) if len(times[s]) < len(stages[s])}
            raise ScheduleError("deadlock: no stage can run its next action (marked)\n"
                                + _grid(stages, stuck))


def peak_held(acts: Sequence[Action], *, graph: Callable[[int], float],
              state: Callable[[int], float], kept: Callable[[int], float] | None = None,
              grads: float = 0.0) -> float:
    """The most one stage's list holds at once (the memory model of :mod:`chunkflow.sim`):
    ``graph(c)`` from chunk c's ``F``/``R`` to its ``B``/``W``; ``state(c)`` from its
    ``F``/``S`` to its ``B``/``I`` (the last read of its key/value state); ``kept(c)``, what a
    selective ``s`` keeps, until its ``r`` hands it to the graph; ``grads``, the parameter
    gradients, from the end of the first ``B``/``W`` on. Taken at action boundaries, each
    action's own holding included."""
    kept = kept or (lambda c: 0.0)
    current = peak = 0.0
    for a in acts:
        if a.selective:  # kept by s, handed to the graph by r
            current += kept(a.chunk_id) * (1 if a.kind is S else -1)
        if a.kind in (F, S):
            current += state(a.chunk_id)
        if a.kind in (F, R):
            current += graph(a.chunk_id)
        peak = max(peak, current)  # held through the action, a backward included
        if a.kind in (B, I):
            current -= state(a.chunk_id)
        if a.kind in (B, W):
            current -= graph(a.chunk_id) - grads
            grads = 0.0  # allocated once, by the first backward
    return peak


def _group(a: Action) -> str:
    """What a cross-stage dependency matches: a forward (``F``/``S``) or a backward that sends
    the input gradient (``B``/``I``); ``R`` and ``W`` are local."""
    return ("B" if a.kind in (B, I) else a.kind.value if a.kind in (R, W) else "F")


def _dependency_end(a: Action, s: int, stages: Stages, index, times) -> float | None:
    """End time of the cross-stage action ``a`` waits for; -inf if none; None if not run yet."""
    if a.kind in (R, W) or (a.kind in (F, S) and s == 0) or (
            a.kind in (B, I) and s == len(stages) - 1):
        return float("-inf")
    other = s - 1 if a.kind in (F, S) else s + 1
    i = index[other].get((_group(a), a.chunk_id))
    if i is None:
        what = "forward" if a.kind in (F, S) else "backward"
        raise ScheduleError(f"stage {s} runs {a} but stage {other} never runs its {what}\n"
                            + _grid(stages, {(s, len(times[s]))}))
    return times[other][i][1] if i < len(times[other]) else None


def _grid(stages: Stages, marked: set[tuple[int, int]]) -> str:
    return "\n".join(f"  stage {s}: " + " ".join(f">>{a}<<" if (s, i) in marked else str(a)
                                                 for i, a in enumerate(acts))
                     for s, acts in enumerate(stages))


def validate_pipeline(stages: Stages, plan: ChunkPlan | None = None, *, k: int = 1) -> None:
    """Raise :class:`ScheduleError` unless ``stages`` is a correct pipeline schedule.

    Per stage: the single-device rules of :func:`chunkflow.plan.validate_schedule` (every chunk
    forward once and backward once, chain forwards ascending and backwards descending, ``S`` for
    all but a chain's last k chunks, ``R`` right before its ``B``), with at most k retained graphs
    per chain (standalone chunks are bounded by 1F1B itself). ``plan=None``: plain micro-batches.
    Across stages: a dry run with unit durations finds missing partners and deadlocks.
    """
    if not stages:
        raise ScheduleError("a pipeline needs at least one stage")
    for s, acts in enumerate(stages):
        try:
            check_actions(acts, plan, k=k, per_chain=True)
        except ScheduleError as e:
            raise ScheduleError(f"stage {s}: {e}") from None
    run_pipeline(stages, duration=lambda s, a: 1.0)
