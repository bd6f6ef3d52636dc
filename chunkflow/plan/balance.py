"""Data-parallel sharding of a chunk plan, balanced by the cost model. Stdlib only.

Every rank runs its own chunks through the same schedule, so what is handed out is a *unit*: a
chain with all its chunks (its state never leaves the rank that builds it), or one standalone
chunk. Units are placed whole; nothing here cuts a chain.

The cost of a unit is the FLOPs of its training work on one device (:func:`chunk_train_flops`):
forward + backward of every chunk (backward = 2x forward for matmuls, 2.5x for attention, as
:class:`~chunkflow.plan.cost.CostModel`), plus one more forward for the first N-k chunks of a chain,
which run ``S`` and later ``R``. Chunk j of a chain attends to the j x chunk_size earlier tokens of
its sequence, so uniform chunks are not uniform in cost, and counting chunks mis-balances ranks that
hold chains. FLOPs, not seconds: every rank runs on the same hardware, so the rate cancels (the
small-GEMM roll-off and launch overheads are what is left out).

Placement is Graham's LPT (longest processing time first): units by cost, descending, each to the
least loaded rank. Its makespan is at most (4/3 - 1/(3m)) x the optimum on m ranks (Graham 1969),
it is O(u log u) for u units, and deterministic (ties: plan order, then the lowest rank).
:func:`subplan` turns one rank's chunks into a plan of its own, for :func:`schedule` to run.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

from chunkflow.plan.chunks import Chain, Chunk, ChunkPlan, Segment, check_positive_int
from chunkflow.plan.cost import CostModel, ModelShape, chunk_segments, forward_flops

_MATMUL_BACKWARD = CostModel.matmul_backward_factor  # the cost model's defaults, 2.0 and 2.5
_ATTENTION_BACKWARD = CostModel.attention_backward_factor


def chunk_train_flops(shape: ModelShape, chunk: Chunk, *, recomputed: bool) -> float:
    """FLOPs of one chunk's forward + backward on one device, plus one more forward when
    ``recomputed`` (it runs ``S`` and later ``R``). A chain chunk also attends to its prefix."""
    lens, prefix = chunk_segments(chunk)
    f = forward_flops(shape, lens, prefix_len=prefix)
    matmul, attention = f.layers_matmul + f.head_matmul, f.attention
    total = (1 + _MATMUL_BACKWARD) * matmul + (1 + _ATTENTION_BACKWARD) * attention
    return total + (matmul + attention if recomputed else 0.0)


def unit_costs(plan: ChunkPlan, *, k: int, shape: ModelShape
               ) -> list[tuple[tuple[int, ...], float]]:
    """The plan's units in plan order (chains, then standalone chunks): (chunk ids, FLOPs).
    A chain's first N-k chunks count as recomputed."""
    k = check_positive_int("k", k)
    units = []
    for chain in plan.chains:
        num_recomputed = chain.num_chunks - k
        cost = sum(chunk_train_flops(shape, plan.chunks[c], recomputed=idx < num_recomputed)
                   for idx, c in enumerate(chain.chunk_ids))
        units.append((chain.chunk_ids, cost))
    units += [((c.chunk_id,), chunk_train_flops(shape, c, recomputed=False))
              for c in plan.chunks if c.chain_id is None]
    return units


@dataclass(frozen=True)
class Sharding:
    """Chunk ids per data-parallel rank (ascending, so chains first) and each rank's FLOPs."""

    chunk_ids: tuple[tuple[int, ...], ...]
    costs: tuple[float, ...]

    @property
    def num_ranks(self) -> int:
        return len(self.chunk_ids)

    @property
    def imbalance(self) -> float:
        """Max / mean rank cost, empty ranks included; 1.0 is perfect balance."""
        mean = sum(self.costs) / self.num_ranks
        return max(self.costs) / mean if mean else 1.0

    def summary(self) -> str:
        counts = "/".join(str(len(ids)) for ids in self.chunk_ids)
        return (f"{self.num_ranks} ranks: chunks {counts}, "
                f"cost imbalance {self.imbalance:.2f} (max/mean)")


def balance_chunks(plan: ChunkPlan, num_ranks: int, *, k: int, shape: ModelShape) -> Sharding:
    """Greedy LPT over :func:`unit_costs`: the costliest unit first (ties: plan order), each to the
    least loaded rank (ties: the lowest). With fewer units than ranks, some ranks stay empty."""
    num_ranks = check_positive_int("num_ranks", num_ranks)
    units = unit_costs(plan, k=k, shape=shape)
    order = sorted(range(len(units)), key=lambda u: (-units[u][1], u))
    loads = [(0.0, rank) for rank in range(num_ranks)]  # a heap: least load, then lowest rank
    ids: list[list[int]] = [[] for _ in range(num_ranks)]
    for u in order:
        load, rank = heapq.heappop(loads)
        ids[rank] += units[u][0]
        heapq.heappush(loads, (load + units[u][1], rank))
    costs = {rank: load for load, rank in loads}
    return Sharding(tuple(tuple(sorted(r)) for r in ids),
                    tuple(costs[rank] for rank in range(num_ranks)))


def subplan(plan: ChunkPlan, chunk_ids: Sequence[int]) -> tuple[ChunkPlan, tuple[int, ...]]:
    """``plan`` restricted to the whole units ``chunk_ids`` hold, renumbered, and the original seq
    id of each of its sequences: sequence i of the subplan is ``seq_ids[i]`` of ``plan``.

    Sequences, chains and chunks keep their original relative order (so chains still come first
    and packed segments stay sorted by seq id); segments keep their start and end.
    """
    valid = f"a chunk id of the plan (0..{plan.num_chunks - 1})"
    if not chunk_ids:
        raise ValueError(f"chunk_ids is empty: a subplan needs at least one chunk, {valid}")
    selected: set[int] = set()
    for c in chunk_ids:
        if c not in range(plan.num_chunks):
            raise ValueError(f"chunk id {c!r} is not in the plan; valid: {valid}")
        if c in selected:
            raise ValueError(f"chunk id {c} is selected twice; each chunk goes to one rank once")
        selected.add(c)
    chains = [ch for ch in plan.chains if selected.intersection(ch.chunk_ids)]
    for ch in chains:
        missing = [c for c in ch.chunk_ids if c not in selected]
        if missing:
            raise ValueError(f"chain {ch.chain_id} (sequence {ch.seq_id}) is split: chunks "
                             f"{missing} of its {list(ch.chunk_ids)} are not selected; "
                             f"a chain goes whole, select all of its chunks or none")
    old_ids = sorted(selected)  # plan order: chains first, each chain's chunks consecutive
    seq_ids = tuple(sorted({s.seq_id for c in old_ids for s in plan.chunks[c].segments}))
    new_seq = {old: new for new, old in enumerate(seq_ids)}
    new_chunk = {old: new for new, old in enumerate(old_ids)}
    new_chain = {ch.chain_id: new for new, ch in enumerate(chains)}
    chunks = tuple(
        Chunk(new_chunk[old.chunk_id],
              tuple(Segment(new_seq[s.seq_id], s.start, s.end) for s in old.segments),
              None if old.chain_id is None else new_chain[old.chain_id], old.chain_idx)
        for old in (plan.chunks[c] for c in old_ids))
    sub_chains = tuple(Chain(new_chain[ch.chain_id], new_seq[ch.seq_id],
                             tuple(new_chunk[c] for c in ch.chunk_ids)) for ch in chains)
    seq_lens = tuple(plan.seq_lens[s] for s in seq_ids)
    return ChunkPlan(plan.chunk_size, seq_lens, chunks, sub_chains), seq_ids
