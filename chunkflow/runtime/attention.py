"""Chunk attention over a carried key/value prefix, without a mask over the prefix.

Queries of a chain chunk attend to [prefix ; own] with the causal diagonal aligned to the end of
the prefix. We split the keys into disjoint partitions (prefix blocks of at most one chunk, then
the chunk's own keys), run one attention call per partition that returns its output and
log-sum-exp (LSE), and merge them: ``lse = logaddexp(lse_a, lse_b)``,
``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``. Prefix blocks need no mask (every
query sees every prefix key) and the own part is an ordinary square causal attention, so no tensor
of size (chunk x prefix) is ever built, and every temporary is bounded by the chunk size.

Backward uses the ring-attention identity: a flash-attention backward run on one key partition
with the *merged* output and LSE yields exactly that partition's dK, dV and its share of dQ
(P = exp(S - lse) and D = rowsum(dO * O) are global quantities). The prefix gradients do not
flow through autograd: they are added straight into the chain state's float32 gradient buffers
(the schedule guarantees every later chunk has run backward before they are read).

A :class:`AttentionKernel` is the seam for other backends: anything that returns (out, lse) and
its partition backward. ``SDPACPUKernel`` (the CPU default) wraps PyTorch's CPU flash kernel;
``MathKernel`` is plain PyTorch for any device and dtype. GPU backends (FlexAttention,
flash-attn varlen) plug in here.

Shape legend: H query heads, G key/value heads, L query length, S key length, D head dim.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionKernel(Protocol):
    name: str

    def forward(self, q, k, v, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q (1, H, L, D), k/v (1, H, S, D) -> out (1, H, L, D), lse (1, H, L) in float32+."""

    def backward(self, dout, q, k, v, out, lse, *, causal: bool, scale: float):
        """Gradients (dq, dk, dv) of this key partition, given the merged ``out`` and ``lse``."""


class SDPACPUKernel:
    """PyTorch's CPU flash-attention kernel (the one SDPA dispatches to on CPU)."""

    name = "sdpa"

    def forward(self, q, k, v, *, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)


class MathKernel:
    """Plain PyTorch, any device and dtype; materialises the (L, S) scores of one call."""

    name = "math"

    @staticmethod
    def _scores(q, k, causal, scale):
        acc = torch.promote_types(q.dtype, torch.float32)  # scores in fp32 even for bf16 inputs
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        if causal:  # square, top-left aligned: only used on a chunk's own keys
            L, S = s.shape[-2:]
            s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1),
                              float("-inf"))
        return s

    def forward(self, q, k, v, *, causal, scale):
        s = self._scores(q, k, causal, scale)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.to(s.dtype))
        return out, lse  # out stays in fp32: the merge casts once at the end

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        acc = torch.promote_types(q.dtype, torch.float32)
        p = torch.exp(self._scores(q, k, causal, scale) - lse[..., None])  # (1, H, L, S)
        dv = torch.matmul(p.transpose(-1, -2), dout.to(acc))
        dp = torch.matmul(dout.to(acc), v.to(acc).transpose(-1, -2))
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, k.to(acc))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


ATTENTION_BACKENDS = ("auto", "sdpa", "math")


