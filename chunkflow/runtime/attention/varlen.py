"""``varlen`` (CUDA): one ``torch.nn.attention.varlen.varlen_attn`` call covers a whole chunk.

Queries in token-major layout (L, H, D), one sequence per segment (``cu_seq_q``); the chain
segment's keys are its prefix and its own keys, read as one contiguous view of the chain state
(token-major too, with room for the chain's last chunk, whose own keys and packed tail segments
are written there before attention), so no prefix is ever copied and no log-sum-exp merge is
needed: with ``seqlen_k > seqlen_q`` the causal mask is aligned bottom-right, i.e. the chain
segment's queries see the whole prefix. Packed segments are further sequences of the same call
(``cu_seq_k``). Grouped-query attention goes to the kernel where it supports it (``enable_gqa``,
torch >= 2.12), else keys/values are expanded to the query heads for the call.

:class:`VarlenOps` is the contract this adapter relies on (forward with LSE, and its backward):
:func:`torch_varlen_ops` binds it to torch's implementation, feature-detected across releases
(``window_size=(-1, 0)`` or ``is_causal=True``; ``enable_gqa`` only from 2.12). The backward is
a private op of ``torch.nn.attention.varlen``; :func:`_backward_op` is the only place that names
it (a test fails if a release renames it). The tests run this adapter on CPU through a reference
of the same contract.

Shape legend: T tokens, H query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from chunkflow.runtime.attention import ChunkView


@dataclass(frozen=True)
class VarlenOps:
    """``forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, gqa)`` -> (out (Tq, H, D),
    lse): causal attention aligned bottom-right per sequence; ``backward(dout, q, k, v, out,
    lse, cu_q, cu_k, max_q, max_k, *, scale)`` -> (dq, dk, dv). ``gqa``: keys/values may have
    fewer heads than queries."""

    forward: Callable
    backward: Callable
    gqa: bool
    name: str = "torch"


def _backward_op():
    """torch's varlen backward (private: ``torch.ops.torch_attn._varlen_attn_backward``) and
    the names of its arguments (from the op's schema)."""
    import torch.nn.attention.varlen  # noqa: F401  (registers the op)

    op = torch.ops.torch_attn._varlen_attn_backward
    return op, [a.name for a in op.default._schema.arguments]


def torch_varlen_ops() -> VarlenOps | str:
    """torch's ``varlen_attn`` as :class:`VarlenOps`, or why this build cannot provide it.

    Feature-detected: causal by ``window_size=(-1, 0)`` (newer releases) or ``is_causal=True``
    (older); ``scale`` passed where the function takes it (else it must be FlashAttention's
    default 1/sqrt(head dim), which is chunkflow's); ``enable_gqa`` where it exists. The
    backward op is called with its schema's arguments by name."""
    try:
        from torch.nn.attention import varlen
    except ImportError as e:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})"
    params = inspect.signature(varlen.varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return f"torch {torch.__version__}'s varlen_attn takes neither window_size nor is_causal"
    if "return_aux" not in params or not hasattr(varlen, "AuxRequest"):
        return f"torch {torch.__version__}'s varlen_attn cannot return the log-sum-exp"
    takes_scale, gqa = "scale" in params, "enable_gqa" in params
    try:
        backward_op, backward_names = _backward_op()
    except (AttributeError, RuntimeError) as e:
        return f"torch {torch.__version__} has no varlen backward op ({e})"
    known = {"grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k", "max_q",
             "max_k", "is_causal", "rng_state", "scale", "window_size"}
    if not set(backward_names) <= known:
        return (f"torch {torch.__version__}'s varlen backward takes unknown arguments "
                f"{sorted(set(backward_names) - known)}")
    aux = varlen.AuxRequest(lse=True)

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, gqa):
        extra = {"enable_gqa": True} if gqa else {}
        if takes_scale:
            extra["scale"] = scale
        elif abs(scale * q.shape[-1] ** 0.5 - 1) > 1e-6:
            raise ValueError(f"torch {torch.__version__}'s varlen_attn has no scale argument "
                             f"and the scale {scale} is not 1/sqrt(head dim)")
        return varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=aux,
                                  **causal, **extra)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, scale):
        values = {"grad_out": dout, "query": q, "key": k, "value": v, "out": out, "lse": lse,
                  "cu_seq_q": cu_q, "cu_seq_k": cu_k, "max_q": max_q, "max_k": max_k,
                  "is_causal": True, "window_size": [-1, 0], "scale": scale,
                  # no dropout: the state the forward returns is zeros
                  "rng_state": torch.zeros((2,), dtype=torch.uint64, device=q.device)}
        return backward_op(*(values[name] for name in backward_names))

    return VarlenOps(forward, backward, gqa)


