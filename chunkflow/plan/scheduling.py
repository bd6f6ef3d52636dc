"""State-aware chunk scheduling (the paper's Algorithm 2) as data, stdlib only.

A schedule is a list of :class:`Action` that prints as ``"F3 B3 S0 R0 B0"`` and parses back.

* ``F`` forward, keeping the autograd graph (the chunk's activations) for a later ``B``;
* ``S`` forward producing state only: no graph, just the chunk's keys/values for later chunks;
* ``R`` recompute: forward again, keeping the graph, for a chunk that ran ``S`` before;
* ``B`` backward: consumes the graph, adds the chunk's key/value gradients to the chain state.

Zero-bubble pipeline schedules (:mod:`chunkflow.plan.pipeline`) split a ``B`` in two:

* ``I`` input backward: the gradients of the stage input (sent to the previous stage) and of
  the chain's key/value state (what the chain's earlier chunks wait for); the graph is kept;
* ``W`` weight backward: the parameters' gradients, from what its ``I`` kept; frees the graph.

A chunk ends with either ``B`` or ``I`` then ``W``; its graph counts as alive until its ``W``.

Selective recompute (``recompute="selective"``) marks a chain's ``S``/``R`` pairs, printed in
lower case: ``s`` also keeps, per layer, the attention output and its log-sum-exp; ``r`` re-runs
the projections, norms, RoPE and MLP but takes the attention output it kept instead of running
the attention kernel (its backward uses the kept output and LSE as a flash backward always does).
The kept outputs live from the ``s`` until the ``r``'s ``B``.

For a chain of N chunks and ``k`` retained graphs the schedule is: forward in ascending order, the
first N-k as ``S`` and the last k as ``F``; backward of the kept ones in descending order; then the
first N-k, in DESCENDING order, each recomputed right before its backward. Descending matters: the
key/value gradient of chunk j is complete only after every later chunk has run backward.
Standalone chunks are ``F`` then ``B``. At most ``k`` graphs are ever alive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Sequence

from chunkflow.plan.chunks import ChunkPlan, check_positive_int


class ActionKind(enum.Enum):
    FORWARD = "F"
    STATE_FORWARD = "S"
    RECOMPUTE = "R"
    BACKWARD = "B"
    INPUT_BACKWARD = "I"
    WEIGHT_BACKWARD = "W"


RECOMPUTE_MODES = ("full", "selective")
"""How a chain's ``R`` recomputes: every operator, or everything but the attention kernel."""


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    chunk_id: int
    selective: bool = False
    """``S``: also keep the attention outputs; ``R``: reuse them (printed ``s``/``r``)."""

    def __post_init__(self):
        if self.selective and self.kind not in (ActionKind.STATE_FORWARD, ActionKind.RECOMPUTE):
            raise ValueError(f"{self.kind.value}{self.chunk_id}: only S and R actions can be "
                             f"selective")

    def __str__(self) -> str:
        kind = self.kind.value.lower() if self.selective else self.kind.value
        return f"{kind}{self.chunk_id}"

    @staticmethod
    def parse(text: str) -> "Action":
        kinds = {k.value: k for k in ActionKind}
        head = text[:1]
        selective = head in ("s", "r")
        if len(text) < 2 or head.upper() not in kinds or (head.islower() and not selective) \
                or not text[1:].isdigit():
            raise ValueError(
                f"cannot parse action {text!r}: expected one of F/S/R/B/I/W (or s/r, "
                f"selective recompute) followed by a chunk id, like 'F3'"
            )
        return Action(kinds[head.upper()], int(text[1:]), selective)


def format_schedule(actions: Iterable[Action]) -> str:
    return " ".join(str(a) for a in actions)


def parse_schedule(text: str) -> list[Action]:
    return [Action.parse(tok) for tok in text.split()]


