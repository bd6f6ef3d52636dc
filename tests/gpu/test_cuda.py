"""The CUDA kernels against ``math`` and plain training, each body run on two targets:

* ``cuda`` (marked ``gpu``; skipped without CUDA, ``make gpu-check`` runs these): torch's
  ``varlen_attn`` and the tiled math kernel on the GPU, at full sizes;
* ``cpu-reference`` (the default suite): the same bodies on CPU, varlen's adapter over the CPU
  reference of ``varlen_attn``'s contract (``tests/runtime/varlen_reference.py``), sequences
  ``SHRINK`` times shorter, so a mistake in a body (or in the adapter) fails in CI before it
  meets a GPU.

Chunks mix a chain segment with a prefix and packed segments, with grouped-query heads; bf16
and fp16 for varlen (FlashAttention takes nothing else), fp32 for the tiled math kernel.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.runtime.attention import ChainSlot, ChunkView, chunk_attention, get_kernel
from chunkflow.runtime.attention.select import auto_varlen
from chunkflow.runtime.attention.tiled import TiledMathKernel
from chunkflow.runtime.attention.varlen import VarlenKernel
from chunkflow.runtime.head_loss import head_loss
from chunkflow.runtime.kv_state import ChainState
from chunkflow.runtime.loss import weighted_cross_entropy
from chunkflow.runtime.memory import MemoryMeter
from tests.conftest import grads, reference_loss, tiny_model
from tests.runtime.varlen_reference import reference_ops

SHRINK = 8  # the CPU target's sequences (and vocabulary) are this many times shorter


@dataclass(frozen=True)
class Target:
    """Where a test body runs, and its kernels there."""

    device: torch.device
    shrink: int = 1

    def n(self, length: int) -> int:
        """A length at this target's scale (at least 2: a supervised token)."""
        return max(2, length // self.shrink) if length else 0

    def kernel(self, name: str, dtype: torch.dtype, heads=None):
        if name == "varlen" and self.device.type == "cpu":
            return VarlenKernel(reference_ops())
        return get_kernel(name, self.device, dtype, heads=heads)

    def backend(self, name: str):
        """``attention_backend`` for an engine: the name (the engine builds the kernel), or on
        CPU, varlen over the reference."""
        return self.kernel(name, torch.bfloat16) if name == "varlen" and \
            self.device.type == "cpu" else name

    def auto(self, dtype: torch.dtype, heads):
        if self.device.type == "cpu":  # auto's CUDA choice, over the reference
            return auto_varlen(self.device, dtype, heads, reference_ops())
        return get_kernel("auto", self.device, dtype, heads=heads)


@pytest.fixture(params=[
    pytest.param(Target(torch.device("cpu"), SHRINK), id="cpu-reference"),
    pytest.param(Target(torch.device("cuda")), id="cuda", marks=pytest.mark.gpu)])
def target(request) -> Target:
    return request.param


def attend(kernel, q, k, v, kp, vp, dout, segments, later):
    n0, prefix = segments[0][1], kp.shape[2]
    state = ChainState(layer_ids=[0], seq_len=prefix + n0, meter=MemoryMeter(),
                       layout=kernel.state_layout,
                       capacity=kernel.state_capacity(prefix + n0, q.shape[2]))
    state.write(0, 0, kp, vp)
    state.write(0, prefix, k, v)  # allocates the buffers even without a prefix (as forward does)
    state.add_grad(0, prefix, state.as_layout(later[0]), state.as_layout(later[1]))
    view = ChunkView(tuple(segments), ChainSlot(state, 0, prefix, True),
                     1 / math.sqrt(q.shape[-1]), 512)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = chunk_attention(*inputs, view, kernel)
    return [out, *torch.autograd.grad(out, inputs, dout), *state.own_grads(0, 0, prefix)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|; 0 where both are empty or zero (no prefix: no prefix gradients)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix, segments", [(0, [1024]), (3000, [700, 200, 124]),
                                              (8192, [2048])])