class VarlenKernel:
    """A whole chunk in one varlen call (see the module docstring)."""

    name = "varlen"
    state_layout = "thd"

    def __init__(self, ops: VarlenOps):
        self.ops = ops
        self._bounds: dict = {}  # (segments, prefix length, device) -> cu_seq_q, cu_seq_k

    def state_capacity(self, seq_len: int, chunk_size: int) -> int:
        return seq_len + chunk_size  # the last chunk's own keys follow its prefix

    def _layout(self, q, k, v, view: ChunkView):
        """Token-major queries and keys/values, and the sequence boundaries of both."""
        h, g = q.shape[1], k.shape[1]
        q_t = q[0].transpose(0, 1).contiguous()                       # (L, H, D)
        q_lens = [n for _, n in view.segments]
        if view.chain is not None:
            # The Function wrote every own key (tail segments included) after the prefix.
            c = view.chain
            length = q.shape[2]
            k_t, v_t = c.state.keys(c.layer_idx, 0, c.start + length)   # (P + L, G, D)
            k_lens = [c.start + q_lens[0], *q_lens[1:]]
        else:
            k_t = k[0].transpose(0, 1).contiguous()
            v_t = v[0].transpose(0, 1).contiguous()
            k_lens = q_lens
        if g != h and not self.ops.gqa:  # (T, G, D) -> (T, H, D), as expand_kv
            k_t, v_t = (x[:, :, None].expand(x.shape[0], g, h // g, x.shape[2])
                        .reshape(x.shape[0], h, x.shape[2]) for x in (k_t, v_t))
        # Every layer of a chunk has the same boundaries: one host-to-device copy per chunk.
        key = (view.segments, view.prefix_len, q.device)
        if key not in self._bounds:
            if len(self._bounds) > 256:  # a kernel object reused across many steps
                self._bounds.clear()
            self._bounds[key] = tuple(torch.tensor([0, *_cumsum(lens)], dtype=torch.int32,
                                                   device=q.device) for lens in (q_lens, k_lens))
        cu_q, cu_k = self._bounds[key]
        return q_t, k_t, v_t, cu_q, cu_k, max(q_lens), max(k_lens)

    def forward(self, q, k, v, view: ChunkView):
        q_t, k_t, v_t, cu_q, cu_k, max_q, max_k = self._layout(q, k, v, view)
        out, lse = self.ops.forward(q_t, k_t, v_t, cu_q, cu_k, max_q, max_k, scale=view.scale,
                                    gqa=k_t.shape[1] != q_t.shape[1])
        return out.transpose(0, 1)[None], lse                           # (1, H, L, D) view

    def backward(self, dout, q, k, v, out, lse, view: ChunkView):
        h, g = q.shape[1], k.shape[1]
        q_t, k_t, v_t, cu_q, cu_k, max_q, max_k = self._layout(q, k, v, view)
        dout_t = dout[0].transpose(0, 1).contiguous()
        out_t = out[0].transpose(0, 1).contiguous()
        dq, dk, dv = self.ops.backward(dout_t, q_t, k_t, v_t, out_t, lse, cu_q, cu_k,
                                       max_q, max_k, scale=view.scale)
        if dk.shape[1] != g:  # expanded for the call: sum each group back
            dk, dv = (x.view(x.shape[0], g, h // g, x.shape[2]).sum(2) for x in (dk, dv))
        if view.chain is not None:
            c = view.chain
            if c.start:
                c.state.add_grad(c.layer_idx, 0, dk[:c.start], dv[:c.start])
            dk, dv = dk[c.start:], dv[c.start:]
        return (dq.transpose(0, 1)[None], dk.transpose(0, 1)[None].to(k.dtype),
                dv.transpose(0, 1)[None].to(v.dtype))


def _cumsum(values):
    total, out = 0, []
    for x in values:
        total += x
        out.append(total)
    return out