def check_recompute(recompute: str) -> bool:
    """Validate a recompute mode; True for ``selective``."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; valid: {', '.join(RECOMPUTE_MODES)}")
    return recompute == "selective"


def schedule(plan: ChunkPlan, *, k: int, recompute: str = "full") -> list[Action]:
    """Algorithm 2 for ``plan``: chunks in plan order, each chain scheduled as a unit.
    ``recompute``: "full", or "selective" (``s``/``r`` actions, see the module docstring)."""
    k = check_positive_int("k", k)
    sel = check_recompute(recompute)
    F, S, R, B = (ActionKind.FORWARD, ActionKind.STATE_FORWARD, ActionKind.RECOMPUTE,
                  ActionKind.BACKWARD)
    actions: list[Action] = []
    for chunk in plan.chunks:
        if chunk.chain_id is None:
            actions += [Action(F, chunk.chunk_id), Action(B, chunk.chunk_id)]
        elif chunk.chain_idx == 0:
            ids = plan.chains[chunk.chain_id].chunk_ids
            num_recomputed = max(len(ids) - k, 0)
            actions += [Action(S, c, sel) for c in ids[:num_recomputed]]
            actions += [Action(F, c) for c in ids[num_recomputed:]]
            actions += [Action(B, c) for c in reversed(ids[num_recomputed:])]
            for c in reversed(ids[:num_recomputed]):
                actions += [Action(R, c, sel), Action(B, c)]
    return actions


def forward_only(plan: ChunkPlan) -> list[Action]:
    """Evaluation's schedule: one ``F`` per chunk and no ``B``, a chain's chunks right after one
    another (only its key/value state is kept between them), in plan order otherwise."""
    order: list[int] = []
    for chunk in plan.chunks:
        if chunk.chain_id is None:
            order.append(chunk.chunk_id)
        elif chunk.chain_idx == 0:
            order.extend(plan.chains[chunk.chain_id].chunk_ids)
    return [Action(ActionKind.FORWARD, c) for c in order]


class ScheduleError(ValueError):
    """A schedule breaks Algorithm 2; the message shows the schedule with the failing action marked."""


def validate_schedule(actions: Sequence[Action], plan: ChunkPlan, *, k: int) -> None:
    """Raise :class:`ScheduleError` unless ``actions`` is a correct state-aware schedule.

    Checks: every chunk is forwarded once and backwarded once (``B``, or ``I`` then ``W``); a
    chain's forwards run in ascending order; the kept (``F``) chunks of a chain are exactly its
    last min(k, N) chunks, the others run ``S`` and later ``R`` immediately before their ``B``
    (or ``I``); backwards (``B``/``I``) run in descending order along a chain; a ``B``/``I``
    needs a live graph; a ``W`` comes after its chunk's ``I``; a graph is alive from its
    ``F``/``R`` to its ``B`` or ``W``, and never more than ``k`` are alive at once; a selective
    ``r`` reuses what its chunk's ``s`` kept, so the two come in pairs.
    """
    check_actions(actions, plan, k=k, per_chain=False)


def check_actions(actions: Sequence[Action], plan: ChunkPlan | None, *, k: int,
                  per_chain: bool) -> None:
    """The rules of :func:`validate_schedule` for one action list. ``per_chain``: at most ``k``
    graphs alive per chain (a pipeline stage) instead of ``k`` in all (one device).
    ``plan=None``: the ids are plain micro-batches (standalone chunks)."""
    k = check_positive_int("k", k)
    F, S, R, B = (ActionKind.FORWARD, ActionKind.STATE_FORWARD, ActionKind.RECOMPUTE,
                  ActionKind.BACKWARD)
    I, W = ActionKind.INPUT_BACKWARD, ActionKind.WEIGHT_BACKWARD
    forwarded: set[int] = set()
    backwarded: set[int] = set()  # B or I ran: the input and key/value gradients are out
    awaiting_w: set[int] = set()  # I ran, W not yet: the graph is still alive
    live: set[int] = set()
    kept_outputs: set[int] = set()  # chunks whose s kept attention outputs for their r

    def fail(i: int, why: str) -> None:
        grid = " ".join(f">>{a}<<" if j == i else str(a) for j, a in enumerate(actions))
        if i == len(actions):
            grid += " >>end<<"
        raise ScheduleError(f"action {i} ({actions[i] if i < len(actions) else 'end'}): {why}\n"
                            f"  {grid}")

    for i, a in enumerate(actions):
        if i > 0 and actions[i - 1].kind is R and (
                a.kind not in (B, I) or a.chunk_id != actions[i - 1].chunk_id):
            fail(i, f"{actions[i - 1]} must be followed by B{actions[i - 1].chunk_id} (or "
                    f"I{actions[i - 1].chunk_id}): a recomputed chunk runs backward right away")
        if plan is not None and not 0 <= a.chunk_id < plan.num_chunks:
            fail(i, f"chunk id {a.chunk_id} is not in the plan (0..{plan.num_chunks - 1})")
        chunk = plan.chunks[a.chunk_id] if plan is not None else None
        chain = plan.chain_of(chunk) if plan is not None else None
        if a.kind is W:
            if a.chunk_id not in awaiting_w:
                fail(i, f"W{a.chunk_id} needs I{a.chunk_id} before it (and runs once): the "
                        f"weight gradients come from what the input backward kept")
            awaiting_w.discard(a.chunk_id)
            live.discard(a.chunk_id)
            continue
        if a.chunk_id in backwarded:
            fail(i, f"chunk {a.chunk_id} already ran backward")
        if a.kind in (F, S):
            if a.chunk_id in forwarded:
                fail(i, f"chunk {a.chunk_id} already ran forward")
            if chain is not None:
                j = chunk.chain_idx
                if j > 0 and chain.chunk_ids[j - 1] not in forwarded:
                    fail(i, f"chain {chain.chain_id}: forward of chunk {a.chunk_id} before its "
                            f"predecessor {chain.chunk_ids[j - 1]} (forward must be ascending)")
                kept = j >= chain.num_chunks - k
                if kept != (a.kind is F):
                    fail(i, f"chain {chain.chain_id}: the last min(k={k}, {chain.num_chunks}) "
                            f"chunks run F and the others S, got {a}")
            elif a.kind is S:
                fail(i, f"standalone chunk {a.chunk_id} has no state to produce: use F")
            forwarded.add(a.chunk_id)
            if a.kind is F:
                live.add(a.chunk_id)
            if a.selective:
                kept_outputs.add(a.chunk_id)
        elif a.kind is R:
            if chain is None or a.chunk_id not in forwarded or a.chunk_id in live:
                fail(i, f"R{a.chunk_id} needs a chain chunk that ran S (state-only forward) before")
            if a.selective != (a.chunk_id in kept_outputs):
                fail(i, f"r{a.chunk_id} needs s{a.chunk_id} before it: only a selective "
                        f"state forward keeps the attention outputs it reuses" if a.selective
                     else f"s{a.chunk_id} kept attention outputs for a selective recompute: "
                          f"use r{a.chunk_id}, not R{a.chunk_id}")
            kept_outputs.discard(a.chunk_id)
            nxt = chunk.chain_idx + 1
            if nxt < chain.num_chunks and chain.chunk_ids[nxt] not in backwarded:
                fail(i, f"chain {chain.chain_id}: recompute of chunk {a.chunk_id} before backward "
                        f"of chunk {chain.chunk_ids[nxt]} (recompute must be descending)")
            live.add(a.chunk_id)
        elif a.kind in (B, I):
            if a.chunk_id not in live:
                fail(i, f"backward of chunk {a.chunk_id} without a live graph (F or R first)")
            if chain is not None:
                nxt = chunk.chain_idx + 1
                if nxt < chain.num_chunks and chain.chunk_ids[nxt] not in backwarded:
                    fail(i, f"chain {chain.chain_id}: backward of chunk {a.chunk_id} before "
                            f"chunk {chain.chunk_ids[nxt]} (backward must be descending: its "
                            f"key/value gradient is not complete yet)")
            if a.kind is B:
                live.discard(a.chunk_id)
            else:
                awaiting_w.add(a.chunk_id)
            backwarded.add(a.chunk_id)
        if per_chain and chain is not None:
            alive = [c for c in live if c in chain.chunk_ids]
            if len(alive) > k:
                fail(i, f"chain {chain.chain_id}: {len(alive)} graphs alive ({sorted(alive)}), "
                        f"more than k={k}")
        elif not per_chain and len(live) > k:
            fail(i, f"{len(live)} graphs alive ({sorted(live)}), more than k={k}")
    if actions and actions[-1].kind is R:
        fail(len(actions), f"{actions[-1]} must be followed by B{actions[-1].chunk_id}")
    if awaiting_w:
        fail(len(actions), f"chunks {sorted(awaiting_w)} ran I but never W (their weight "
                           f"gradients are missing)")
    expected = (range(plan.num_chunks) if plan is not None else sorted(forwarded))
    missing = [c for c in expected if c not in backwarded]
    if missing:
        fail(len(actions), f"chunks {missing} never ran backward")
