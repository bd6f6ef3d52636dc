"""The zero-bubble split backward (``I`` then ``W``) equals one ``B``: the same loss and
bitwise the same gradients, for the reference model and transformers models (LoRA included),
with selective recompute and offload; and the refusals."""

import peft
import pytest
import torch

from chunkflow.plan import Action, ActionKind, build_chunks, schedule
from chunkflow.runtime import ChunkFlowEngine
from tests.conftest import tiny_model
from tests.models.test_hf_adapter import build

LENGTHS = [40, 7, 13, 25]


def split(actions):
    out = []
    for a in actions:
        if a.kind is ActionKind.BACKWARD:
            out += [Action(ActionKind.INPUT_BACKWARD, a.chunk_id),
                    Action(ActionKind.WEIGHT_BACKWARD, a.chunk_id)]
        else:
            out.append(a)
    return out


def step(make_model, *, split_backward: bool, vocab: int, **options):
    model = make_model()
    engine = ChunkFlowEngine(model, chunk_size=16, **options)
    g = torch.Generator().manual_seed(0)
    batch = [{"input_ids": torch.randint(0, vocab, (n,), generator=g)} for n in LENGTHS]
    plan = build_chunks(LENGTHS, chunk_size=16)
    actions = schedule(plan, k=options.get("k", 1), recompute=options.get("recompute", "full"))
    result = engine.forward_backward(batch, plan=plan,
                                     actions=split(actions) if split_backward else actions)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return result.loss, grads


@pytest.mark.parametrize("options", [dict(k=1), dict(k=2), dict(k=1, recompute="selective"),
                                     dict(k=1, offload="state"),
                                     dict(k=1, recompute="selective", offload="all")])
def test_input_then_weight_backward_equals_one_backward(options):
    def make():
        return tiny_model(num_hidden_layers=3, dtype=torch.float64)

    loss, want = step(make, split_backward=False, vocab=53, **options)
    loss_split, got = step(make, split_backward=True, vocab=53, **options)
    assert loss_split == loss
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("lora", [False, True])
def test_the_split_backward_of_a_transformers_model(lora):
    def make():
        model = build("qwen2").double()
        if lora:
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                lora_dropout=0.0, init_lora_weights=False)).double()
        return model

    vocab = build("qwen2").config.vocab_size
    loss, want = step(make, split_backward=False, vocab=vocab, k=1)
    loss_split, got = step(make, split_backward=True, vocab=vocab, k=1)
    assert loss_split == loss
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_activation_checkpointing_is_refused_with_the_split_backward():
    with pytest.raises(ValueError, match="recompute every layer a second time"):
        step(lambda: tiny_model(num_hidden_layers=2, dtype=torch.float64),
             split_backward=True, vocab=53, k=1, activation_checkpointing=True)


@pytest.mark.parametrize("name, kwargs, why", [
    ("zb-h1", dict(pp=1), "one stage has no bubbles"),
    ("zb-h1", dict(ac=True), "activation checkpointing"),
    ("zb-h1", dict(fsdp=True), "FSDP2 reduces"),
])
def test_a_parallel_engine_refuses_what_zero_bubble_cannot_run(name, kwargs, why):
    from types import SimpleNamespace

    from chunkflow.parallel.engine import _check_zero_bubble
    from chunkflow.runtime.options import ChunkingOptions

    ctx = SimpleNamespace(pp_enabled=kwargs.get("pp", 2) > 1, dp_enabled=True)
    options = ChunkingOptions(chunk_size=16, k=1,
                              activation_checkpointing=kwargs.get("ac", False))
    with pytest.raises(ValueError, match=why):
        _check_zero_bubble(name, ctx, options, "fsdp" if kwargs.get("fsdp") else "ddp")
