"""The whole-chunk attention seam, every kernel against dense attention with explicit masks.

A chunk here is a chain segment (with a prefix in the chain state) followed by packed segments,
or packed segments alone. The reference concatenates prefix and own keys and builds the mask by
hand: each segment causal over itself, the chain segment also over the whole prefix. Gradients
of the prefix must land in the state; what later chunks sent back for the chain segment's own
keys must be added to its dk/dv.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chunkflow.runtime.attention import ChainSlot, ChunkView, chunk_attention, get_kernel
from chunkflow.runtime.attention.cpu_flash import CPUFlashKernel
from chunkflow.runtime.attention.select import self_check
from chunkflow.runtime.attention.tiled import TiledMathKernel
from chunkflow.runtime.attention.varlen import VarlenKernel
from chunkflow.runtime.kv_state import ChainState
from chunkflow.runtime.memory import MemoryMeter
from tests.runtime.varlen_reference import reference_ops

KERNELS = {
    "cpu-flash": CPUFlashKernel,  # the prefix in one block (at least MIN_PREFIX_BLOCK keys)
    "cpu-flash-blocks": lambda: CPUFlashKernel(prefix_block=5),  # several, merged
    "math": lambda: TiledMathKernel(tile_size=4),
    "varlen-reference": lambda: VarlenKernel(reference_ops(gqa=True)),
    "varlen-reference-no-gqa": lambda: VarlenKernel(reference_ops(gqa=False)),
}


def dense(q, k, v, kp, vp, segments, prefix_len):
    """The chunk's attention with every key in one tensor and the mask written out."""
    h, g = q.shape[1], k.shape[1]
    length = q.shape[2]
    keys = torch.cat([kp, k], 2).repeat_interleave(h // g, 1)
    values = torch.cat([vp, v], 2).repeat_interleave(h // g, 1)
    mask = torch.zeros(length, prefix_len + length, dtype=torch.bool)
    for i, (o, n) in enumerate(segments):
        own = torch.ones(n, n, dtype=torch.bool).tril()
        mask[o:o + n, prefix_len + o:prefix_len + o + n] = own
        if i == 0:
            mask[o:o + n, :prefix_len] = True
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def run(kernel, q, k, v, kp, vp, dout, segments, *, chain: bool, successor_grads=None):
    """chunk_attention's output, input gradients and the state's prefix gradients."""
    prefix_len = kp.shape[2] if chain else 0
    n0 = segments[0][1]
    state = ChainState(layer_ids=[3], seq_len=prefix_len + n0, meter=MemoryMeter(),
                       layout=kernel.state_layout,
                       capacity=kernel.state_capacity(prefix_len + n0, q.shape[2]))
    slot = None
    if chain:
        state.write(3, 0, kp, vp)
        if successor_grads is not None:
            state.add_grad(3, prefix_len, state.as_layout(successor_grads[0]),
                           state.as_layout(successor_grads[1]))
        slot = ChainSlot(state, 3, prefix_len, successor_grads is not None)
    view = ChunkView(tuple(segments), slot, 1 / math.sqrt(q.shape[-1]), 5)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = chunk_attention(*inputs, view, kernel)
    grads = torch.autograd.grad(out, inputs, dout)
    prefix_grads = state.own_grads(3, 0, prefix_len) if chain else None
    return out, grads, prefix_grads


@pytest.mark.parametrize("kernel", KERNELS, ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=lambda x: f"H{x[0]}G{x[1]}")
@pytest.mark.parametrize("segments, prefix_len", [
    ([(0, 6)], 0), ([(0, 6)], 13), ([(0, 7), (7, 3), (10, 1), (11, 5)], 9),
    ([(0, 3), (3, 8)], 0), ([(0, 1)], 4)])
def test_every_kernel_matches_dense_attention(kernel, heads, segments, prefix_len):
    torch.manual_seed(0)
    (h, g), d, dt = heads, 8, torch.float64
    length = sum(n for _, n in segments)
    q, dout = torch.randn(1, h, length, d, dtype=dt), torch.randn(1, h, length, d, dtype=dt)
    k, v = torch.randn(1, g, length, d, dtype=dt), torch.randn(1, g, length, d, dtype=dt)
    kp, vp = torch.randn(1, g, prefix_len, d, dtype=dt), torch.randn(1, g, prefix_len, d, dtype=dt)
    n0 = segments[0][1]
    later = (torch.randn(1, g, n0, d, dtype=dt), torch.randn(1, g, n0, d, dtype=dt))
    chain = prefix_len > 0

    kp_ref, vp_ref = kp.clone().requires_grad_(), vp.clone().requires_grad_()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense(*inputs, kp_ref, vp_ref, segments, prefix_len)
    ref_grads = torch.autograd.grad(ref, [*inputs, kp_ref, vp_ref], dout, allow_unused=True)

    out, grads, prefix_grads = run(KERNELS[kernel](), q, k, v, kp, vp, dout, segments,
                                   chain=chain, successor_grads=later if chain else None)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    dq, dk, dv = ref_grads[:3]
    if chain:  # the chain segment's own keys also get what later chunks sent back
        dk, dv = dk.clone(), dv.clone()
        dk[:, :, :n0] += later[0]
        dv[:, :, :n0] += later[1]
        for got, want in zip(prefix_grads, ref_grads[3:]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for got, want in zip(grads, (dq, dk, dv)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operator returns (test-only: a private torch API)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_math_kernel_temporaries_stay_within_its_tiles():
    """No temporary of the tiled kernel exceeds (tile x tile) scores per head, or the size of
    its inputs and outputs: never (chunk x prefix)."""
    torch.manual_seed(0)
    h, g, d, tile, prefix_len, segments = 4, 2, 8, 8, 256, [(0, 64), (64, 16)]
    length = sum(n for _, n in segments)
    q, dout = torch.randn(1, h, length, d), torch.randn(1, h, length, d)
    k, v = torch.randn(1, g, length, d), torch.randn(1, g, length, d)
    kp, vp = torch.randn(1, g, prefix_len, d), torch.randn(1, g, prefix_len, d)
    with LargestTensor() as mode:
        run(TiledMathKernel(tile_size=tile), q, k, v, kp, vp, dout, segments, chain=True)
    # the inputs, outputs and the chain state itself (allocated here too) set the bound
    bound = max(h * tile * tile, h * length * d, g * (prefix_len + segments[0][1]) * d)
    assert mode.largest <= bound, (mode.largest, bound)
    assert h * length * (prefix_len + length) > 8 * bound  # the dense scores would not fit


def test_auto_picks_cpu_flash_on_cpu_and_names_fall_back_reasons():
    cpu = torch.device("cpu")
    assert get_kernel("auto", cpu, torch.float32).name == "cpu-flash"
    assert get_kernel("sdpa", cpu, torch.float32).name == "cpu-flash"  # the old name
    assert get_kernel("math", cpu, torch.float64).name == "math"
    with pytest.raises(ValueError, match="'varlen' .*(needs CUDA|not available)"):
        get_kernel("varlen", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="needs a CPU model"):
        get_kernel("cpu-flash", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_kernel("flash", cpu, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_a_correct_kernel_and_catches_a_wrong_one(dtype):
    cpu = torch.device("cpu")
    assert self_check(VarlenKernel(reference_ops()), cpu, dtype) is None
    assert self_check(CPUFlashKernel(), cpu, dtype) is None

    class Wrong(VarlenKernel):  # forgets the prefix: a routing bug of the kind it must catch
        def forward(self, q, k, v, view):
            return super().forward(q, k, v, ChunkView(view.segments, None, view.scale,
                                                      view.block_size))

    failure = self_check(Wrong(reference_ops()), cpu, dtype)
    assert failure is not None and "differs from math" in failure


def test_the_private_torch_ops_chunkflow_calls_still_exist():
    """The CPU flash kernel and varlen's backward are private torch ops: a release that renames
    them must fail here, not in a user's run."""
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    from chunkflow.runtime.attention.varlen import _backward_op, torch_varlen_ops

    op, names = _backward_op()
    assert op is torch.ops.torch_attn._varlen_attn_backward
    assert names[:12] == ["grad_out", "query", "key", "value", "out", "lse", "cu_seq_q",
                          "cu_seq_k", "max_q", "max_k", "is_causal", "rng_state"], names
    ops = torch_varlen_ops()
    assert not isinstance(ops, str), ops
    assert ops.gqa  # grouped heads go to the kernel, with or without enable_gqa


def test_self_check_works_under_no_grad_and_inference_mode():
    """An evaluation (no_grad) may be the first to ask auto for a CUDA kernel: the check must
    still run autograd, or it would turn varlen off for the whole process."""
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert self_check(VarlenKernel(reference_ops()), cpu, torch.bfloat16) is None
    with torch.inference_mode():
        assert self_check(VarlenKernel(reference_ops()), cpu, torch.float32) is None


def test_the_torch_binding_runs_on_fake_cuda_tensors():
    """torch's own varlen_attn and backward op, called as the adapter calls them, on fake CUDA
    tensors (shapes and dtypes only): argument names, order and layouts are right without a
    GPU. FakeTensorMode is a private torch API, used here in a test only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from chunkflow.runtime.attention.varlen import torch_varlen_ops

    ops = torch_varlen_ops()
    assert not isinstance(ops, str), ops
    with FakeTensorMode():
        def empty(*shape, dtype=torch.bfloat16):
            return torch.empty(*shape, dtype=dtype, device="cuda")

        q, k, v = empty(40, 4, 64), empty(88, 2, 64), empty(88, 2, 64)
        cu_q = torch.tensor([0, 24, 29, 40], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, 72, 77, 88], dtype=torch.int32, device="cuda")
        out, lse = ops.forward(q, k, v, cu_q, cu_k, 24, 72, scale=0.125)
        assert out.shape == (40, 4, 64) and lse.dtype == torch.float32
        dq, dk, dv = ops.backward(out, q, k, v, out, lse, cu_q, cu_k, 24, 72, scale=0.125)
        assert (dq.shape, dk.shape, dv.shape) == ((40, 4, 64), (88, 2, 64), (88, 2, 64))


def test_older_varlen_signatures_are_detected(monkeypatch):
    """torch releases whose varlen_attn takes is_causal (and no scale, no enable_gqa), and a
    backward op without scale/window_size: the binding must adapt, not pass what is absent."""
    from torch.nn.attention import varlen

    from chunkflow.runtime.attention import varlen as cf_varlen

    calls = {}

    def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                        is_causal=False, return_aux=None):
        calls["forward"] = dict(is_causal=is_causal, return_aux=return_aux)
        return query, torch.zeros(query.shape[1], query.shape[0])

    def old_backward(*args):
        calls["backward"] = args
        return args[1], args[2], args[3]

    names = ["grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k", "max_q",
             "max_k", "is_causal", "rng_state"]
    monkeypatch.setattr(varlen, "varlen_attn", old_varlen_attn)
    monkeypatch.setattr(cf_varlen, "_backward_op", lambda: (old_backward, names))
    ops = cf_varlen.torch_varlen_ops()
    assert not isinstance(ops, str) and ops.gqa is True
    q = torch.zeros(6, 2, 16)
    ops.forward(q, q, q, None, None, 6, 6, scale=0.25)  # 1/sqrt(16): the default
    assert calls["forward"]["is_causal"] is True
    with pytest.raises(ValueError, match="has no scale argument"):
        ops.forward(q, q, q, None, None, 6, 6, scale=0.5)
    ops.backward(q, q, q, q, q, None, None, None, 6, 6, scale=0.25)
    assert len(calls["backward"]) == 12 and calls["backward"][10] is True  # is_causal


def test_a_lone_causal_segment_goes_to_sdpa_and_nothing_else_does():
    """The host-time fast path: a standalone chunk of one sequence is plain causal attention,
    which cpu-flash hands to SDPA (no Python Function); chains, packed chunks, kept outputs
    and kernels that did not say so keep the chunk attention."""
    from chunkflow.runtime.attention import KeptAttention
    from chunkflow.runtime.chunk_call import BoundSegment, ChunkAttention

    state = ChainState(layer_ids=[0], seq_len=8, meter=MemoryMeter())

    def plain(kernel, segments, kept=None):
        return ChunkAttention(segments, kernel, block_size=8, has_successor=False,
                              kept=kept).plain_causal

    lone = [BoundSegment(0, 8, 0, None)]
    assert plain(CPUFlashKernel(), lone)
    assert not plain(CPUFlashKernel(), [BoundSegment(0, 8, 4, state)])          # a chain
    assert not plain(CPUFlashKernel(), [BoundSegment(0, 5, 0, None),
                                        BoundSegment(5, 3, 0, None)])           # packed
    assert not plain(CPUFlashKernel(), lone, kept=KeptAttention())
    assert not plain(TiledMathKernel(), lone)  # tiles on purpose: never L x L scores

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 8, 4, dtype=torch.float64, requires_grad=True)
               for h in (4, 2, 2))
    out = ChunkAttention(lone, CPUFlashKernel(), block_size=8, has_successor=False)(0, q, k, v)
    want = run(CPUFlashKernel(), q.detach(), k.detach(), v.detach(), None, None,
               torch.ones_like(q), [(0, 8)], chain=False)[0]
    assert torch.allclose(out, want, rtol=0, atol=1e-12)
    assert type(out.grad_fn).__name__.startswith("ScaledDotProduct")
