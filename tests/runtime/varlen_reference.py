"""A CPU reference of the ``varlen_attn`` contract, so the ``varlen`` adapter runs in the tests.

Written from the documented semantics of ``torch.nn.attention.varlen.varlen_attn`` and of
FlashAttention's varlen kernels, not from the adapter:

* packed (total tokens, heads, head dim) inputs; ``cu_seq_q`` / ``cu_seq_k`` (int32, N + 1)
  give each sequence's rows; ``max_q`` / ``max_k`` bound their lengths;
* causal attention aligned bottom-right: with n_q queries over n_k keys, query j sees keys
  0 .. j + n_k - n_q;
* grouped-query attention: query head h reads key/value head h // (H / G). FlashAttention's
  varlen forward and backward take G < H natively; torch >= 2.12's ``varlen_attn`` asks for it
  with ``enable_gqa=True`` (and refuses G < H without it), torch 2.11's has no ``enable_gqa``
  and hands k/v to FlashAttention as they are (:func:`torch_varlen_functions` models both);
* the log-sum-exp is returned as (H, total queries) in float32 (or wider for float64 inputs);
* the backward is FlashAttention's, from the saved output and log-sum-exp:
  P = exp(scale * q k^T - lse), dS = P * (dO v^T - rowsum(dO * out)) * scale.

It checks its inputs as the kernels do (last dimension contiguous, int32 boundaries that end at
the totals, equal dtypes, head counts), so a layout mistake in the adapter fails here.

:func:`reference_ops` is the contract as :class:`VarlenOps`; :func:`torch_varlen_functions` is it
behind torch's own ``varlen_attn`` signatures (2.11 and 2.12+) and backward op, for running
:func:`chunkflow.runtime.attention.varlen.torch_varlen_ops`'s binding on CPU.
"""

from __future__ import annotations

import torch

from chunkflow.runtime.attention.varlen import VarlenOps


def _check(q, k, v, cu_q, cu_k, max_q, max_k, *, gqa: bool):
    assert q.dim() == k.dim() == v.dim() == 3, (q.shape, k.shape, v.shape)
    assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    for t in (q, k, v):
        assert t.stride(-1) == 1, "the last dimension must be contiguous"
    assert cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    assert int(cu_q[0]) == int(cu_k[0]) == 0
    assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0], (cu_q, cu_k, q.shape, k.shape)
    q_lens, k_lens = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    assert max(q_lens) == max_q and max(k_lens) == max_k, (q_lens, k_lens, max_q, max_k)
    assert all(nk >= nq > 0 for nq, nk in zip(q_lens, k_lens)), (q_lens, k_lens)
    h, g = q.shape[1], k.shape[1]
    assert h == g or (gqa and h % g == 0), f"heads {h} vs {g}, enable_gqa={gqa}"
    return q_lens, k_lens


def _scores(q_i, k_i, scale):
    """(H, n_q, n_k) scaled scores with the bottom-right causal mask; k_i already expanded."""
    s = torch.einsum("qhd,khd->hqk", q_i, k_i) * scale
    n_q, n_k = q_i.shape[0], k_i.shape[0]
    mask = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
    return s.masked_fill(~mask, float("-inf"))


def _expand(x, h):
    return x.repeat_interleave(h // x.shape[1], dim=1)


def reference_ops(*, gqa: bool = True) -> VarlenOps:
    """The contract on CPU; ``gqa=False`` stands for a kernel that takes only as many
    key/value heads as query heads (the adapter then expands them)."""

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale):
        q_lens, k_lens = _check(q, k, v, cu_q, cu_k, max_q, max_k, gqa=reference.gqa)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=acc)
        for i in range(len(q_lens)):
            qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            s = _scores(q[qs].to(acc), _expand(k[ks], q.shape[1]).to(acc), scale)
            lse[:, qs] = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse[:, qs, None])
            out[qs] = torch.einsum("hqk,khd->qhd", p, _expand(v[ks], q.shape[1]).to(acc)).to(q.dtype)
        return out, lse

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, scale):
        q_lens, _ = _check(q, k, v, cu_q, cu_k, max_q, max_k, gqa=reference.gqa)
        assert dout.shape == out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
        acc = torch.promote_types(q.dtype, torch.float32)
        h, g = q.shape[1], k.shape[1]
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc) for t in (q, k, v))
        for i in range(len(q_lens)):
            qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            q_i, do_i, o_i = (t[qs].to(acc) for t in (q, dout, out))
            k_i, v_i = _expand(k[ks], h).to(acc), _expand(v[ks], h).to(acc)
            p = torch.exp(_scores(q_i, k_i, scale) - lse[:, qs, None])     # (H, n_q, n_k)
            dv_i = torch.einsum("hqk,qhd->khd", p, do_i)
            dp = torch.einsum("qhd,khd->hqk", do_i, v_i)
            delta = (do_i * o_i).sum(-1).transpose(0, 1)[:, :, None]      # (H, n_q, 1)
            ds = p * (dp - delta) * scale
            dq[qs] = torch.einsum("hqk,khd->qhd", ds, k_i)
            dk_i = torch.einsum("hqk,qhd->khd", ds, q_i)
            # query heads sharing a key/value head: their gradients add up
            dk[ks] += dk_i.view(dk_i.shape[0], g, h // g, -1).sum(2)
            dv[ks] += dv_i.view(dv_i.shape[0], g, h // g, -1).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    reference = VarlenOps(forward, backward, gqa, name=f"cpu-reference(gqa={gqa})")
    return reference


BACKWARD_ARGUMENTS = ["grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k",
                      "max_q", "max_k", "is_causal", "rng_state", "scale", "window_size"]
"""torch's ``_varlen_attn_backward`` schema (2.11 through 2.13)."""


def torch_varlen_functions(*, enable_gqa_argument: bool, calls: list | None = None):
    """(``varlen_attn``, backward op) with torch's signatures over the reference: with
    ``enable_gqa_argument`` as torch >= 2.12 (fewer key/value heads only with
    ``enable_gqa=True``), without as torch 2.11 (no such argument; k/v go to FlashAttention as
    they are, which groups heads natively). Each call appends (name, q/k/v shapes) to
    ``calls``."""
    from torch.nn.attention.varlen import AuxRequest

    ops = reference_ops(gqa=True)
    calls = [] if calls is None else calls

    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux, scale,
               window_size, enable_gqa):
        calls.append(("forward", query.shape, key.shape, value.shape))
        if enable_gqa_argument and not enable_gqa:
            assert query.shape[1] == key.shape[1], "fewer key/value heads without enable_gqa"
        assert tuple(window_size) == (-1, 0) and isinstance(return_aux, AuxRequest)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        out, lse = ops.forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale)
        return (out, lse) if return_aux.lse else out

    def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                         return_aux=None, scale=None, window_size=(-1, -1)):
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux, scale,
                      window_size, False)

    def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                         return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):
        return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux, scale,
                      window_size, enable_gqa)

    def backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k,
                 is_causal, rng_state, scale=None, window_size=None):
        calls.append(("backward", query.shape, key.shape, value.shape))
        assert is_causal and list(window_size) == [-1, 0]
        return ops.backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q,
                            max_k, scale=scale)

    return (varlen_attn_2_12 if enable_gqa_argument else varlen_attn_2_11), backward
