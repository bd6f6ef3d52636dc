"""A chunk's loss from its final hidden states and the output head, without full-vocabulary
logits when they would be large.

``head_loss(hidden, head, targets, weights)`` = sum over tokens of weight * cross-entropy of
``head(hidden)``. When the chunk's logits would exceed ``logits_budget`` bytes (an 8K chunk at
Qwen2.5's 152064-token vocabulary: 8192 x 152064 x 4 bytes = 4.6 GiB, and as much again for
their gradient), the head's weight (and bias) are fed to a fused linear cross-entropy in row
blocks of at most that many logits: ``torch.nn.functional.linear_cross_entropy`` (torch >=
2.13, chunked through ``LinearCrossEntropyOptions``), or on older torch
:class:`_BlockedLinearCrossEntropy`, the same computation written out. Smaller logits take the
plain path (a matmul and ``cross_entropy``), which is cheaper when memory does not matter.

The head may be an ``nn.Linear`` (tied to the embedding or not, trainable or frozen), a PEFT
``ModulesToSaveWrapper`` around one, or a PEFT LoRA layer on one (its weight is then the base
weight plus the adapters' deltas, built differentiably); anything else takes the plain path.
Exact: the loss and every gradient equal the plain path's (float64 tests).

Shape legend: L tokens of the chunk, E hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chunkflow.runtime.devices import normalize_device
from chunkflow.runtime.loss import IGNORE_INDEX, weighted_cross_entropy

LOGITS_BUDGET = 256 * 2**20
"""Default: bytes of logits (and as much for their gradient) a chunk may hold at once."""


def head_parameters(head: nn.Module):
    """(weight (V, E), bias (V,) or None) of an output head, or None when it is not a linear
    map that can be read off (see the module docstring)."""
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    to_save = getattr(head, "modules_to_save", None)  # peft ModulesToSaveWrapper
    if isinstance(to_save, nn.ModuleDict) and getattr(head, "active_adapters", None):
        if getattr(head, "disable_adapters", False):
            return head_parameters(head.original_module)
        return head_parameters(to_save[head.active_adapters[0]])
    if hasattr(head, "get_base_layer") and hasattr(head, "get_delta_weight"):  # peft LoRA
        base = head.get_base_layer()
        if not isinstance(base, nn.Linear):
            return None
        weight = base.weight
        if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
            return weight, base.bias
        for adapter in head.active_adapters:
            if adapter not in getattr(head, "lora_A", {}):
                continue
            dropout = head.lora_dropout[adapter]
            if getattr(head, "use_dora", {}).get(adapter) or (
                    isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training):
                return None  # not a fixed weight: the plain path runs the module itself
            weight = weight + head.get_delta_weight(adapter)
        return weight, base.bias
    return None


def head_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
              weights: torch.Tensor, *, logits_budget: int = LOGITS_BUDGET,
              cast_cache: dict | None = None) -> torch.Tensor:
    """hidden (L, E), targets (L,) with -100 ignored, weights (L,) -> sum_t weight_t * CE_t.

    ``cast_cache``: a dict that lives for one step, so that under autocast the chunks of a step
    share one low-precision copy of the head's weight (as autocast's own cache does for a
    linear layer) instead of each kept chunk holding its own."""
    params = head_parameters(head)
    vocab = params[0].shape[0] if params is not None else 0
    acc_bytes = torch.promote_types(hidden.dtype, torch.float32).itemsize
    if params is None or hidden.shape[0] * vocab * acc_bytes <= logits_budget:
        return weighted_cross_entropy(head(hidden), targets, weights)
    weight, bias = params
    device = hidden.device.type
    dtype = None
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)  # what autocast makes of a linear layer
        hidden = hidden.to(dtype)
    rows = max(1, logits_budget // (vocab * acc_bytes))
    with torch.autocast(device, enabled=False):
        ce = linear_cross_entropy(hidden, weight, bias, targets, rows=rows, dtype=dtype,
                                  cast_cache=cast_cache)
    acc = torch.promote_types(ce.dtype, torch.float32)
    return (ce.to(acc) * weights.to(acc)).sum()


def _cast(t: torch.Tensor, dtype: torch.dtype, cache: dict | None) -> torch.Tensor:
    """``t.to(dtype)``, once per tensor and step when ``cache`` is given (the cast is
    differentiable; each chunk's backward passes its gradient back through it)."""
    if cache is None or t.dtype == dtype:
        return t.to(dtype)
    key = (id(t), t._version, dtype)
    if key not in cache:
        cache[key] = t.to(dtype)
    return cache[key]


def linear_cross_entropy(hidden, weight, bias, targets, *, rows: int,
                         dtype: torch.dtype | None = None,
                         cast_cache: dict | None = None) -> torch.Tensor:
    """Per-token cross-entropy (0 at ignored targets) of ``hidden @ weight.T + bias``, computed
    ``rows`` tokens at a time; torch's fused op where it exists. ``dtype``: the matmuls' dtype
    under autocast (the weight and bias are cast to it, once per step with ``cast_cache``).
    The blocked fallback keeps the weight's gradient in float32 (or wider) throughout: each
    block's partial is accumulated unrounded, and it is returned in the weight's own dtype,
    not rounded to ``dtype`` on the way back."""
    if dtype is not None and hasattr(F, "linear_cross_entropy"):
        weight, bias = (None if t is None else _cast(t, dtype, cast_cache) for t in (weight, bias))
    if hasattr(F, "linear_cross_entropy"):
        from torch.nn import LinearCrossEntropyOptions

        # Explicit row blocks: the default heuristic picks blocks of a few dozen rows for LLM
        # heads, which is 3x slower on CPU (measured at 1024 x 896 x 32768).
        options = LinearCrossEntropyOptions(
            batch_chunk_size=rows, chunking_method=None,
            acc_policy="accurate" if hidden.device.type == "cpu" else "auto",
            acc_dtype=torch.promote_types(hidden.dtype, torch.float32))
        return F.linear_cross_entropy(hidden, weight, targets, linear_bias=bias,
                                      reduction="none", ignore_index=IGNORE_INDEX,
                                      options=options)
    return _BlockedLinearCrossEntropy.apply(hidden, weight, bias, targets, rows, dtype,
                                            cast_cache)


class _BlockedLinearCrossEntropy(torch.autograd.Function):
    """Per-token CE of a linear head, ``rows`` tokens at a time in forward and backward (the
    backward recomputes each block's logits); for torch releases without the fused op.
    ``dtype``: the matmuls' dtype (autocast), into which the weight and bias are cast inside
    (a copy per step with ``cast_cache``), so their gradients come back in their own dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, dtype, cast_cache):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        ce = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        kept = targets != IGNORE_INDEX
        w, b = _low(weight, dtype, cast_cache), _low(bias, dtype, cast_cache)
        for a in range(0, hidden.shape[0], rows):
            logits = _logits(hidden[a:a + rows], w, b, acc)
            t = targets[a:a + rows].clamp_min(0)
            ce[a:a + rows] = torch.logsumexp(logits, -1) - logits.gather(1, t[:, None])[:, 0]
        ce = ce * kept
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.rows, ctx.dtype, ctx.cast_cache = rows, dtype, cast_cache
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, bias, targets = ctx.saved_tensors
        w, b = _low(weight, ctx.dtype, ctx.cast_cache), _low(bias, ctx.dtype, ctx.cast_cache)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        rows = ctx.rows
        g_out = grad_ce.to(acc) * (targets != IGNORE_INDEX)
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.promote_types(acc, weight.dtype),
                         device=weight.device) if ctx.needs_input_grad[1] else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        for a in range(0, hidden.shape[0], rows):
            h = hidden[a:a + rows]
            g = torch.softmax(_logits(h, w, b, acc), -1) * g_out[a:a + rows, None]
            t = targets[a:a + rows].clamp_min(0)
            g.scatter_add_(1, t[:, None], -g_out[a:a + rows, None])
            g_in = g.to(hidden.dtype)  # the block's logit gradient, in the matmuls' dtype
            if dh is not None:
                dh[a:a + rows] = g_in @ w
            if dw is not None:  # (V, E) += (V, rows) @ (rows, E), unrounded
                _add_matmul(dw, g.transpose(0, 1), g_in.transpose(0, 1), h)
            if db is not None:
                db += g.sum(0)
        return (dh, None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None)


def _low(t: torch.Tensor | None, dtype: torch.dtype | None, cache: dict | None):
    """``t`` detached in the matmuls' ``dtype`` (None: its own), once per step with ``cache``
    (the forward and backward of every chunk of a step share it) where ``t`` is a parameter
    (a LoRA head's merged weight is a new tensor per chunk, whose id may be reused)."""
    if t is None or dtype is None or t.dtype == dtype:
        return None if t is None else t.detach()
    if cache is None or not t.is_leaf:
        return t.detach().to(dtype)
    key = (id(t), t._version, dtype, "detached")
    if key not in cache:
        cache[key] = t.detach().to(dtype)
    return cache[key]


def _add_matmul(out: torch.Tensor, a: torch.Tensor, a_low: torch.Tensor,
                b: torch.Tensor) -> None:
    """``out += a @ b`` in ``out``'s (float32+) dtype, in place: no (V, E) temporary, and the
    block's product is not rounded to ``b``'s dtype before the sum (rounding each block's
    partial to bf16 and summing many of them loses far more than the plain path's one
    rounding). ``a_low``: ``a`` in ``b``'s dtype. Where ``b`` is narrower than ``out``, a
    matmul with ``out_dtype`` accumulates the low-precision product into ``out`` (tensor
    cores; CUDA, recent torch, detected once per device and dtype); elsewhere the operands are
    widened (``a`` is already; one (rows, E) cast of ``b``)."""
    if b.dtype == out.dtype:
        out.addmm_(a_low, b)
    elif _addmm_out_dtype(out.device, b.dtype, out.dtype):
        torch.addmm(out, a_low, b, out_dtype=out.dtype, out=out)
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


_ADDMM_OUT_DTYPE: dict[tuple, bool] = {}


def _addmm_out_dtype(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, x, y, out_dtype=acc.dtype, out=acc)`` accumulates a
    ``dtype`` product into ``acc`` in ``out_dtype`` on ``device`` (the op, its in-place use and
    an ``acc`` wider than the operands vary by torch release and backend: tried, not assumed):
    ``2 / eps + 1`` (257 for bf16) is exact in float32, not in ``dtype``."""
    key = (normalize_device(device), dtype, out_dtype)
    if key not in _ADDMM_OUT_DTYPE:
        big = 2.0 / torch.finfo(dtype).eps  # its successor is not representable in dtype
        try:
            acc = torch.full((1, 1), big, dtype=out_dtype, device=device)
            one = torch.ones((1, 1), dtype=dtype, device=device)
            torch.addmm(acc, one, one, out_dtype=out_dtype, out=acc)
            ok = float(acc[0, 0]) == big + 1
        except (RuntimeError, NotImplementedError, TypeError):
            ok = False
        _ADDMM_OUT_DTYPE[key] = ok
    return _ADDMM_OUT_DTYPE[key]


def _logits(h, weight, bias, acc):
    """One block's logits in ``acc``, multiplied in the inputs' dtype (bf16 under autocast:
    tensor cores, fp32 accumulation; rounded as the plain path's bf16 logits are)."""
    logits = (h @ weight.transpose(0, 1)).to(acc)
    return logits if bias is None else logits + bias.to(acc)
