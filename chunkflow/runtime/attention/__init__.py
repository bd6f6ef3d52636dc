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

Selective recompute (:class:`KeptAttention`): a chunk's state-only forward keeps each layer's
attention output and log-sum-exp; its recompute then returns the kept output instead of running
the kernel, and the backward is the kernel's usual one (which reads q, k, v, out and the LSE),
so the recompute skips the attention forward and the gradients do not change.

q/k/v and dout reach the kernel in the memory layout it reads (its ``state_layout``): ``bhsd``
contiguous (1, H, L, D), or ``thd``, (1, H, L, D) views of token-major (L, H, D) memory, which
is what the models' ``(1, L, H, D).transpose(1, 2)`` already is: at most one copy per tensor,
none where the layout already fits.

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

from chunkflow.runtime.kv_state import ChainState, host_buffers


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
    """Chunk size: ``cpu-flash`` attends to the prefix in blocks of this many keys (at least
    :data:`chunkflow.runtime.attention.cpu_flash.MIN_PREFIX_BLOCK`)."""

    @property
    def prefix_len(self) -> int:
        return 0 if self.chain is None else self.chain.start


class ChunkKernel(Protocol):
    name: str
    state_layout: str
    """The chain state layout it reads (:data:`chunkflow.runtime.kv_state.LAYOUTS`), and the
    memory layout its q/k/v and dout are handed over in (see :func:`arrange`)."""

    def state_capacity(self, seq_len: int, chunk_size: int) -> int:
        """Key/value rows a chain state needs (``seq_len``: its prefix positions)."""

    # Optional: ``causal_sdpa = True`` says a lone causal segment with no chain computes as
    # ``torch.nn.functional.scaled_dot_product_attention`` computes it; the chunk attention
    # then calls that (:class:`chunkflow.runtime.chunk_call.ChunkAttention`).

    def forward(self, q, k, v, view: ChunkView) -> tuple[torch.Tensor, torch.Tensor]:
        """q (1, H, L, D), own k/v (1, G, L, D) -> out (1, H, L, D) in q's dtype, and the
        log-sum-exp its backward needs (any layout). The own keys are already in the state."""

    def backward(self, dout, q, k, v, out, lse, view: ChunkView):
        """(dq, dk, dv) of q and the own k/v; adds the prefix's dK/dV into the state."""


