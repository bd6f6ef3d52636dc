"""``math``: plain PyTorch attention in tiles, on any device and dtype (the fallback).

Queries are processed in tiles of ``tile_size`` and keys in blocks of ``tile_size`` (the chain
segment's prefix blocks from the state, then the segment's own keys up to the causal diagonal),
with an online softmax across key blocks (running log-sum-exp, fp32 accumulators). So no
temporary exceeds (tile x tile) scores per head: the scores of a whole chunk against its prefix
(28 heads x 8K x 8K x 4 bytes = 7 GiB at an 8K chunk) are never built. Grouped-query attention
runs as a broadcast over the key/value heads, so keys are never expanded to the query heads.

Backward recomputes each (tile, block) score tile from q, k and the saved LSE (the flash
attention backward, in PyTorch): dS = P * (dP - rowsum(dO * O)) * scale. The prefix's dK/dV go
into the chain state's gradient buffers, block by block.

Shape legend: G key/value heads, r = H / G query heads per key/value head, t query tile,
s key block, D head dim.
"""

from __future__ import annotations

import torch

from chunkflow.runtime.attention import ChunkView


def _blocks(start: int, end: int, size: int):
    for a in range(start, end, size):
        yield a, min(a + size, end)


class TiledMathKernel:
    """Online-softmax attention in (tile x tile) pieces; see the module docstring."""

    name = "math"
    state_layout = "bhsd"

    def __init__(self, tile_size: int = 256):
        if tile_size < 1:
            raise ValueError(f"tile_size={tile_size}: must be a positive integer")
        self.tile_size = tile_size

    def state_capacity(self, seq_len: int, chunk_size: int) -> int:
        return seq_len

    def _key_blocks(self, view: ChunkView, k, v, seg: int, q_end: int):
        """(source, start, end, keys, values) of each key block a query tile ending at segment
        position ``q_end`` sees: prefix blocks (state positions), then own blocks (segment
        positions), keys and values as (1, G, 1, s, D)."""
        o, _ = view.segments[seg]
        if seg == 0 and view.prefix_len:
            c = view.chain
            for a, b in _blocks(0, c.start, self.tile_size):
                kb, vb = c.state.keys(c.layer_idx, a, b)
                yield "prefix", a, b, kb[:, :, None], vb[:, :, None]
        for a, b in _blocks(0, q_end, self.tile_size):
            yield "own", a, b, k[:, :, None, o + a:o + b], v[:, :, None, o + a:o + b]

    def _scores(self, qt, kb, q_start: int, source: str, a: int, scale: float, acc):
        """(1, G, r, t, s) scaled scores, the own block's future keys at -inf."""
        s = torch.matmul(qt, kb.to(acc).transpose(-1, -2)) * scale
        if source == "own" and a + s.shape[-1] > q_start:  # the block reaches the diagonal
            q_pos = torch.arange(q_start, q_start + s.shape[-2], device=s.device)[:, None]
            k_pos = torch.arange(a, a + s.shape[-1], device=s.device)[None, :]
            s = s.masked_fill(k_pos > q_pos, float("-inf"))
        return s

    def forward(self, q, k, v, view: ChunkView):
        acc = torch.promote_types(q.dtype, torch.float32)
        b_, h, length, d = q.shape
        g = k.shape[1]
        out = torch.zeros(1, h, length, d, dtype=acc, device=q.device)
        lse = torch.empty(1, h, length, dtype=acc, device=q.device)
        for seg, (o, n) in enumerate(view.segments):
            for qa, qb in _blocks(0, n, self.tile_size):
                qt = q[:, :, o + qa:o + qb].reshape(1, g, h // g, qb - qa, d).to(acc)
                o_t = torch.zeros_like(qt)
                m_t = torch.full(qt.shape[:-1], float("-inf"), dtype=acc, device=q.device)
                for source, a, _, kb, vb in self._key_blocks(view, k, v, seg, qb):
                    s = self._scores(qt, kb, qa, source, a, view.scale, acc)
                    m_new = torch.logaddexp(m_t, torch.logsumexp(s, dim=-1))
                    o_t.mul_(torch.exp(m_t - m_new)[..., None])
                    o_t.add_(torch.matmul(torch.exp(s - m_new[..., None]), vb.to(acc)))
                    m_t = m_new
                out[:, :, o + qa:o + qb] = o_t.reshape(1, h, qb - qa, d)
                lse[:, :, o + qa:o + qb] = m_t.reshape(1, h, qb - qa)
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, view: ChunkView):
        acc = torch.promote_types(q.dtype, torch.float32)
        _, h, length, d = q.shape
        g = k.shape[1]
        r = h // g
        dq = torch.zeros(1, h, length, d, dtype=acc, device=q.device)
        dk = torch.zeros(1, g, length, d, dtype=acc, device=q.device)
        dv = torch.zeros_like(dk)
        delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (1, H, L)
        for seg, (o, n) in enumerate(view.segments):
            for qa, qb in _blocks(0, n, self.tile_size):
                t, sl = qb - qa, slice(o + qa, o + qb)
                qt = q[:, :, sl].reshape(1, g, r, t, d).to(acc)
                dot = dout[:, :, sl].reshape(1, g, r, t, d).to(acc)
                lse_t = lse[:, :, sl].reshape(1, g, r, t)
                delta_t = delta[:, :, sl].reshape(1, g, r, t)
                dq_t = torch.zeros_like(qt)
                for source, a, b, kb, vb in self._key_blocks(view, k, v, seg, qb):
                    p = torch.exp(self._scores(qt, kb, qa, source, a, view.scale, acc)
                                  - lse_t[..., None])                      # (1, G, r, t, s)
                    dv_b = torch.matmul(p.transpose(-1, -2), dot).sum(2)   # (1, G, s, D)
                    dp = torch.matmul(dot, vb.to(acc).transpose(-1, -2))
                    ds = p * (dp - delta_t[..., None]) * view.scale
                    dq_t += torch.matmul(ds, kb.to(acc))
                    dk_b = torch.matmul(ds.transpose(-1, -2), qt).sum(2)   # (1, G, s, D)
                    if source == "prefix":
                        c = view.chain
                        c.state.add_grad(c.layer_idx, a, dk_b, dv_b)
                    else:
                        dk[:, :, o + a:o + b] += dk_b
                        dv[:, :, o + a:o + b] += dv_b
                dq[:, :, sl] = dq_t.reshape(1, h, t, d)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
