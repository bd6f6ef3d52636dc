"""``varlen`` (CUDA): one ``torch.nn.attention.varlen.varlen_attn`` call covers a whole chunk.

Queries in token-major layout (L, H, D), one sequence per segment (``cu_seq_q``); the chain
segment's keys are its prefix and its own keys, read as one contiguous view of the chain state
(token-major too, with room for the chain's last chunk, whose own keys and packed tail segments
are written there before attention), so no prefix is ever copied and no log-sum-exp merge is
needed: with ``seqlen_k > seqlen_q`` the causal mask is aligned bottom-right, i.e. the chain
segment's queries see the whole prefix. Packed segments are further sequences of the same call
(``cu_seq_k``). Grouped-query attention goes to the kernel: keys/values keep their G heads
(FlashAttention's varlen forward and backward group H / G query heads per key/value head; torch
>= 2.12 asks for it with ``enable_gqa``, older releases hand k/v to FlashAttention as they are).
Only a :class:`VarlenOps` that takes equal head counts (``gqa=False``) gets them expanded.

One layout end to end: q/k/v and dout arrive as (1, H, L, D) views of token-major memory
(``state_layout = "thd"``: :func:`chunkflow.runtime.attention.chunk_attention` hands them over
so), the kernel reads and writes (T, H, D), and the results go back as views: no layout copy.
The sequence boundaries go to the device once per chunk layout, from pinned host memory without
blocking (:func:`cu_seqlens`); the kernel object, and with it that cache, lives across steps.

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
    """``forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale)`` -> (out (Tq, H, D), lse):
    causal attention aligned bottom-right per sequence; ``backward(dout, q, k, v, out, lse,
    cu_q, cu_k, max_q, max_k, *, scale)`` -> (dq, dk, dv). ``gqa``: keys/values may have fewer
    heads than queries (a divisor of them), forward and backward."""

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
    default 1/sqrt(head dim), which is chunkflow's). Grouped heads: ``enable_gqa=True`` where
    the function has it (torch >= 2.12, which refuses fewer key/value heads without it); older
    releases pass k/v to ``aten._flash_attention_forward`` unchanged, and FlashAttention takes
    fewer key/value heads natively (the self-check covers it). The backward op is called with
    its schema's arguments by name."""
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
    takes_scale, takes_gqa = "scale" in params, "enable_gqa" in params
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

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale):
        extra = {"enable_gqa": True} if takes_gqa and k.shape[1] != q.shape[1] else {}
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

    return VarlenOps(forward, backward, gqa=True)


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
        q_t = _token_major(q)                                           # (L, H, D)
        q_lens = [n for _, n in view.segments]
        if view.chain is not None:
            # The Function wrote every own key (tail segments included) after the prefix.
            c = view.chain
            length = q.shape[2]
            k_t, v_t = c.state.keys(c.layer_idx, 0, c.start + length)   # (P + L, G, D)
            k_lens = [c.start + q_lens[0], *q_lens[1:]]
        else:
            k_t, v_t = _token_major(k), _token_major(v)
            k_lens = q_lens
        if g != h and not self.ops.gqa:  # (T, G, D) -> (T, H, D), as expand_kv
            k_t, v_t = (x[:, :, None].expand(x.shape[0], g, h // g, x.shape[2])
                        .reshape(x.shape[0], h, x.shape[2]) for x in (k_t, v_t))
        # Every layer of a chunk has the same boundaries: one host-to-device copy per chunk
        # layout, and none for a layout seen before (the engine keeps this kernel across steps).
        key = (view.segments, view.prefix_len, q.device)  # a tensor's device has its index
        if key not in self._bounds:
            if len(self._bounds) > 256:
                self._bounds.clear()
            self._bounds[key] = cu_seqlens((q_lens, k_lens), q.device)
        cu_q, cu_k = self._bounds[key]
        return q_t, k_t, v_t, cu_q, cu_k, max(q_lens), max(k_lens)

    def forward(self, q, k, v, view: ChunkView):
        q_t, k_t, v_t, cu_q, cu_k, max_q, max_k = self._layout(q, k, v, view)
        out, lse = self.ops.forward(q_t, k_t, v_t, cu_q, cu_k, max_q, max_k, scale=view.scale)
        return out.transpose(0, 1)[None], lse                           # (1, H, L, D) view

    def backward(self, dout, q, k, v, out, lse, view: ChunkView):
        h, g = q.shape[1], k.shape[1]
        q_t, k_t, v_t, cu_q, cu_k, max_q, max_k = self._layout(q, k, v, view)
        dout_t, out_t = _token_major(dout), _token_major(out)
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


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """(1, H, L, D) -> (L, H, D): a view when ``x`` is a view of token-major memory (as
    ``chunk_attention`` hands it over), else the one copy that makes it so."""
    return x[0].transpose(0, 1).contiguous()


def cu_seqlens(lengths: tuple[list[int], ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each list of sequence lengths as its int32 boundaries ``[0, l0, l0 + l1, ...]`` on
    ``device``. All lists go in one host-to-device copy; for CUDA it is made from pinned memory
    and does not block the host (the caching host allocator keeps the pinned block until the
    copy has run), so building a chunk's boundaries never waits for the GPU."""
    rows = []
    for lens in lengths:
        total, row = 0, [0]
        for n in lens:
            total += n
            row.append(total)
        rows.append(row)
    width = max(len(row) for row in rows)
    rows = [row + [row[-1]] * (width - len(row)) for row in rows]  # rectangular; cut below
    host = torch.tensor(rows, dtype=torch.int32, pin_memory=device.type == "cuda")
    moved = host.to(device, non_blocking=True)
    return tuple(moved[i, :len(lens) + 1] for i, lens in enumerate(lengths))
