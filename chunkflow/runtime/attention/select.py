"""Which attention kernel runs: by name, or ``"auto"`` for the device, dtype and head shape.

* ``cpu-flash``: PyTorch's CPU flash kernel, segment by segment (CPU only; ``sdpa`` is its old
  name);
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn``, one call per chunk (CUDA, bf16/fp16,
  a head dim that is a multiple of 8 and at most 256: FlashAttention 2's limits);
* ``math``: tiled plain PyTorch, any device and dtype;
* ``auto``: ``cpu-flash`` on CPU. On CUDA ``varlen`` where this torch build has it, the dtype
  is bf16 or fp16 and the head dim fits, after a once-per-process self-check against ``math``
  on a small random chunk with a prefix and packed segments at the model's heads (H, G, D),
  forward and backward; otherwise ``math``, with a warning that names what is missing.

A kernel object (anything with the :class:`~chunkflow.runtime.attention.ChunkKernel` methods)
may be passed instead of a name. ``heads``: the model's (query heads, key/value heads, head
dim), :func:`model_heads` of its config; None where unknown (no head-dim gate, and the
self-check runs at (4, 2, 64)).
"""

from __future__ import annotations

import math
import warnings

import torch

from chunkflow.runtime.devices import normalize_device

ATTENTION_BACKENDS = ("auto", "cpu-flash", "varlen", "math", "sdpa")
_FLASH_DTYPES = (torch.bfloat16, torch.float16)
_FLASH_MAX_HEAD_DIM = 256  # FlashAttention 2: head dims up to 256, in multiples of 8
_CHECK_HEADS = (4, 2, 64)  # the self-check's (H, G, D) where the model's are unknown
_SELF_CHECKS: dict[tuple, str | None] = {}  # (device, dtype, heads, ops) -> failure