class KeptAttention:
    """One chunk's attention outputs and log-sum-exps by layer, kept by a selective state-only
    forward (``keep``) for the chunk's recompute, which reads them back (``get``, after
    ``start_reuse``) instead of running the kernel. While kept on the device they are counted
    on ``meter``; once reused they are the recompute's saved tensors (counted as those).

    With a ``copier`` (:class:`chunkflow.runtime.kv_state.Copier`, ``--chunking.offload=all``)
    they are kept in host memory instead: copied out as each layer produces them, and copied
    back a layer ahead of the recompute that reads them. The host buffers of every layer in
    ``layer_ids`` are made at the first ``keep``, in the few pinned pieces
    :func:`chunkflow.plan.memory.kept_attention_host_bytes` prices (``host_bytes``)."""

    def __init__(self, meter=None, copier=None, layer_ids=()):
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reusing = False
        self.nbytes = self.host_bytes = 0
        if copier is not None and not layer_ids:
            raise ValueError("KeptAttention with a copier needs the model's layer_ids")
        self._meter, self._copier, self._layer_ids = meter, copier, sorted(layer_ids)
        self._host: dict = {}  # (layer, "out" | "lse") -> host buffer
        self._pieces: list[torch.Tensor] = []  # the pinned allocations _host views
        self._fetched: dict[int, tuple] = {}  # offloaded layers on their way back

    def _host_pair(self, layer_idx: int, out: torch.Tensor, lse: torch.Tensor):
        if not self._host:
            specs = [spec for layer in self._layer_ids for spec in (
                ((layer, "out"), out.shape, out.dtype), ((layer, "lse"), lse.shape, lse.dtype))]
            self._host, self._pieces, self.host_bytes = host_buffers(self._copier, specs)
        if (layer_idx, "out") not in self._host:
            raise RuntimeError(f"layer {layer_idx}: attention outputs kept for a layer outside "
                               f"the model's layers {self._layer_ids}")
        return self._host[layer_idx, "out"], self._host[layer_idx, "lse"]

    def keep(self, layer_idx: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        if layer_idx in self.outputs:  # a chunk's layer runs once per forward
            raise RuntimeError(f"layer {layer_idx}: attention outputs kept twice for one chunk")
        out, lse = out.detach(), lse.detach()
        if self._copier is not None:
            host = self._host_pair(layer_idx, out, lse)
            self._copier.to_host(host[0], out, "attention_out", layer_idx)
            self._copier.to_host(host[1], lse, "attention_lse", layer_idx)
            self.outputs[layer_idx] = host
            return
        self.outputs[layer_idx] = (out, lse)
        nbytes = out.nbytes + lse.nbytes
        self.nbytes += nbytes
        if self._meter is not None:
            self._meter.add(nbytes)

    def start_reuse(self) -> None:
        """The recompute begins: from here on the outputs are read, not kept."""
        self.reusing = True
        if self._meter is not None:
            self._meter.add(-self.nbytes)
        if self._copier is not None and self.outputs:
            self._prefetch(min(self.outputs))

    def _prefetch(self, layer_idx: int) -> None:
        if layer_idx in self.outputs and layer_idx not in self._fetched:
            out, lse = self.outputs[layer_idx]
            self._fetched[layer_idx] = (
                self._copier.to_device(out, "attention_out", layer_idx),
                self._copier.to_device(lse, "attention_lse", layer_idx))

    def get(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.outputs:
            raise RuntimeError(f"layer {layer_idx}: no attention output was kept for this "
                               f"chunk's recompute (kept: {sorted(self.outputs)})")
        if self._copier is None:
            return self.outputs[layer_idx]
        self._prefetch(layer_idx)
        later = [i for i in self.outputs if i > layer_idx]
        if later:
            self._prefetch(min(later))  # the next layer's, behind this layer's compute
        # Kept until the chunk is done: activation checkpointing may read a layer again.
        (out, e1), (lse, e2) = self._fetched[layer_idx]
        self._copier.wait(out, e1)
        self._copier.wait(lse, e2)
        self._fetched[layer_idx] = ((out, None), (lse, None))
        return out, lse


def attend(q, k, v, view: ChunkView, kernel: ChunkKernel, layer_idx: int,
           kept: KeptAttention | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of one layer's chunk attention, outside autograd: writes the chain
    segment's own keys/values into the state, then runs the kernel (or, once ``kept`` is
    reusing, takes its kept output). Returns the result, and the output and LSE the backward
    reads (the result is a fresh tensor where the output is a kept one)."""
    with torch.autocast(q.device.type, enabled=False):
        if view.chain is not None:
            c = view.chain
            c.state.write(c.layer_idx, c.start, k.detach(), v.detach())
        if kept is not None and kept.reusing:
            out, lse = kept.get(layer_idx)
            if out.shape != q.shape:
                raise RuntimeError(f"layer {layer_idx}: kept attention output "
                                   f"{tuple(out.shape)} does not fit queries {tuple(q.shape)}")
            # The backward reads the kept tensor; the output is a fresh one (autograd gives
            # an output its grad_fn, which a tensor kept outside must not get).
            return out.clone(), out, lse
        out, lse = kernel.forward(q, k, v, view)
        if kept is not None:
            kept.keep(layer_idx, out, lse)
        return out, out, lse


def attend_backward(dout, q, k, v, out, lse, view: ChunkView, kernel: ChunkKernel):
    """The backward of :func:`attend`: (dq, dk, dv) of q and the own k/v, the prefix's dK/dV
    added into the state, and what later chunks of the chain sent back for the own keys added
    to dk/dv."""
    with torch.autocast(dout.device.type, enabled=False):
        dout = arrange(dout, kernel.state_layout)
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, view)
        c = view.chain
        if c is not None and c.has_successor:
            n = view.segments[0][1]
            gk, gv = c.state.own_grads(c.layer_idx, c.start, n)
            # (the kernels return fresh dk/dv: adding in place is safe)
            dk[:, :, :n] = (dk[:, :, :n].to(gk.dtype) + gk).to(dk.dtype)
            dv[:, :, :n] = (dv[:, :, :n].to(gv.dtype) + gv).to(dv.dtype)
    return dq, dk, dv


class _ChunkAttention(torch.autograd.Function):
    """Autocast is off inside: the caller already cast q/k/v, and the kernels' fp32
    accumulation (scores, LSE, merges) must not be cast back down to bf16."""

    @staticmethod
    def forward(ctx, q, k, v, view: ChunkView, kernel: ChunkKernel, layer_idx: int,
                kept: KeptAttention | None):
        result, out, lse = attend(q, k, v, view, kernel, layer_idx, kept)
        ctx.save_for_backward(q, k, v, out, lse)  # saved tensors: the CPU meter counts them
        ctx.view, ctx.kernel = view, kernel
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attend_backward(dout, q, k, v, out, lse, ctx.view, ctx.kernel)
        return dq, dk, dv, None, None, None, None


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, view: ChunkView,
                    kernel: ChunkKernel, *, layer_idx: int = 0,
                    kept: KeptAttention | None = None) -> torch.Tensor:
    """Attention of a whole chunk: q (1, H, L, D), own k/v (1, G, L, D) -> (1, H, L, D).
    ``kept``: keep this layer's output and LSE in it, or, once reusing, return the kept ones
    without running the kernel."""
    layout = kernel.state_layout
    return _ChunkAttention.apply(arrange(q, layout), arrange(k, layout), arrange(v, layout),
                                 view, kernel, layer_idx, kept)


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(1, H, L, D) ``x`` in a kernel's memory layout: "bhsd", contiguous; "thd", a view of
    token-major (L, H, D) memory. ``x`` itself where it already is, else one copy."""
    if layout == "thd":
        return x[0].transpose(0, 1).contiguous().transpose(0, 1)[None]
    return x.contiguous()


from chunkflow.runtime.attention.select import ATTENTION_BACKENDS, get_kernel  # noqa: E402

__all__ = ["ATTENTION_BACKENDS", "ChainSlot", "ChunkKernel", "ChunkView", "KeptAttention",
           "arrange", "attend", "attend_backward", "chunk_attention", "get_kernel"]