def get_kernel(name: str, device: torch.device) -> AttentionKernel:
    """"auto" picks the CPU flash kernel on CPU and, until GPU backends land, "math" elsewhere."""
    if name == "auto":
        return SDPACPUKernel() if device.type == "cpu" else MathKernel()
    if name == "sdpa":
        if device.type != "cpu":
            raise ValueError(f"attention backend 'sdpa' (the CPU flash kernel) needs a CPU model, "
                             f"the model is on {device}; use 'auto' or 'math'")
        return SDPACPUKernel()
    if name == "math":
        return MathKernel()
    raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(ATTENTION_BACKENDS)}")


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(1, G, S, D) -> (1, H, S, D): query head h uses key/value head h // (H/G), as in HF."""
    b, g, s, d = x.shape
    if g == num_heads:
        return x
    return x[:, :, None].expand(b, g, num_heads // g, s, d).reshape(b, num_heads, s, d)


def reduce_kv(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Gradient of :func:`expand_kv`: (1, H, S, D) -> (1, G, S, D)."""
    b, h, s, d = x.shape
    if h == num_kv_heads:
        return x
    return x.view(b, num_kv_heads, h // num_kv_heads, s, d).sum(2)


class PrefixKV:
    """The first ``length`` positions of one layer of a chain's state: what a chunk attends to.

    Attention runs over it in blocks of at most ``block_size`` keys, so every temporary
    (per-block output, dK/dV) is bounded by the block, never by the prefix length.
    """

    __slots__ = ("state", "layer_idx", "length", "block_size")

    def __init__(self, state, layer_idx: int, length: int, block_size: int):
        self.state, self.layer_idx = state, layer_idx
        self.length, self.block_size = length, block_size

    def blocks(self):
        for start in range(0, self.length, self.block_size):
            yield start, min(start + self.block_size, self.length)

    def kv(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1, G, end - start, D) of positions [start, end): views, no copy."""
        k, v = self.state.k[self.layer_idx], self.state.v[self.layer_idx]
        return k[:, :, start:end], v[:, :, start:end]

    def add_grad(self, start: int, end: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        grad_k, grad_v = self.state.grads(self.layer_idx)
        grad_k[:, :, start:end] += dk.to(grad_k.dtype)
        grad_v[:, :, start:end] += dv.to(grad_v.dtype)


def _merge_into(out, lse, out_b, lse_b):
    """Fold a partial over other keys into ``out`` (in place, lse dtype); return the new lse.

    One fp32 accumulator serves every block, rather than a fresh output tensor per block.
    """
    new = torch.logaddexp(lse, lse_b)
    out.mul_(torch.exp(lse - new)[..., None])
    out.add_(torch.exp(lse_b - new)[..., None] * out_b.to(out.dtype))
    return new


def _fold(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(1, H, L, ...) -> (1, G, (H/G)*L, ...): query heads sharing a key/value head become one
    longer query row. Exact for unmasked attention (the prefix blocks), where query order does
    not matter; it spares expanding the prefix's keys/values to H heads."""
    b, h = x.shape[:2]
    return x.reshape(b, num_kv_heads, (h // num_kv_heads) * x.shape[2], *x.shape[3:])


def _unfold(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`_fold`: (1, G, (H/G)*L, ...) -> (1, H, L, ...)."""
    b, g = x.shape[:2]
    return x.reshape(b, num_heads, (g * x.shape[2]) // num_heads, *x.shape[3:])


class _PrefixCausalAttention(torch.autograd.Function):
    """Autocast is off inside: the caller already cast q/k/v, and the kernels' fp32 accumulation
    (scores, LSE, merge, dq) must not be cast back down to bf16."""

    @staticmethod
    def forward(ctx, q, k, v, prefix: PrefixKV, kernel: AttentionKernel, scale: float):
        with torch.autocast(q.device.type, enabled=False):
            return _PrefixCausalAttention._forward(ctx, q, k, v, prefix, kernel, scale)

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            return _PrefixCausalAttention._backward(ctx, dout)

    @staticmethod
    def _forward(ctx, q, k, v, prefix: PrefixKV, kernel: AttentionKernel, scale: float):
        h, g = q.shape[1], k.shape[1]
        out, lse = kernel.forward(q, expand_kv(k, h), expand_kv(v, h), causal=True, scale=scale)
        out = out.to(lse.dtype)  # accumulate in fp32 (or wider); a no-op for fp32 inputs
        q_folded = _fold(q, g)
        for start, end in prefix.blocks():
            out_b, lse_b = kernel.forward(q_folded, *prefix.kv(start, end), causal=False,
                                          scale=scale)
            lse = _merge_into(out, lse, _unfold(out_b, h), _unfold(lse_b, h))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        # The prefix is state, not an autograd input; it is never modified while a graph lives.
        ctx.prefix, ctx.kernel, ctx.scale = prefix, kernel, scale
        return out

    @staticmethod
    def _backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        prefix, kernel, scale = ctx.prefix, ctx.kernel, ctx.scale
        h, g = q.shape[1], k.shape[1]
        dout = dout.contiguous()
        dq, dk, dv = kernel.backward(dout, q, expand_kv(k, h), expand_kv(v, h), out, lse,
                                     causal=True, scale=scale)
        dq = dq.to(lse.dtype)  # sum the blocks' shares of dq in fp32, cast once
        folded = [_fold(t, g) for t in (dout, q, out, lse)]
        for start, end in prefix.blocks():
            dq_b, dk_b, dv_b = kernel.backward(folded[0], folded[1], *prefix.kv(start, end),
                                               folded[2], folded[3], causal=False, scale=scale)
            dq += _unfold(dq_b, h)
            prefix.add_grad(start, end, dk_b, dv_b)
        return dq.to(q.dtype), reduce_kv(dk, g), reduce_kv(dv, g), None, None, None


def prefix_causal_attention(q, k, v, prefix: PrefixKV | None, kernel: AttentionKernel):
    """Attention of q (1, H, L, D) over [prefix ; own k/v (1, G, L, D)], causal aligned to the end.

    Without a prefix this is plain causal SDPA. Prefix gradients go into the chain state.
    """
    if prefix is None or prefix.length == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return _PrefixCausalAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), prefix,
                                        kernel, scale)
