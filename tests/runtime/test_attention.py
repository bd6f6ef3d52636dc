"""Prefix attention (LSE merge over key blocks) against dense attention with a lower-right mask."""

import pytest
import torch

from chunkflow.runtime.attention import MathKernel, PrefixKV, SDPACPUKernel, prefix_causal_attention


class _State:
    """Minimal chain state: one layer, keys/values and gradient buffers."""

    def __init__(self, k, v):
        self.k, self.v = [k], [v]
        self.gk, self.gv = torch.zeros_like(k), torch.zeros_like(v)

    def grads(self, layer_idx):
        return self.gk, self.gv


@pytest.mark.parametrize("kernel", [SDPACPUKernel(), MathKernel()], ids=lambda k: k.name)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("prefix_len, block_size", [(0, 4), (5, 5), (13, 4), (9, 100)])
def test_prefix_attention_matches_dense(kernel, num_heads, num_kv_heads, prefix_len, block_size):
    torch.manual_seed(0)
    L, D, dt = 6, 8, torch.float64
    q = torch.randn(1, num_heads, L, D, dtype=dt, requires_grad=True)
    k = torch.randn(1, num_kv_heads, L, D, dtype=dt, requires_grad=True)
    v = torch.randn(1, num_kv_heads, L, D, dtype=dt, requires_grad=True)
    # the state is longer than the prefix: the view must be respected
    kp = torch.randn(1, num_kv_heads, prefix_len + 3, D, dtype=dt)
    vp = torch.randn(1, num_kv_heads, prefix_len + 3, D, dtype=dt)

    kp_ref = kp[:, :, :prefix_len].clone().requires_grad_()
    vp_ref = vp[:, :, :prefix_len].clone().requires_grad_()
    keys = torch.cat([kp_ref, k], 2).repeat_interleave(num_heads // num_kv_heads, 1)
    values = torch.cat([vp_ref, v], 2).repeat_interleave(num_heads // num_kv_heads, 1)
    mask = torch.ones(L, prefix_len + L, dtype=torch.bool).tril(prefix_len)
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [q, k, v, kp_ref, vp_ref], dout)

    state = _State(kp, vp)
    out = prefix_causal_attention(q, k, v, PrefixKV(state, 0, prefix_len, block_size), kernel)
    got = torch.autograd.grad(out, [q, k, v], dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(got, ref_grads[:3]):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    torch.testing.assert_close(state.gk[:, :, :prefix_len], ref_grads[3], rtol=0, atol=1e-12)
    torch.testing.assert_close(state.gv[:, :, :prefix_len], ref_grads[4], rtol=0, atol=1e-12)
    assert not state.gk[:, :, prefix_len:].any()  # positions past the prefix untouched
