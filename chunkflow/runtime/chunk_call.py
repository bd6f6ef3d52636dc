"""What a model's attention calls while the engine runs one chunk.

:class:`ChunkAttention` is the ``attention`` argument of a chunk's forward (the reference model's
and, through the transformers adapter, a Hugging Face model's): each layer's call is one kernel
call over the whole chunk, its segments bound to their chains' key/value state
(:class:`Segment`), so a chain's later chunk attends to its earlier ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chunkflow.runtime.attention import ChainSlot, ChunkView, KeptAttention, chunk_attention
from chunkflow.runtime.kv_state import ChainState


@dataclass
class Segment:
    """A plan segment bound to its data: where it sits in the chunk and what it attends to."""

    offset: int
    length: int
    start: int
    state: ChainState | None


class ChunkAttention:
    """The ``attention`` callable a model sees while running one chunk: every layer's call is
    one kernel call over the whole chunk (:func:`chunkflow.runtime.attention.chunk_attention`)."""

    def __init__(self, segments: list[Segment], kernel, *, block_size: int,
                 has_successor: bool, kept: KeptAttention | None = None):
        self.segments, self.kernel, self.block_size = segments, kernel, block_size
        self.has_successor, self.kept = has_successor, kept
        self.bounds = tuple((s.offset, s.length) for s in segments)

    def __call__(self, layer_idx: int, q, k, v) -> torch.Tensor:
        # Under autocast, RoPE leaves q/k in float32 while v is bf16; SDPA's autocast rule
        # casts all three to the autocast dtype (float64 excepted, as autocast never casts it).
        # Do the same before anything reaches the state.
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = (t if t.dtype == torch.float64 else t.to(dtype) for t in (q, k, v))
        first = self.segments[0]
        chain = (None if first.state is None else
                 ChainSlot(first.state, layer_idx, first.start, self.has_successor))
        view = ChunkView(self.bounds, chain, 1.0 / math.sqrt(q.shape[-1]), self.block_size)
        return chunk_attention(q, k, v, view, self.kernel, layer_idx=layer_idx, kept=self.kept)