def test_varlen_matches_math(target, dtype, prefix, segments):
    h, g, d = 14, 2, 64
    kernel = target.kernel("varlen", dtype, heads=(h, g, d))
    prefix, lengths = target.n(prefix), [target.n(n) for n in segments]
    segments = [(sum(lengths[:i]), n) for i, n in enumerate(lengths)]
    length = sum(lengths)
    torch.manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=target.device, dtype=dtype)

    q, k, v, dout = rand(1, h, length, d), rand(1, g, length, d), rand(1, g, length, d), \
        rand(1, h, length, d)
    kp, vp = rand(1, g, prefix, d), rand(1, g, prefix, d)
    later = (rand(1, g, segments[0][1], d), rand(1, g, segments[0][1], d))
    got = attend(kernel, q, k, v, kp, vp, dout, segments, later)
    want = attend(TiledMathKernel(tile_size=512), *(t.float() for t in (q, k, v, kp, vp, dout)),
                  segments, tuple(t.float() for t in later))
    for name, a, b in zip(("out", "dq", "dk", "dv", "prefix dK", "prefix dV"), got, want):
        err = relative_error(a, b)
        assert err < 2e-2, (name, err)


def test_math_fp32_matches_the_cpu_flash_kernel(target):
    torch.manual_seed(0)
    h, g, d, prefix, lengths = 8, 2, 64, target.n(1500), [target.n(600), target.n(90)]
    segments = [(0, lengths[0]), (lengths[0], lengths[1])]
    length = sum(lengths)
    tensors = [torch.randn(*shape) for shape in ((1, h, length, d), (1, g, length, d),
                                                (1, g, length, d), (1, g, prefix, d),
                                                (1, g, prefix, d), (1, h, length, d))]
    later = (torch.randn(1, g, lengths[0], d), torch.randn(1, g, lengths[0], d))
    got = attend(TiledMathKernel(), *(t.to(target.device) for t in tensors), segments,
                 tuple(t.to(target.device) for t in later))
    want = attend(get_kernel("cpu-flash", torch.device("cpu"), torch.float32), *tensors,
                  segments, later)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_auto_picks_varlen_for_bf16_and_math_for_fp32(target):
    assert target.auto(torch.bfloat16, (8, 2, 128)).name == "varlen"
    with pytest.warns(UserWarning, match="tiled 'math' kernel"):
        assert target.auto(torch.float32, (8, 2, 128)).name == "math"


@pytest.mark.parametrize("backend", ["varlen", "math"])
def test_bf16_autocast_step_matches_plain_training(target, backend):
    device = target.device
    model = tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=4,
                       head_dim=64, intermediate_size=256).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1) if p.dim() > 1 else None
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 53, (target.n(n),), generator=g).to(device)
             for n in (3000, 40, 700, 9, 256)]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        want_loss = reference_loss(model, batch)
        want_loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    engine = ChunkFlowEngine(model, chunk_size=target.n(512), k=1,
                             attention_backend=target.backend(backend))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        result = engine.forward_backward(batch)
    assert abs(float(result.loss) - float(want_loss)) <= 1e-2 * float(want_loss)
    got = grads(model)
    norm = lambda d: math.sqrt(sum(float(t.float().pow(2).sum()) for t in d.values()))  # noqa
    assert abs(norm(got) - norm(want)) <= 3e-2 * norm(want)


