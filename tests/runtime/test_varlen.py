"""The CUDA ``varlen`` path's contract, checked on CPU: grouped heads reach the kernel
unexpanded on every torch signature, the kernel is chosen (and self-checked) for the model's
head shape, the engine keeps it across steps, chunk boundaries are built right, and q/k/v and
dout reach the kernel without layout copies.

torch's ``varlen_attn`` is replaced by the CPU reference of its contract
(``tests/runtime/varlen_reference.py``) behind torch's own signatures.
"""

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chunkflow import ChunkFlowEngine
from chunkflow.models import ModelConfig
from chunkflow.runtime.attention import ChunkView, chunk_attention, get_kernel, select
from chunkflow.runtime.attention import varlen as cf_varlen
from chunkflow.runtime.attention.select import auto_varlen, model_heads
from chunkflow.runtime.attention.varlen import VarlenKernel, VarlenOps, cu_seqlens
from tests.conftest import tiny_model
from tests.runtime.test_attention import dense, run
from tests.runtime.varlen_reference import (
    BACKWARD_ARGUMENTS,
    reference_ops,
    torch_varlen_functions,
)

CPU = torch.device("cpu")


# -- grouped heads ---------------------------------------------------------------------------

@pytest.mark.parametrize("enable_gqa_argument", [False, True], ids=["torch2.11", "torch2.12+"])
def test_grouped_keys_reach_torch_varlen_unexpanded(monkeypatch, enable_gqa_argument):
    """torch 2.11's varlen_attn has no enable_gqa but hands k/v to FlashAttention, which takes
    fewer key/value heads natively: the binding must pass (T, G, D) keys there too, not
    expand them to the query heads (H / G times the memory and bandwidth), forward and
    backward, and the result is still exact attention."""
    from torch.nn.attention import varlen

    calls = []
    attn, backward = torch_varlen_functions(enable_gqa_argument=enable_gqa_argument,
                                            calls=calls)
    monkeypatch.setattr(varlen, "varlen_attn", attn)
    monkeypatch.setattr(cf_varlen, "_backward_op", lambda: (backward, BACKWARD_ARGUMENTS))
    ops = cf_varlen.torch_varlen_ops()
    assert not isinstance(ops, str), ops

    torch.manual_seed(0)
    h, g, d, dt, prefix_len, segments = 6, 2, 8, torch.float64, 9, [(0, 7), (7, 3), (10, 5)]
    length = sum(n for _, n in segments)
    q, dout = torch.randn(1, h, length, d, dtype=dt), torch.randn(1, h, length, d, dtype=dt)
    k, v, kp, vp = (torch.randn(1, g, n, d, dtype=dt) for n in (length, length, prefix_len,
                                                                   prefix_len))
    out, grads, prefix_grads = run(VarlenKernel(ops), q, k, v, kp, vp, dout, segments,
                                   chain=True)
    assert [c[0] for c in calls] == ["forward", "backward"]
    for _, q_shape, k_shape, v_shape in calls:
        assert q_shape[1] == h and k_shape[1] == v_shape[1] == g, (q_shape, k_shape)

    inputs = [t.clone().requires_grad_() for t in (q, k, v, kp, vp)]
    want = dense(*inputs[:3], *inputs[3:], segments, prefix_len)
    want_grads = torch.autograd.grad(want, inputs, dout)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    for got, w in zip((*grads, *prefix_grads), want_grads):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-12)


# -- choosing the kernel for the model's heads -----------------------------------------------

class RecordingOps:
    """The reference contract, recording the (q, k) head counts and head dim of each call;
    ``fails_above``: raise for head dims above it (a kernel that cannot run them)."""

    def __init__(self, fails_above: int | None = None):
        self.shapes, self.fails_above, self.inner = [], fails_above, reference_ops()

    def ops(self) -> VarlenOps:
        def forward(q, k, v, *args, **kwargs):
            self.shapes.append((q.shape[1], k.shape[1], q.shape[2]))
            if self.fails_above is not None and q.shape[2] > self.fails_above:
                raise RuntimeError(f"head dim {q.shape[2]} is not supported on this device")
            return self.inner.forward(q, k, v, *args, **kwargs)

        return VarlenOps(forward, self.inner.backward, gqa=True, name=f"recording{id(self)}")


def test_auto_self_checks_varlen_at_the_models_heads():
    """The self-check runs at the model's (H, G, D), so a kernel that runs at (4, 2, 64) but
    not at the model's head dim falls back to math, with the reason."""
    fine = RecordingOps()
    kernel = auto_varlen(CPU, torch.bfloat16, (6, 2, 24), fine.ops())
    assert kernel.name == "varlen" and set(fine.shapes) == {(6, 2, 24)}

    broken = RecordingOps(fails_above=64)
    with pytest.warns(UserWarning, match=r"self-check at .*\(4, 2, 128\).*head dim 128"):
        assert auto_varlen(CPU, torch.bfloat16, (4, 2, 128), broken.ops()).name == "math"
    assert auto_varlen(CPU, torch.bfloat16, (4, 2, 64), broken.ops()).name == "varlen"


