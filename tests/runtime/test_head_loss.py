"""The chunk loss without full-vocabulary logits equals the plain logits + cross-entropy path:
every head kind, both implementations (torch's fused op and the blocked fallback), float64."""

import pytest
import torch
from torch import nn

from chunkflow import ChunkFlowEngine
from chunkflow.runtime import head_loss as hl
from chunkflow.runtime.loss import weighted_cross_entropy
from tests.conftest import grads, reference_loss, tiny_model

peft = pytest.importorskip("peft")


def heads():
    torch.manual_seed(0)
    plain = nn.Linear(16, 90, bias=False).double()
    biased = nn.Linear(16, 90, bias=True).double()
    frozen = nn.Linear(16, 90, bias=False).double().requires_grad_(False)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16).double()
            self.lm_head = nn.Linear(16, 90, bias=False).double()

    lora = peft.get_peft_model(Holder(), peft.LoraConfig(r=3, target_modules=["lm_head"],
                                                         init_lora_weights=False)).double()
    saved = peft.get_peft_model(Holder(), peft.LoraConfig(r=3, target_modules=["proj"],
                                                          modules_to_save=["lm_head"]))
    return {"linear": plain, "bias": biased, "frozen": frozen,
            "lora": lora.base_model.model.lm_head, "modules_to_save": saved.base_model.model.lm_head}


@pytest.mark.parametrize("fallback", [False, True], ids=["torch-op", "blocked"])
@pytest.mark.parametrize("kind", ["linear", "bias", "frozen", "lora", "modules_to_save"])
def test_fused_loss_equals_plain_logits(kind, fallback, monkeypatch):
    head = heads()[kind]
    if fallback:
        monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    assert hl.head_parameters(head) is not None
    torch.manual_seed(1)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 90, (37,))
    targets[::4] = -100
    weights = torch.rand(37, dtype=torch.float64) * (targets != -100)
    params = [hidden] + [p for p in head.parameters() if p.requires_grad]
    want = weighted_cross_entropy(head(hidden), targets, weights)
    want_grads = torch.autograd.grad(want, params)
    got = hl.head_loss(hidden, head, targets, weights, logits_budget=8 * 90 * 5)  # 5 rows
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_a_head_it_cannot_read_takes_the_plain_path():
    class Scaled(nn.Module):  # e.g. logits scaled after the matmul
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 7).double()

        def forward(self, x):
            return 2 * self.inner(x)

    head, hidden = Scaled(), torch.randn(5, 4, dtype=torch.float64)
    targets, weights = torch.arange(5), torch.ones(5, dtype=torch.float64)
    assert hl.head_parameters(head) is None
    torch.testing.assert_close(hl.head_loss(hidden, head, targets, weights, logits_budget=1),
                               weighted_cross_entropy(head(hidden), targets, weights))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_engine_with_the_fused_loss_equals_unchunked_training(tied, normalization):
    model = tiny_model(tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(3)
    batch = []
    for n in (23, 4, 9, 1, 15):
        ids = torch.randint(0, 53, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100
        batch.append({"input_ids": ids, "labels": labels})
    reference_loss(model, batch, normalization).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    engine = ChunkFlowEngine(model, chunk_size=8, k=1, loss_normalization=normalization,
                             logits_budget=8 * 53 * 3)  # 3 rows of logits at a time
    result = engine.forward_backward(batch)
    for name, w in want.items():
        torch.testing.assert_close(grads(model)[name], w, rtol=0, atol=1e-12)
    # the loss step keeps no (chunk x vocabulary) tensor for backward
    plain = ChunkFlowEngine(model, chunk_size=8, k=1, loss_normalization=normalization)
    model.zero_grad(set_to_none=True)
    assert result.peak_memory_bytes < plain.forward_backward(batch).peak_memory_bytes


def test_blocked_weight_gradient_accumulates_in_float32_under_bf16(monkeypatch):
    """torch < 2.13 (the blocked fallback) under bf16 autocast with a float32 head: the weight
    gradient over 1024 one-row blocks equals the float64 reference (of the same bf16 inputs and
    bf16 logits) to float32 accumulation error. Rounding each block's (V, E) partial to bf16
    before the sum, or the result on the way back to the float32 weight, is off by ~2e-3."""
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy")
    torch.manual_seed(0)
    num_tokens, vocab, hidden_size = 1024, 64, 32
    head = nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(num_tokens, hidden_size)
    targets = torch.randint(0, vocab, (num_tokens,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hl.head_loss(hidden, head, targets, torch.ones(num_tokens),
                            logits_budget=vocab * 4)  # one row per block
    loss.backward()
    h = hidden.bfloat16().double()
    logits = (h @ head.weight.detach().bfloat16().double().T).bfloat16().double()
    g = torch.softmax(logits, -1)
    g[torch.arange(num_tokens), targets] -= 1
    want = g.T @ h
    assert head.weight.grad.dtype == torch.float32
    error = (head.weight.grad.double() - want).norm() / want.norm()
    assert error < 1e-5, error  # float32 accumulation over 1024 blocks: ~1e-6
