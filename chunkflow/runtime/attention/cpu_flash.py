"""``cpu-flash``: PyTorch's CPU flash-attention kernel, segment by segment (the CPU default).

A packed segment is one causal call on its own keys. The chain segment attends to [prefix ;
own] with the causal diagonal aligned to the end of the prefix: the keys are split into
disjoint partitions (prefix blocks of the chunk size's keys, at least :data:`MIN_PREFIX_BLOCK`,
then the segment's own keys),
one call per partition returns its output and log-sum-exp (LSE), and they are merged:
``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``.
Prefix blocks need no mask (every query sees every prefix key) and the own part is an ordinary
square causal attention, so no tensor of size (chunk x prefix) is ever built, and every
temporary is bounded by the block.

Backward uses the ring-attention identity: a flash-attention backward run on one key partition
with the *merged* output and LSE yields exactly that partition's dK, dV and its share of dQ
(P = exp(S - lse) and D = rowsum(dO * O) are global quantities). The prefix gradients go
straight into the chain state's gradient buffers.

The CPU flash kernel is a private ATen op (SDPA dispatches to it on CPU); :func:`flash_forward`
and :func:`flash_backward` are the only places that name it (a test fails if a release renames
it).

Shape legend: H query heads, G key/value heads, L query length, S key length, D head dim.
"""

from __future__ import annotations

import torch

from chunkflow.runtime.attention import ChunkView


def flash_forward(q, k, v, *, causal: bool, scale: float):
    """q (1, H, L, D), k/v (1, H, S, D) -> out (1, H, L, D), lse (1, H, L) (float32 or wider)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale)


def flash_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    """(dq, dk, dv) of one key partition, given the merged ``out`` and ``lse``."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale)


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


def fold(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(1, H, L, ...) -> (1, G, (H/G)*L, ...): query heads sharing a key/value head become one
    longer query row. Exact for unmasked attention (the prefix blocks), where query order does
    not matter; it spares expanding the prefix's keys/values to H heads."""
    b, h = x.shape[:2]
    return x.reshape(b, num_kv_heads, (h // num_kv_heads) * x.shape[2], *x.shape[3:])


def unfold(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`fold`: (1, G, (H/G)*L, ...) -> (1, H, L, ...)."""
    b, g = x.shape[:2]
    return x.reshape(b, num_heads, (g * x.shape[2]) // num_heads, *x.shape[3:])


def merge_into(out, lse, out_b, lse_b):
    """Fold a partial over other keys into ``out`` (in place, lse dtype); return the new lse.

    One fp32 accumulator serves every block, rather than a fresh output tensor per block."""
    new = torch.logaddexp(lse, lse_b)
    out.mul_(torch.exp(lse - new)[..., None])
    out.add_(torch.exp(lse_b - new)[..., None] * out_b.to(out.dtype))
    return new


MIN_PREFIX_BLOCK = 2048
"""Keys per prefix block at least: small chunks would otherwise cost a kernel call (forward and
backward) and a merge per chunk of prefix, host work that outgrows the compute (chains of
128-token chunks: 7 calls for a 1024-token prefix). A block's temporaries are its keys'
gradients, 2048 x G x D values: 16 MiB in float32 at G=8, D=128."""


def prefix_blocks(prefix_len: int, block_size: int):
    for start in range(0, prefix_len, block_size):
        yield start, min(start + block_size, prefix_len)


class CPUFlashKernel:
    """The chunk's segments one by one over the CPU flash kernel (see the module docstring)."""

    name = "cpu-flash"
    state_layout = "bhsd"
    causal_sdpa = True
    """A lone causal segment without a chain is SDPA's CPU flash kernel, as here: the chunk
    attention calls ``scaled_dot_product_attention`` for it (GQA native, autograd in C++)."""

    def __init__(self, *, prefix_block: int | None = None):
        """``prefix_block``: keys per prefix block (default: the chunk size, at least
        :data:`MIN_PREFIX_BLOCK`)."""
        self.prefix_block = prefix_block

    def _blocks(self, view: ChunkView):
        return prefix_blocks(view.chain.start,
                             self.prefix_block or max(view.block_size, MIN_PREFIX_BLOCK))

    def state_capacity(self, seq_len: int, chunk_size: int) -> int:
        return seq_len

    def forward(self, q, k, v, view: ChunkView):
        h, g = q.shape[1], k.shape[1]
        outs, lses = [], []
        for i, (o, n) in enumerate(view.segments):
            q_s, k_s, v_s = q[:, :, o:o + n], k[:, :, o:o + n], v[:, :, o:o + n]
            out, lse = flash_forward(q_s, expand_kv(k_s, h), expand_kv(v_s, h), causal=True,
                                     scale=view.scale)
            if i == 0 and view.prefix_len:
                c = view.chain
                out = out.to(lse.dtype)  # accumulate in fp32 (or wider)
                q_folded = fold(q_s, g)
                for start, end in self._blocks(view):
                    out_b, lse_b = flash_forward(q_folded, *c.state.keys(c.layer_idx, start, end),
                                                 causal=False, scale=view.scale)
                    lse = merge_into(out, lse, unfold(out_b, h), unfold(lse_b, h))
            outs.append(out.to(q.dtype))
            lses.append(lse)
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)

    def backward(self, dout, q, k, v, out, lse, view: ChunkView):
        h, g = q.shape[1], k.shape[1]
        dqs, dks, dvs = [], [], []
        for i, (o, n) in enumerate(view.segments):
            sl = slice(o, o + n)
            d_s, q_s, o_s, l_s = dout[:, :, sl], q[:, :, sl], out[:, :, sl], lse[:, :, sl]
            dq, dk, dv = flash_backward(d_s, q_s, expand_kv(k[:, :, sl], h),
                                        expand_kv(v[:, :, sl], h), o_s, l_s, causal=True,
                                        scale=view.scale)
            if i == 0 and view.prefix_len:
                c = view.chain
                dq = dq.to(lse.dtype)  # sum the blocks' shares of dq in fp32, cast once
                folded = [fold(t, g) for t in (d_s, q_s, o_s, l_s)]
                for start, end in self._blocks(view):
                    dq_b, dk_b, dv_b = flash_backward(
                        folded[0], folded[1], *c.state.keys(c.layer_idx, start, end),
                        folded[2], folded[3], causal=False, scale=view.scale)
                    dq += unfold(dq_b, h)
                    c.state.add_grad(c.layer_idx, start, dk_b, dv_b)
            dqs.append(dq.to(q.dtype))
            dks.append(reduce_kv(dk, g))
            dvs.append(reduce_kv(dv, g))
        if len(dqs) == 1:
            return dqs[0], dks[0], dvs[0]
        return torch.cat(dqs, 2), torch.cat(dks, 2), torch.cat(dvs, 2)