@pytest.mark.parametrize("head_dim", [60, 264])
def test_varlen_refuses_head_dims_flash_attention_cannot_take(head_dim):
    """FlashAttention 2 takes head dims that are multiples of 8 up to 256: auto falls back to
    math saying so (without running the self-check); varlen by name is a ValueError."""
    ops = RecordingOps()
    with pytest.warns(UserWarning, match=f"multiple of 8 and at most 256, the model's is "
                                         f"{head_dim}"):
        assert auto_varlen(CPU, torch.bfloat16, (4, 2, head_dim), ops.ops()).name == "math"
    assert ops.shapes == []
    with pytest.raises(ValueError, match=f"'varlen' cannot run this model: .*the model's is "
                                         f"{head_dim}; valid: 'auto' or 'math'"):
        get_kernel("varlen", torch.device("cuda"), torch.bfloat16, heads=(4, 2, head_dim))


def test_model_heads_reads_chunkflow_and_transformers_configs():
    config = ModelConfig(vocab_size=53, hidden_size=96, intermediate_size=40,
                         num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2)
    assert model_heads(config) == (6, 2, 16)
    hf_like = types.SimpleNamespace(num_attention_heads=8, hidden_size=512,
                                    num_key_value_heads=None, head_dim=None)
    assert model_heads(hf_like) == (8, 8, 64)
    assert model_heads(types.SimpleNamespace()) is None


# -- across steps ----------------------------------------------------------------------------

def test_the_engine_keeps_its_kernel_across_steps(monkeypatch):
    """A kernel built per step would self-check and copy its chunk boundaries to the device
    again every step: the engine builds one per (backend, device, dtype, heads)."""
    from chunkflow.runtime import engine as engine_module

    built = []

    def counting_get_kernel(*args, **kwargs):
        built.append((args, kwargs))
        return get_kernel(*args, **kwargs)

    monkeypatch.setattr(engine_module, "get_kernel", counting_get_kernel)
    model = tiny_model()
    engine = ChunkFlowEngine(model, chunk_size=4, k=1, attention_backend="math")
    batch = [torch.randint(0, 53, (n,)) for n in (9, 3)]
    engine.forward_backward(batch)
    engine.forward_backward(batch)
    engine.evaluate(batch)
    assert len(built) == 1 and built[0][1] == {"heads": (4, 2, 8)}, built
    # keyed by the normalised device: cuda and cuda:0 are one GPU (no CUDA needed for math)
    assert engine._kernel(torch.device("cuda")) is engine._kernel(torch.device("cuda:0"))


def test_cu_seqlens_are_the_int32_boundaries_of_each_list():
    cu_q, cu_k = cu_seqlens(([3, 5, 2], [12, 5, 2]), CPU)
    assert cu_q.tolist() == [0, 3, 8, 10] and cu_k.tolist() == [0, 12, 17, 19]
    assert cu_q.dtype == cu_k.dtype == torch.int32
    assert cu_q.is_contiguous() and cu_k.is_contiguous()
    (only,) = cu_seqlens(([7],), CPU)
    assert only.tolist() == [0, 7]


# -- layout copies ---------------------------------------------------------------------------

class CountCopies(TorchDispatchMode):
    """Operators that copy tensor data (test-only: a private torch API)."""

    COPIES = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default,
              torch.ops.aten._to_copy.default}

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.COPIES:
            self.copies.append((func, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def shape_only_ops() -> VarlenOps:
    """A varlen kernel that copies nothing itself (outputs of the right shape), so every copy
    counted is the adapter's."""

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, *, scale):
        return torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, *, scale):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    return VarlenOps(forward, backward, gqa=True, name="shape-only")


@pytest.mark.parametrize("token_major", [True, False], ids=["model-layout", "contiguous-bhsd"])
def test_varlen_takes_one_layout_end_to_end(token_major):
    """q/k/v as the models hand them over ((1, L, H, D) memory seen as (1, H, L, D)) and the
    gradient of the output reach the kernel without a copy; contiguous (1, H, L, D) inputs cost
    one copy each, not two (one to (1, H, L, D), one back to token-major)."""
    h, g, d, length = 4, 2, 8, 12

    def make(heads):
        if token_major:
            return torch.randn(1, length, heads, d).transpose(1, 2)
        return torch.randn(1, heads, length, d)

    q, k, v, dout = make(h).requires_grad_(), make(g).requires_grad_(), \
        make(g).requires_grad_(), make(h)
    view = ChunkView(((0, 5), (5, 7)), None, d ** -0.5, 4)
    with CountCopies() as mode:
        out = chunk_attention(q, k, v, view, VarlenKernel(shape_only_ops()))
        torch.autograd.grad(out, (q, k, v), dout)
    assert len(mode.copies) == (0 if token_major else 4), mode.copies


def test_select_module_keeps_the_self_check_cache_per_heads():
    """Two models with different heads on one device each get their own self-check."""
    a, b = RecordingOps(), RecordingOps()
    ops = a.ops()
    auto_varlen(CPU, torch.float16, (4, 4, 16), ops)
    auto_varlen(CPU, torch.float16, (4, 4, 16), ops)
    auto_varlen(CPU, torch.float16, (4, 1, 16), b.ops())
    assert len(a.shapes) == 1 and set(b.shapes) == {(4, 1, 16)}
    assert any(key[2] == (4, 1, 16) for key in select._SELF_CHECKS)