def test_fused_loss_bf16(target):
    device, tokens, vocab = target.device, target.n(2048), target.n(50000)
    torch.manual_seed(0)
    head = torch.nn.Linear(256, vocab, bias=False).to(device)
    hidden = torch.randn(tokens, 256, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    weights = torch.full((tokens,), 1 / tokens, device=device)
    budget = 64 * 2**20 // target.shrink ** 2  # the logits in about 7 blocks on both targets
    with torch.autocast(device.type, dtype=torch.bfloat16):
        want = weighted_cross_entropy(head(hidden), targets, weights)
        got = head_loss(hidden, head, targets, weights, logits_budget=budget)
    gw, gh = torch.autograd.grad(want, [head.weight, hidden])
    fw, fh = torch.autograd.grad(got, [head.weight, hidden])
    assert abs(float(got) - float(want)) < 1e-2 * float(want)
    for a, b in ((fw, gw), (fh, gh)):
        assert relative_error(a, b) < 3e-2


@pytest.mark.parametrize("backend", ["varlen", "math"])
@pytest.mark.parametrize("recompute, offload", [("selective", "none"), ("full", "state"),
                                                ("selective", "all")])
def test_selective_recompute_and_offload_match_the_plain_engine(target, backend, recompute,
                                                                offload):
    """The same gradients as full recompute without offload (bf16 for varlen, fp32 for math);
    offload's host store is pinned (on CUDA) and its copies move the state both ways."""
    device = target.device
    dtype = torch.bfloat16 if backend == "varlen" else torch.float32
    model = tiny_model(dtype=dtype, hidden_size=128, num_attention_heads=4, head_dim=64,
                       intermediate_size=256, num_hidden_layers=4).to(device)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 53, (target.n(n),), generator=g).to(device)
             for n in (3000, 40, 700)]
    kernel, chunk_size = target.backend(backend), target.n(512)
    want_loss = ChunkFlowEngine(model, chunk_size=chunk_size, k=1,
                                attention_backend=kernel).forward_backward(batch).loss
    want = grads(model)
    model.zero_grad(set_to_none=True)
    engine = ChunkFlowEngine(model, chunk_size=chunk_size, k=1, attention_backend=kernel,
                             recompute=recompute, offload=offload)
    got_loss = engine.forward_backward(batch).loss
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert abs(float(got_loss) - float(want_loss)) <= tol * abs(float(want_loss))
    for name, w in want.items():
        got = model.get_parameter(name).grad
        assert float((got.float() - w.float()).norm()) <= tol * float(w.float().norm()) + 1e-6
    if offload != "none":
        copier = engine.copier(device)
        assert copier.bytes_to_device > 0 and copier.bytes_to_host > 0
        if device.type == "cuda":
            assert copier.host_empty((4,), torch.float32).is_pinned()


@pytest.mark.parametrize("backend", ["varlen", "math"])
def test_sequence_parallel_padding_rows_are_left_out(target, backend):
    """A chunk padded for sequence parallelism (tp=4: 11 tokens -> 12 rows) through a kernel
    in bf16: the real rows and their gradients equal the unpadded call's; the padding rows get
    zeros."""
    from chunkflow.runtime.chunk_call import BoundSegment, ChunkAttention

    torch.manual_seed(0)
    kernel = target.kernel(backend, torch.bfloat16, heads=(4, 2, 64))
    segments = [BoundSegment(0, 5, 0, None), BoundSegment(5, 6, 0, None)]
    # (1, L, heads, D) transposed to (1, heads, L, D), as the models hand them over
    q, k, v = (torch.randn(1, 12, h, 64, device=target.device, dtype=torch.bfloat16)
               .transpose(1, 2).requires_grad_() for h in (4, 2, 2))

    def attend(n):
        return ChunkAttention(segments, kernel, block_size=16, has_successor=False)(
            0, q[:, :, :n], k[:, :, :n], v[:, :, :n])

    padded, plain = attend(12), attend(11)
    assert torch.equal(padded[:, :, :11], plain) and not padded[:, :, 11:].any()
    got = torch.autograd.grad(padded.float().sum(), (q, k, v))
    want = torch.autograd.grad(plain.float().sum(), (q, k, v))
    for g, w in zip(got, want):  # the same inputs: only the backward's accumulation order
        assert not g[:, :, 11:].any()
        assert float((g - w).abs().max()) <= 1e-2 * float(w.abs().max())
