"""Which attention kernel runs: by name, or ``"auto"`` for the device and dtype.

* ``cpu-flash``: PyTorch's CPU flash kernel, segment by segment (CPU only; ``sdpa`` is its old
  name);
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn``, one call per chunk (CUDA, bf16/fp16);
* ``math``: tiled plain PyTorch, any device and dtype;
* ``auto``: ``cpu-flash`` on CPU. On CUDA ``varlen`` where this torch build has it and the
  dtype is bf16 or fp16, after a once-per-process self-check against ``math`` on a small random
  chunk with a prefix and packed segments, forward and backward; otherwise ``math``, with a
  warning that names what is missing.

A kernel object (anything with the :class:`~chunkflow.runtime.attention.ChunkKernel` methods)
may be passed instead of a name.
"""

from __future__ import annotations

import math
import warnings

import torch

ATTENTION_BACKENDS = ("auto", "cpu-flash", "varlen", "math", "sdpa")
_FLASH_DTYPES = (torch.bfloat16, torch.float16)
_SELF_CHECKS: dict[tuple[str, torch.dtype], str | None] = {}  # (device, dtype) -> failure


def get_kernel(name, device: torch.device, dtype: torch.dtype):
    """The kernel called ``name`` for chunks of ``dtype`` on ``device`` (see the module doc)."""
    from chunkflow.runtime.attention.cpu_flash import CPUFlashKernel
    from chunkflow.runtime.attention.tiled import TiledMathKernel

    if not isinstance(name, str):
        return name  # a kernel object
    if name == "auto":
        if device.type == "cpu":
            return CPUFlashKernel()
        kernel, why_not = _cuda_varlen(device, dtype)
        if kernel is None:
            warnings.warn(f"chunkflow: attention on {device} in {dtype} runs the tiled 'math' "
                          f"kernel, which is slow: {why_not}", stacklevel=3)
            return TiledMathKernel()
        return kernel
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
        if device.type != "cuda" or dtype not in _FLASH_DTYPES:
            raise ValueError(f"attention backend 'varlen' (FlashAttention) needs CUDA and "
                             f"bf16/fp16, got {device} and {dtype}; valid: bf16 autocast "
                             f"(--train.autocast=bf16), 'auto' or 'math'")
        return VarlenKernel(ops)
    if name == "math":
        return TiledMathKernel()
    raise ValueError(f"unknown attention backend {name!r}; valid: "
                     f"{', '.join(ATTENTION_BACKENDS)}")


def _cuda_varlen(device: torch.device, dtype: torch.dtype):
    """(varlen kernel, None) when it applies and passed its self-check, else (None, why)."""
    from chunkflow.runtime.attention.varlen import VarlenKernel, torch_varlen_ops

    if device.type != "cuda":
        return None, f"no fast kernel for device type {device.type!r}"
    if dtype not in _FLASH_DTYPES:
        return None, (f"varlen_attn (FlashAttention) takes bf16/fp16, not {dtype}; train "
                      f"with bf16 autocast (--train.autocast=bf16)")
    ops = torch_varlen_ops()
    if isinstance(ops, str):
        return None, ops
    kernel = VarlenKernel(ops)
    key = (str(device), dtype)
    if key not in _SELF_CHECKS:
        _SELF_CHECKS[key] = self_check(kernel, device, dtype)
    failure = _SELF_CHECKS[key]
    return (None, f"varlen failed its self-check ({failure})") if failure else (kernel, None)


def self_check(kernel, device: torch.device, dtype: torch.dtype, *, seed: int = 0) -> str | None:
    """Compare ``kernel`` with ``math`` on a small random chunk (a chain segment with a prefix,
    then two packed segments; GQA), forward and backward, prefix gradients included. Returns
    what differs beyond ``dtype``'s tolerance, or None. Runs with autograd on whatever the
    caller's mode (an evaluation runs under ``no_grad``)."""
    from chunkflow.runtime.attention.tiled import TiledMathKernel

    g = torch.Generator(device="cpu").manual_seed(seed)
    heads, kv_heads, d, prefix, segments = 4, 2, 64, 48, ((0, 24), (24, 5), (29, 11))
    length = sum(n for _, n in segments)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    chunk = (rand(1, heads, length, d), rand(1, kv_heads, length, d),
             rand(1, kv_heads, length, d), rand(1, heads, length, d))        # q, k, v, dout
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