def model_heads(config) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head dim) of a chunkflow or transformers model config,
    as transformers derives them (no ``num_key_value_heads``: plain multi-head; no
    ``head_dim``: hidden size / heads); None where the config does not say."""
    h = getattr(config, "num_attention_heads", None)
    if not isinstance(h, int) or h < 1:
        return None
    g = getattr(config, "num_key_value_heads", None) or h
    d = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // h
    return (h, g, d) if d else None


def get_kernel(name, device: torch.device, dtype: torch.dtype, *,
               heads: tuple[int, int, int] | None = None):
    """The kernel called ``name`` for chunks of ``dtype`` on ``device`` of a model with
    ``heads`` (see the module doc)."""
    from chunkflow.runtime.attention.cpu_flash import CPUFlashKernel
    from chunkflow.runtime.attention.tiled import TiledMathKernel

    if not isinstance(name, str):
        return name  # a kernel object
    if name == "auto":
        if device.type == "cpu":
            return CPUFlashKernel()
        if device.type != "cuda":
            return _math_because(device, dtype, f"no fast kernel for device type "
                                                f"{device.type!r}")
        from chunkflow.runtime.attention.varlen import torch_varlen_ops

        return auto_varlen(device, dtype, heads, torch_varlen_ops())
    if name in ("cpu-flash", "sdpa"):
        if device.type != "cpu":
            raise ValueError(f"attention backend {name!r} (the CPU flash kernel) needs a CPU "
                             f"model, the model is on {device}; valid: 'auto', 'varlen', 'math'")
        return CPUFlashKernel()
    if name == "varlen":
        from chunkflow.runtime.attention.varlen import VarlenKernel, torch_varlen_ops

        ops = torch_varlen_ops()
        if isinstance(ops, str):
            raise ValueError(f"attention backend 'varlen' is not available: {ops}; valid: "
                             f"'auto' or 'math'")
        bad_head_dim = _head_dim_refusal(heads)
        if bad_head_dim:
            raise ValueError(f"attention backend 'varlen' cannot run this model: "
                             f"{bad_head_dim}; valid: 'auto' or 'math'")
        if device.type != "cuda" or dtype not in _FLASH_DTYPES:
            raise ValueError(f"attention backend 'varlen' (FlashAttention) needs CUDA and "
                             f"bf16/fp16, got {device} and {dtype}; valid: bf16 autocast "
                             f"(--train.autocast=bf16), 'auto' or 'math'")
        return VarlenKernel(ops)
    if name == "math":
        return TiledMathKernel()
    raise ValueError(f"unknown attention backend {name!r}; valid: "
                     f"{', '.join(ATTENTION_BACKENDS)}")


def _head_dim_refusal(heads) -> str | None:
    if heads is None:
        return None
    d = heads[2]
    if d % 8 or d > _FLASH_MAX_HEAD_DIM:
        return (f"FlashAttention takes a head dim that is a multiple of 8 and at most "
                f"{_FLASH_MAX_HEAD_DIM}, the model's is {d}")
    return None


def _math_because(device, dtype, why: str):
    from chunkflow.runtime.attention.tiled import TiledMathKernel

    warnings.warn(f"chunkflow: attention on {device} in {dtype} runs the tiled 'math' kernel, "
                  f"which is slow: {why}", stacklevel=4)
    return TiledMathKernel()


def auto_varlen(device: torch.device, dtype: torch.dtype, heads, ops):
    """``auto`` on an accelerator: a varlen kernel over ``ops`` (a :class:`VarlenOps`, or why
    there is none) where dtype and head dim fit and it passes its self-check at ``heads``
    (once per process for each device, dtype, heads and ops), else ``math`` with a warning
    that says why."""
    from chunkflow.runtime.attention.varlen import VarlenKernel

    if dtype not in _FLASH_DTYPES:
        return _math_because(device, dtype, f"varlen_attn (FlashAttention) takes bf16/fp16, "
                                            f"not {dtype}; train with bf16 autocast "
                                            f"(--train.autocast=bf16)")
    why = ops if isinstance(ops, str) else _head_dim_refusal(heads)
    if why:
        return _math_because(device, dtype, why)
    kernel = VarlenKernel(ops)
    heads = heads or _CHECK_HEADS
    key = (normalize_device(device), dtype, heads, ops.name)
    if key not in _SELF_CHECKS:
        _SELF_CHECKS[key] = self_check(kernel, device, dtype, heads=heads)
    failure = _SELF_CHECKS[key]
    if failure:
        return _math_because(device, dtype, f"varlen failed its self-check at (heads, kv "
                                            f"heads, head dim) {heads} ({failure})")
    return kernel


def self_check(kernel, device: torch.device, dtype: torch.dtype, *,
               heads: tuple[int, int, int] = _CHECK_HEADS, seed: int = 0) -> str | None:
    """Compare ``kernel`` with ``math`` on a small random chunk (a chain segment with a prefix,
    then two packed segments) with ``heads`` (H query heads, G key/value heads, head dim D:
    the model's, so grouped heads and its head dim are what is checked), forward and backward,
    prefix gradients included. Returns what differs beyond ``dtype``'s tolerance, or None.
    Runs with autograd on whatever the caller's mode (an evaluation runs under ``no_grad``)."""
    from chunkflow.runtime.attention.tiled import TiledMathKernel

    g = torch.Generator(device="cpu").manual_seed(seed)
    (num_heads, kv_heads, d), prefix, segments = heads, 48, ((0, 24), (24, 5), (29, 11))
    length = sum(n for _, n in segments)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    chunk = (rand(1, num_heads, length, d), rand(1, kv_heads, length, d),
             rand(1, kv_heads, length, d), rand(1, num_heads, length, d))  # q, k, v, dout
    state = (rand(1, kv_heads, prefix, d), rand(1, kv_heads, prefix, d),
             rand(1, kv_heads, segments[0][1], d), rand(1, kv_heads, segments[0][1], d))
    results = {}
    with torch.inference_mode(False), torch.enable_grad():
        for name, candidate in (("kernel", kernel), ("math", TiledMathKernel(tile_size=16))):
            try:
                results[name] = _attend(candidate, chunk, state, segments)
            except Exception as e:  # the kernel cannot run here: report, fall back
                return f"{type(e).__name__}: {e}"
    tol = 3e-2 if dtype in _FLASH_DTYPES else 1e-4
    names = ("output", "dq", "dk", "dv", "prefix dK", "prefix dV")
    for what, a, b in zip(names, results["kernel"], results["math"]):
        a, b = a.detach().float(), b.detach().float()
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        if not err <= tol:
            return f"{what} differs from math by {err:.3g} (relative, tolerance {tol})"
    return None


def _attend(kernel, chunk, state_tensors, segments) -> list[torch.Tensor]:
    """Output, input gradients and prefix gradients of one chunk through ``kernel``, with a
    prefix in the state and gradients already sent back for the chain segment's own keys."""
    from chunkflow.runtime.attention import ChainSlot, ChunkView, chunk_attention
    from chunkflow.runtime.kv_state import ChainState
    from chunkflow.runtime.memory import MemoryMeter

    q, k, v, dout = chunk
    prefix_k, prefix_v, later_k, later_v = state_tensors
    prefix, n0 = prefix_k.shape[2], segments[0][1]
    state = ChainState(layer_ids=[0], seq_len=prefix + n0, meter=MemoryMeter(),
                       layout=kernel.state_layout,
                       capacity=kernel.state_capacity(prefix + n0, q.shape[2]))
    state.write(0, 0, prefix_k, prefix_v)
    state.add_grad(0, prefix, state.as_layout(later_k), state.as_layout(later_v))
    view = ChunkView(segments, ChainSlot(state, 0, prefix, True), 1 / math.sqrt(q.shape[-1]), 16)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = chunk_attention(*inputs, view, kernel)
    return [out, *torch.autograd.grad(out, inputs, dout), *state.own_grads(0, 0, prefix)]
