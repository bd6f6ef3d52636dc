"""What a model's attention calls while the engine runs one chunk.

:class:`ChunkAttention` is the ``attention`` argument of a chunk's forward (the reference model's
and, through the transformers adapter, a Hugging Face model's): each layer's call is one kernel
call over the whole chunk, its segments bound to their chains' key/value state
(:class:`BoundSegment`), so a chain's later chunk attends to its earlier ones.

:class:`ChunkRows`: which rows of a chunk this rank runs (all of them, unless sequence
parallelism provides a :class:`chunkflow.parallel.tensor.SequenceShard`). Padding rows attend to
nothing, are attended by nothing and carry no target, so they change no loss or gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from chunkflow.runtime.attention import ChainSlot, ChunkView, KeptAttention, chunk_attention
from chunkflow.runtime.kv_state import ChainState


@runtime_checkable
class ChunkModel(Protocol):
    """What the engine runs a chunk through: chunkflow's reference model is one; another model
    kind gets one from :func:`chunkflow.models.adapter.chunk_model`. Optionally also
    ``step_scope()`` (the context a step's actions run in: forwards, and backwards that
    recompute checkpointed layers),
    ``enable_activation_checkpointing()`` and ``input_embedding()`` (the token embedding
    module, None on a later pipeline stage; the zero-bubble schedules' split backward needs
    it on the first stage) and ``decoder_layers()`` (the layer modules; compiled layers
    need it)."""

    config: object
    lm_head: torch.nn.Module | None
    """The output head, whose weight the loss reads (None on an earlier pipeline stage)."""
    layer_ids: tuple[int, ...]
    """The decoder layers' indices in the whole model (a pipeline stage holds some)."""

    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor, attention,
                      activation_checkpointing: bool = False) -> torch.Tensor:
        """(1, L) ids (or a later stage's (1, L, E) hidden states) -> (1, L, E) hidden states."""

    def parameters(self): ...


@dataclass
class BoundSegment:
    """A plan segment bound to its data: where it sits in the chunk and what it attends to."""

    offset: int
    length: int
    start: int
    state: ChainState | None


class ChunkRows:
    """Which rows of a chunk this rank runs outside the tensor-parallel matmuls: the hook through
    which sequence parallelism (:class:`chunkflow.parallel.tensor.SequenceShard`) pads and
    splits a chunk. This base class is one device, or TP without sequence parallelism: the
    whole chunk, as it is."""

    def input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The chunk's (L,) token ids as the embedding takes them."""
        return ids

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The chunk's (L,) positions as attention runs over them."""
        return positions

    def loss_rows(self, targets: torch.Tensor, weights: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (L,) targets and weights of the rows whose loss this rank computes."""
        return targets, weights


class ChunkAttention:
    """The ``attention`` callable a model sees while running one chunk: every layer's call is
    one kernel call over the whole chunk (:func:`chunkflow.runtime.attention.chunk_attention`)."""

    def __init__(self, segments: list[BoundSegment], kernel, *, block_size: int,
                 has_successor: bool, kept: KeptAttention | None = None):
        self.segments, self.kernel, self.block_size = segments, kernel, block_size
        self.has_successor, self.kept = has_successor, kept
        self.bounds = tuple((s.offset, s.length) for s in segments)
        self.num_tokens = sum(s.length for s in segments)
        # One causal segment, nothing carried in or out: plain causal attention, which a kernel
        # that computes what SDPA computes hands to it (autograd in C++, no Python Function).
        self.plain_causal = (getattr(kernel, "causal_sdpa", False) and len(segments) == 1
                             and segments[0].state is None and kept is None)
        self.compiled_key: int | None = None  # compiled layers: see chunkflow.runtime.compiled
        self.lse_shapes: dict[int, torch.Size] = {}

    def __call__(self, layer_idx: int, q, k, v, *, scale: float | None = None) -> torch.Tensor:
        """(1, H, L, D) queries, (1, G, L, D) keys/values -> (1, H, L, D); scores scaled by
        ``scale`` (default 1/sqrt(D)). Rows past the chunk's tokens (a sequence-parallel
        chunk's padding) are left out, and their output is zero."""
        pad = q.shape[2] - self.num_tokens
        if pad:
            n = self.num_tokens
            out = self._attend(layer_idx, q[:, :, :n], k[:, :, :n], v[:, :, :n], scale)
            return F.pad(out, (0, 0, 0, pad))
        return self._attend(layer_idx, q, k, v, scale)

    def _attend(self, layer_idx: int, q, k, v, scale: float | None) -> torch.Tensor:
        q, k, v, scale = attention_inputs(q, k, v, scale)
        if self.plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)
        return chunk_attention(q, k, v, self.view(layer_idx, scale), self.kernel,
                               layer_idx=layer_idx, kept=self.kept)

    def view(self, layer_idx: int, scale: float) -> ChunkView:
        """What layer ``layer_idx``'s kernel call sees of this chunk besides q/k/v."""
        first = self.segments[0]
        chain = (None if first.state is None else
                 ChainSlot(first.state, layer_idx, first.start, self.has_successor))
        return ChunkView(self.bounds, chain, scale, self.block_size)


def attention_inputs(q, k, v, scale: float | None):
    """q/k/v as the kernels take them, and the score scale (default 1/sqrt(D)). Under autocast,
    RoPE leaves q/k in float32 while v is bf16; SDPA's autocast rule casts all three to the
    autocast dtype (float64 excepted, as autocast never casts it). Do the same before anything
    reaches the state. (Compiled layers' attention calls this too.)"""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t if t.dtype == torch.float64 else t.to(dtype) for t in (q, k, v))
    return q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
