"""Low precision: bf16 kernels accumulate in fp32; bf16 autocast over float32 weights works."""

import pytest
import torch

from chunkflow import ChunkFlowEngine
from tests.conftest import grads, reference_loss, tiny_model
from tests.runtime.test_attention import KERNELS, run


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("kernel", ["cpu-flash", "math", "varlen-reference"])
def test_bf16_prefix_attention_is_as_accurate_as_dense_bf16(kernel, autocast):
    """Against a float64 truth, chunked bf16 attention over 32 prefix blocks must not be
    noticeably worse than one dense bf16 SDPA call (fp32 accumulation across blocks, which
    autocast must not undo)."""
    torch.manual_seed(0)
    H, G, L, P, D = 4, 2, 16, 512, 32
    q64 = torch.randn(1, H, L, D, dtype=torch.float64)
    k64, v64 = torch.randn(1, G, L, D, dtype=torch.float64), torch.randn(1, G, L, D, dtype=torch.float64)
    kp64, vp64 = torch.randn(1, G, P, D, dtype=torch.float64), torch.randn(1, G, P, D, dtype=torch.float64)
    dout64 = torch.randn(1, H, L, D, dtype=torch.float64)
    mask = torch.ones(L, P + L, dtype=torch.bool).tril(P)

    def dense(dtype):
        q, kp = q64.to(dtype).requires_grad_(), kp64.to(dtype).requires_grad_()
        keys = torch.cat([kp, k64.to(dtype)], 2).repeat_interleave(H // G, 1)
        values = torch.cat([vp64, v64], 2).repeat_interleave(H // G, 1).to(dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        dq, dkp = torch.autograd.grad(out, [q, kp], dout64.to(dtype))
        return out.double(), dq.double(), dkp.double()

    truth_out, truth_dq, truth_dkp = dense(torch.float64)
    ref_out, ref_dq, ref_dkp = dense(torch.bfloat16)
    bf16 = [t.bfloat16() for t in (q64, k64, v64, kp64, vp64, dout64)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, (dq, _, _), (dkp, _) = run(KERNELS[kernel](), *bf16, [(0, L)], chain=True)

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert err(out.double(), truth_out) <= 1.25 * err(ref_out, truth_out)
    assert err(dq.double(), truth_dq) <= 1.25 * err(ref_dq, truth_dq)
    # the prefix keys' gradient, accumulated block by block into the (fp32) state
    assert dkp.dtype == torch.float32
    assert err(dkp.double(), truth_dkp) <= 1.25 * err(ref_dkp, truth_dkp)


def test_bf16_autocast_over_float32_weights():
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3) if p.dim() > 1 else None
    batch = [torch.randint(0, 53, (n,)) for n in (40, 5, 3, 17)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_loss(model, batch).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    engine = ChunkFlowEngine(model, chunk_size=8, k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = engine.forward_backward(batch)
    scale = max(g.abs().max() for g in expected.values())
    err = max((g - expected[n]).abs().max() for n, g in grads(model).items()) / scale
    assert err < 3e-2, err  # bf16 rounding, not a different computation
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)


def test_bf16_model_state_grads_are_fp32():
    model = tiny_model(dtype=torch.bfloat16)
    engine = ChunkFlowEngine(model, chunk_size=8, k=1)
    seen = []
    from chunkflow.runtime import kv_state

    original = kv_state.ChainState._allocate

    def spy(self, like):
        original(self, like)
        seen.extend((k.dtype, g.dtype, k.shape[1]) for k, g in zip(self.k.values(), self.grad_k.values()))

    kv_state.ChainState._allocate = spy
    try:
        engine.forward_backward([torch.randint(0, 53, (30,))])
    finally:
        kv_state.ChainState._allocate = original
    # bf16 keys with un-expanded KV heads (2, not 4), float32 gradient buffers, every layer
    assert seen == [(torch.bfloat16, torch.float32, 2)] * model.config.num_hidden_layers


def test_float64_model_under_autocast_stays_exact():
    """Autocast never casts float64, so a float64 model under autocast is still exact."""
    model = tiny_model()
    batch = [torch.randint(0, 53, (n,)) for n in (30, 4, 11)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_loss(model, batch).backward()
        expected = grads(model)
        model.zero_grad(set_to_none=True)
        ChunkFlowEngine(model, chunk_size=4, k=1).forward_backward(batch)
    scale = max(g.abs().max() for g in expected.values())
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=0, atol=1e-12 * scale)
