"""Chunk construction: the paper's Algorithm 1, stdlib only.

A global batch of sequences becomes a list of chunks of at most ``chunk_size`` tokens:

* a sequence longer than ``chunk_size`` is cut into consecutive *dependent* chunks, a *chain*;
  chunk j of a chain attends to the keys/values of chunks 0..j-1 (the chain's state);
* shorter sequences are bin-packed into as few *standalone* chunks as possible with
  Best-Fit Decreasing (BFD): longest first, each into the fullest chunk it still fits.
  BFD uses at most 11/9 * OPT + 6/9 chunks (Johnson 1973; Dosa 2007 for the tight constant).
* optionally (default on), short sequences also fill the free space of each chain's last chunk.
  This is exact, since inside a chunk every segment attends only to its own sequence, and it
  never costs recomputation, because a chain's last chunk always keeps its graph (K >= 1).

Invariants: every token lands in exactly one chunk, in order; a chain's chunks are consecutive in
the plan and its segment is always the first of each chunk; the plan is a deterministic function
of (seq_lens, chunk_size, pack_chain_tails).
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of sequence ``seq_id``."""

    seq_id: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Chunk:
    """One unit of execution: segments laid side by side, at most ``chunk_size`` tokens.

    ``chain_id``/``chain_idx`` are set when the chunk belongs to a chain; its chain segment is
    ``segments[0]`` and the other segments (if any) are packed standalone sequences.
    """

    chunk_id: int
    segments: tuple[Segment, ...]
    chain_id: int | None = None
    chain_idx: int | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)

    @property
    def is_dependent(self) -> bool:
        return self.chain_id is not None


@dataclass(frozen=True)
class Chain:
    """A sequence longer than ``chunk_size``: its chunks, in ascending order."""

    chain_id: int
    seq_id: int
    chunk_ids: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_ids)


@dataclass(frozen=True)
class ChunkPlan:
    """Result of :func:`build_chunks`. Chain chunks come first (chain by chain), then standalone ones."""

    chunk_size: int
    seq_lens: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    chains: tuple[Chain, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def packing_efficiency(self) -> float:
        """Tokens / chunk capacity (``num_chunks * chunk_size``); 1.0 means no padding at all."""
        return self.num_tokens / (self.num_chunks * self.chunk_size) if self.chunks else 1.0

    @property
    def lower_bound(self) -> int:
        """No plan can use fewer chunks than ceil(total tokens / chunk_size)."""
        return math.ceil(self.num_tokens / self.chunk_size)

    @property
    def longest_chain(self) -> int:
        return max((c.num_chunks for c in self.chains), default=0)

    def chain_of(self, chunk: Chunk) -> Chain | None:
        return None if chunk.chain_id is None else self.chains[chunk.chain_id]

    def summary(self) -> str:
        return (
            f"{len(self.seq_lens)} sequences, {self.num_tokens} tokens -> {self.num_chunks} chunks "
            f"of {self.chunk_size} (lower bound {self.lower_bound}), {len(self.chains)} chains "
            f"(longest {self.longest_chain} chunks), packing efficiency {self.packing_efficiency:.1%}"
        )


def check_positive_int(name: str, value: object, why: str = "") -> int:
    """``value`` as an int (Python, NumPy or 0-dim torch integers), or a ValueError naming it."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer{why}, got {value!r}")
    return number


def build_chunks(
    seq_lens: Sequence[int], *, chunk_size: int, pack_chain_tails: bool = True
) -> ChunkPlan:
    """Algorithm 1: cut sequences longer than ``chunk_size`` into chains, bin-pack the rest (BFD).

    ``pack_chain_tails`` also packs short sequences into the free space of each chain's last chunk.
    """
    chunk_size = check_positive_int("chunk_size", chunk_size)
    seq_lens = tuple(seq_lens)
    if not seq_lens:
        raise ValueError("seq_lens is empty: a batch needs at least one sequence")
    seq_lens = tuple(check_positive_int(f"seq_lens[{i}]", n, " (every sequence needs a token)")
                     for i, n in enumerate(seq_lens))

    # Bins are lists of segments; a chain's last chunk is a bin that starts partly full.
    bins: list[list[Segment]] = []
    bin_chain: list[tuple[int, int] | None] = []  # (chain_id, chain_idx) per bin
    chains: list[tuple[int, list[int]]] = []  # (seq_id, bin indices)
    for seq_id, n in enumerate(seq_lens):
        if n <= chunk_size:
            continue
        chain_id = len(chains)
        bin_ids = []
        for chain_idx, start in enumerate(range(0, n, chunk_size)):
            bin_ids.append(len(bins))
            bins.append([Segment(seq_id, start, min(start + chunk_size, n))])
            bin_chain.append((chain_id, chain_idx))
        chains.append((seq_id, bin_ids))

    # Best-Fit Decreasing. `free` is kept sorted by (free tokens, bin index) so the best fit is one
    # bisect away and ties resolve to the oldest bin: deterministic.
    free: list[tuple[int, int]] = []
    if pack_chain_tails:
        for _, bin_ids in chains:
            last = bin_ids[-1]
            room = chunk_size - bins[last][0].num_tokens
            if room > 0:
                bisect.insort(free, (room, last))
    short = [(n, seq_id) for seq_id, n in enumerate(seq_lens) if n <= chunk_size]
    for n, seq_id in sorted(short, key=lambda x: (-x[0], x[1])):
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = chunk_size, len(bins)
            bins.append([])
            bin_chain.append(None)
        bins[b].append(Segment(seq_id, 0, n))
        if room - n > 0:
            bisect.insort(free, (room - n, b))

    # Number chunks: chains first, in sequence order, then standalone chunks in creation order.
    # Packed segments are listed by sequence id, after the chain segment.
    order = [b for _, bin_ids in chains for b in bin_ids]
    order += [b for b in range(len(bins)) if bin_chain[b] is None]
    chunks = []
    for chunk_id, b in enumerate(order):
        head, packed = (bins[b][:1], bins[b][1:]) if bin_chain[b] else ([], bins[b])
        segments = tuple(head + sorted(packed, key=lambda s: s.seq_id))
        chain_id, chain_idx = bin_chain[b] if bin_chain[b] else (None, None)
        chunks.append(Chunk(chunk_id, segments, chain_id, chain_idx))
    new_id = {b: i for i, b in enumerate(order)}
    chain_objs = tuple(
        Chain(chain_id, seq_id, tuple(new_id[b] for b in bin_ids))
        for chain_id, (seq_id, bin_ids) in enumerate(chains)
    )
    return ChunkPlan(chunk_size, seq_lens, tuple(chunks), chain_objs)
