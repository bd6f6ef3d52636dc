"""On a CUDA device: the real kernels against ``math`` and plain training (marked ``gpu``;
skipped without CUDA, so CI never runs them; ``make gpu-check`` does).

Chunks mix a chain segment with a prefix and packed segments, with grouped-query heads; bf16
and fp16 for varlen (FlashAttention takes nothing else), fp32 for the tiled math kernel.
"""

import math

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.runtime.attention import ChainSlot, ChunkView, chunk_attention, get_kernel
from chunkflow.runtime.attention.tiled import TiledMathKernel
from chunkflow.runtime.head_loss import head_loss
from chunkflow.runtime.kv_state import ChainState
from chunkflow.runtime.loss import weighted_cross_entropy
from chunkflow.runtime.memory import MemoryMeter
from tests.conftest import grads, reference_loss, tiny_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix, segments", [(0, [(0, 1024)]), (3000, [(0, 700), (700, 200),
                                                                        (900, 124)]),
                                              (8192, [(0, 2048)])])
def test_varlen_matches_math(dtype, prefix, segments):
    kernel = get_kernel("varlen", CUDA, dtype)
    torch.manual_seed(0)
    h, g, d = 14, 2, 64
    length = sum(n for _, n in segments)

    def rand(*shape):
        return torch.randn(*shape, device=CUDA, dtype=dtype)

    q, k, v, dout = rand(1, h, length, d), rand(1, g, length, d), rand(1, g, length, d), \
        rand(1, h, length, d)
    kp, vp = rand(1, g, prefix, d), rand(1, g, prefix, d)
    later = (rand(1, g, segments[0][1], d), rand(1, g, segments[0][1], d))
    got = attend(kernel, q, k, v, kp, vp, dout, segments, later)
    want = attend(TiledMathKernel(tile_size=512), *(t.float() for t in (q, k, v, kp, vp, dout)),
                  segments, tuple(t.float() for t in later))
    for name, a, b in zip(("out", "dq", "dk", "dv", "prefix dK", "prefix dV"), got, want):
        err = float((a.float() - b.float()).norm() / b.float().norm())
        assert err < 2e-2, (name, err)


def test_math_on_cuda_fp32_matches_the_cpu_flash_kernel():
    torch.manual_seed(0)
    h, g, d, prefix, segments = 8, 2, 64, 1500, [(0, 600), (600, 90)]
    length = sum(n for _, n in segments)
    tensors = [torch.randn(*shape) for shape in ((1, h, length, d), (1, g, length, d),
                                                (1, g, length, d), (1, g, prefix, d),
                                                (1, g, prefix, d), (1, h, length, d))]
    later = (torch.randn(1, g, 600, d), torch.randn(1, g, 600, d))
    got = attend(TiledMathKernel(), *(t.to(CUDA) for t in tensors), segments,
                 tuple(t.to(CUDA) for t in later))
    want = attend(get_kernel("cpu-flash", torch.device("cpu"), torch.float32), *tensors,
                  segments, later)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_auto_picks_varlen_for_bf16_and_math_for_fp32():
    assert get_kernel("auto", CUDA, torch.bfloat16).name == "varlen"
    with pytest.warns(UserWarning, match="tiled 'math' kernel"):
        assert get_kernel("auto", CUDA, torch.float32).name == "math"


@pytest.mark.parametrize("backend", ["varlen", "math"])
def test_bf16_autocast_step_matches_plain_training(backend):
    model = tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=4,
                       head_dim=64, intermediate_size=256).to(CUDA)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.1) if p.dim() > 1 else None
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 53, (n,), generator=g).to(CUDA) for n in (3000, 40, 700, 9, 256)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_loss = reference_loss(model, batch)
        want_loss.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = ChunkFlowEngine(model, chunk_size=512, k=1,
                                 attention_backend=backend).forward_backward(batch)
    assert abs(float(result.loss) - float(want_loss)) <= 1e-2 * float(want_loss)
    got = grads(model)
    norm = lambda d: math.sqrt(sum(float(t.float().pow(2).sum()) for t in d.values()))  # noqa
    assert abs(norm(got) - norm(want)) <= 3e-2 * norm(want)


def test_fused_loss_on_cuda_bf16():
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 50000, bias=False).to(CUDA)
    hidden = torch.randn(2048, 256, device=CUDA, requires_grad=True)
    targets = torch.randint(0, 50000, (2048,), device=CUDA)
    weights = torch.full((2048,), 1 / 2048, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = weighted_cross_entropy(head(hidden), targets, weights)
        got = head_loss(hidden, head, targets, weights, logits_budget=64 * 2**20)
    gw, gh = torch.autograd.grad(want, [head.weight, hidden])
    fw, fh = torch.autograd.grad(got, [head.weight, hidden])
    assert abs(float(got) - float(want)) < 1e-2 * float(want)
    for a, b in ((fw, gw), (fh, gh)):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 3e-2


@pytest.mark.parametrize("backend", ["varlen", "math"])
@pytest.mark.parametrize("recompute, offload", [("selective", "none"), ("full", "state"),
                                                ("selective", "all")])
def test_selective_recompute_and_offload_on_cuda_match_the_plain_engine(backend, recompute,
                                                                        offload):
    """The same gradients as full recompute without offload (bf16 for varlen, fp32 for math);
    offload's host store is pinned and its copies move the state both ways."""
    dtype = torch.bfloat16 if backend == "varlen" else torch.float32
    model = tiny_model(dtype=dtype, hidden_size=128, num_attention_heads=4, head_dim=64,
                       intermediate_size=256, num_hidden_layers=4).to(CUDA)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 53, (n,), generator=g).to(CUDA) for n in (3000, 40, 700)]
    want_loss = ChunkFlowEngine(model, chunk_size=512, k=1,
                                attention_backend=backend).forward_backward(batch).loss
    want = grads(model)
    model.zero_grad(set_to_none=True)
    engine = ChunkFlowEngine(model, chunk_size=512, k=1, attention_backend=backend,
                             recompute=recompute, offload=offload)
    got_loss = engine.forward_backward(batch).loss
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert abs(float(got_loss) - float(want_loss)) <= tol * abs(float(want_loss))
    for name, w in want.items():
        got = model.get_parameter(name).grad
        assert float((got.float() - w.float()).norm()) <= tol * float(w.float().norm()) + 1e-6
    if offload != "none":
        copier = engine.copier(CUDA)
        assert copier.bytes_to_device > 0 and copier.bytes_to_host > 0
        assert copier.host_empty((4,), torch.float32).is_pinned()


@pytest.mark.parametrize("backend", ["varlen", "math"])
def test_sequence_parallel_padding_rows_are_left_out_on_cuda(backend):
    """A chunk padded for sequence parallelism (tp=4: 11 tokens -> 12 rows) through a CUDA
    kernel in bf16: the real rows and their gradients equal the unpadded call's; the padding
    rows get zeros."""
    from chunkflow.runtime.chunk_call import ChunkAttention, Segment

    torch.manual_seed(0)
    kernel = get_kernel(backend, CUDA, torch.bfloat16)
    segments = [Segment(0, 5, 0, None), Segment(5, 6, 0, None)]
    # (1, L, heads, D) transposed to (1, heads, L, D), as the models hand them over
    q, k, v = (torch.randn(1, 12, h, 64, device=CUDA, dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_() for h in (4, 2, 2))

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
