"""Chunk attention: one call per layer per chunk, whatever the device.

A chunk is segments laid out one after another (``ChunkView.segments``: offset and length in the
chunk); each attends causally to itself only, and the chain segment (at most one, the first)
also to its prefix, the keys/values of the chain's earlier chunks in the chain state. One kernel
call sees the whole chunk: the queries of every segment, the chunk's own keys/values, the
segment boundaries and the chain segment's prefix.

:func:`chunk_attention` is chunkflow's own autograd Function around the kernel, so the chain
state is never an autograd input (later writes to it cannot trip autograd's version checks):

* forward writes the chain segment's own keys/values into the state (where later chunks, and
  kernels that read prefix + own keys as one contiguous view, find them), then runs the kernel;
* backward runs the kernel's backward: dq and the own dk/dv, with the prefix's dK/dV added into
  the state's float32 gradient buffers; then it adds to the own dk/dv what later chunks of the
  chain sent back for these keys (already complete: the schedule runs a chain's backwards in
  descending order). Every gradient of a chunk's keys thus flows through this one Function,
  which is also why activation checkpointing inside a chunk (transformers'
  ``gradient_checkpointing_enable``, reentrant or not) stays exact: a recomputed forward writes
  the same keys again and the backward runs once.

Backends (:mod:`.cpu_flash`, :mod:`.tiled`, :mod:`.varlen`) implement :class:`ChunkKernel`;
:func:`get_kernel` picks one by name, or by ``"auto"`` for the device and dtype (see
:mod:`.select`).

Shape legend: H query heads, G key/value heads, L chunk length, n segment length, P prefix
length, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from chunkflow.runtime.kv_state import ChainState


@dataclass(frozen=True)
class ChainSlot:
    """The chain segment's place in its chain: the state, this layer, and where it starts."""

    state: ChainState
    layer_idx: int
    start: int
    """The segment's first position in the sequence = the prefix length."""
    has_successor: bool
    """Later chunks of the chain read these keys (and send their gradients back)."""


@dataclass(frozen=True)
class ChunkView:
    """What one attention call sees of a chunk besides q/k/v."""

    segments: tuple[tuple[int, int], ...]
    """(offset in the chunk, length) of each segment, in order."""
    chain: ChainSlot | None
    """The first segment's chain, when it is a chain segment."""
    scale: float
    block_size: int
    """Chunk size: the CPU kernels attend to the prefix in blocks of at most this many keys."""

    @property
    def prefix_len(self) -> int:
        return 0 if self.chain is None else self.chain.start


class ChunkKernel(Protocol):
    name: str
    state_layout: str
    """The chain state layout it reads (:data:`chunkflow.runtime.kv_state.LAYOUTS`)."""

    def state_capacity(self, seq_len: int, chunk_size: int) -> int:
        """Key/value rows a chain state needs (``seq_len``: its prefix positions)."""

    def forward(self, q, k, v, view: ChunkView) -> tuple[torch.Tensor, torch.Tensor]:
        """q (1, H, L, D), own k/v (1, G, L, D) -> out (1, H, L, D) in q's dtype, and the
        log-sum-exp its backward needs (any layout). The own keys are already in the state."""

    def backward(self, dout, q, k, v, out, lse, view: ChunkView):
        """(dq, dk, dv) of q and the own k/v; adds the prefix's dK/dV into the state."""


class _ChunkAttention(torch.autograd.Function):
    """Autocast is off inside: the caller already cast q/k/v, and the kernels' fp32
    accumulation (scores, LSE, merges) must not be cast back down to bf16."""

    @staticmethod
    def forward(ctx, q, k, v, view: ChunkView, kernel: ChunkKernel):
        with torch.autocast(q.device.type, enabled=False):
            if view.chain is not None:
                c = view.chain
                c.state.write(c.layer_idx, c.start, k.detach(), v.detach())
            out, lse = kernel.forward(q, k, v, view)
        ctx.save_for_backward(q, k, v, out, lse)  # saved tensors: the CPU meter counts them
        ctx.view, ctx.kernel = view, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        view = ctx.view
        with torch.autocast(dout.device.type, enabled=False):
            dq, dk, dv = ctx.kernel.backward(dout.contiguous(), q, k, v, out, lse, view)
            c = view.chain
            if c is not None and c.has_successor:
                n = view.segments[0][1]
                gk, gv = c.state.own_grads(c.layer_idx, c.start, n)
                # (the kernels return fresh dk/dv: adding in place is safe)
                dk[:, :, :n] = (dk[:, :, :n].to(gk.dtype) + gk).to(dk.dtype)
                dv[:, :, :n] = (dv[:, :, :n].to(gv.dtype) + gv).to(dv.dtype)
        return dq, dk, dv, None, None


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: ChunkView,
                    kernel: ChunkKernel) -> torch.Tensor:
    """Attention of a whole chunk: q (1, H, L, D), own k/v (1, G, L, D) -> (1, H, L, D)."""
    return _ChunkAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), view, kernel)


from chunkflow.runtime.attention.select import ATTENTION_BACKENDS, get_kernel  # noqa: E402

__all__ = ["ATTENTION_BACKENDS", "ChainSlot", "ChunkKernel", "ChunkView", "chunk_attention",
           "get_kernel"]
