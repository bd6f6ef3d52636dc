"""Hugging Face transformers models under ChunkFlowEngine: gradients equal plain training.

The reference is the unmodified model called as users call it, ``model(input_ids=...)``, one
sequence at a time, with the token-mean loss over the whole batch, in float64.
"""

import pytest
import torch
import transformers

from chunkflow import ChunkFlowEngine
from chunkflow.models.hf import ATTN_NAME

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=8)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=None)),
    # transformers-only families (chunkflow.models.families: reference=False). The MoE models'
    # "eager" experts run in float64 (the grouped-mm kernel has no float64); routing is per
    # token, and neither side adds the router's auxiliary loss (output_router_logits=False).
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(head_dim=8, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=24, experts_implementation="eager")),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                     experts_implementation="eager")),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM,
              dict(eos_token_id=None, pad_token_id=None)),
    # Granite's multipliers, none of them 1: the attention scale is not 1/sqrt(head_dim)
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                dict(attention_multiplier=0.3, embedding_multiplier=2.0,
                     residual_multiplier=0.5, logits_scaling=4.0, attention_bias=True)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(sliding_window=None, eos_token_id=None, pad_token_id=None,
                  bos_token_id=None)),
}
LENGTHS = (37, 5, 12, 70, 3, 16)


def build(family: str, *, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**SMALL, **extra, **overrides}, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = model_cls(config).double()
    with torch.no_grad():  # far from uniform attention, so prefix mistakes would show
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def make_batch(vocab: int, *, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        if i % 2:  # prompt tokens unsupervised, as in SFT
            labels[: n // 3] = -100
        batch.append({"input_ids": ids, "labels": labels})
    return batch


def plain_step(model, batch) -> torch.Tensor:
    """Unchunked training as users run it: model(input_ids=...) per sequence, token mean."""
    total, count = 0.0, 0
    for item in batch:
        logits = model(input_ids=item["input_ids"][None]).logits[0]
        targets = item["labels"][1:]
        total = total + torch.nn.functional.cross_entropy(
            logits[:-1], targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    loss = total / count
    loss.backward()
    return loss.detach()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-9):
    assert got.keys() == want.keys() and want
    for name, g in want.items():
        err = (got[name] - g).norm() / g.norm().clamp_min(1e-300)
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_size, k", [(16, 1), (16, 8), (128, 1), (7, 2)])
def test_gradients_equal_plain_training(family, chunk_size, k):
    model = build(family)
    batch = make_batch(model.config.vocab_size)
    want_loss = plain_step(model, batch)
    want = grads(model)
    model.zero_grad(set_to_none=True)

    result = ChunkFlowEngine(model, chunk_size=chunk_size, k=k).forward_backward(batch)
    torch.testing.assert_close(result.loss, want_loss, rtol=1e-12, atol=0)
    assert_grads_close(grads(model), want)
    if chunk_size == 16:  # both packed short sequences and chains of long ones
        assert result.plan.chains and any(len(c.segments) > 1 for c in result.plan.chunks)


def test_lora_adapters_get_the_gradients_of_plain_training():
    peft = pytest.importorskip("peft")
    model = build("qwen2")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           lora_dropout=0.0, init_lora_weights=False)  # random A and B
    model = peft.get_peft_model(model, lora).double()
    batch = make_batch(61)
    plain_step(model, batch)
    want = grads(model)
    assert want and all("lora_" in name for name in want)
    model.zero_grad(set_to_none=True)

    ChunkFlowEngine(model, chunk_size=16, k=1).forward_backward(batch)
    got = grads(model)
    assert got.keys() == want.keys()  # frozen base weights receive no gradient
    assert_grads_close(got, want)


def test_the_model_and_other_models_are_unchanged_outside_the_engine():
    model, other = build("llama"), build("qwen3", seed=3)
    ids = torch.randint(0, 61, (1, 20))
    before, before_other = model(input_ids=ids).logits, other(input_ids=ids).logits
    ChunkFlowEngine(model, chunk_size=8).forward_backward([ids[0]])
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model(input_ids=ids).logits, before)
    assert torch.equal(other(input_ids=ids).logits, before_other)
    # the registered name only works inside the engine, with a clear error otherwise
    model.config._attn_implementation = ATTN_NAME
    with pytest.raises(RuntimeError, match="runs only inside ChunkFlowEngine"):
        model(input_ids=ids)


def _gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, head_dim=8))


@pytest.mark.parametrize("make, reason", [
    (lambda: build("mistral", sliding_window=32), "sliding_window=32: sliding-window attention"),
    (lambda: build("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0),
     "sliding"),
    (lambda: build("llama", attention_dropout=0.1), "attention_dropout=0.1"),
    (lambda: build("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                             "rope_theta": 10000.0}), "rope_type 'dynamic'"),
    (_gemma2, "model_type 'gemma2' is not supported yet; supported: llama, qwen2, qwen3, "
              "mistral, qwen3_moe, mixtral, olmo2, granite, phi3"),
    (lambda: build("mixtral", output_router_logits=True), "output_router_logits=True: the "
                                                         "router's auxiliary load-balancing loss"),
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16,
                                                                   n_head=2)),
     "model_type 'gpt2' is not supported"),
    (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)), "encoder-decoder"),
])
def test_unsupported_models_are_refused_with_the_reason(make, reason):
    model = make()
    with pytest.raises(ValueError, match="cannot be trained with chunkflow: .*" +
                       reason.replace("(", r"\(").replace("[", r"\[")):
        ChunkFlowEngine(model, chunk_size=16)


def test_not_a_model_is_refused():
    with pytest.raises(ValueError, match="neither a chunkflow.models.Transformer nor a Hugging "
                                         "Face transformers causal LM"):
        ChunkFlowEngine(torch.nn.Linear(2, 2), chunk_size=16)


def test_a_user_subclass_of_a_transformers_model_is_accepted():
    class MyLlama(transformers.LlamaForCausalLM):  # defined outside transformers
        pass

    model = MyLlama(build("llama").config).double()
    ChunkFlowEngine(model, chunk_size=8).forward_backward([torch.arange(20) % 61])
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["math", "varlen"])
def test_every_cpu_attention_backend_gives_the_plain_gradients(family, backend, k):
    """cpu-flash (the default) is the grid above; the tiled math kernel and varlen's adapter
    (over the CPU reference of its contract) on every family too."""
    from chunkflow.runtime.attention.tiled import TiledMathKernel
    from chunkflow.runtime.attention.varlen import VarlenKernel
    from tests.runtime.varlen_reference import reference_ops

    kernel = TiledMathKernel(tile_size=5) if backend == "math" else VarlenKernel(reference_ops())
    model = build(family)
    batch = make_batch(model.config.vocab_size)
    plain_step(model, batch)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    ChunkFlowEngine(model, chunk_size=16, k=k, attention_backend=kernel).forward_backward(batch)
    assert_grads_close(grads(model), want)


@pytest.mark.parametrize("backend", ["cpu-flash", "varlen"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gradient_checkpointing_on_stays_exact(family, reentrant, backend):
    """transformers' gradient checkpointing (TRL turns it on by default) used to end in
    torch.utils.checkpoint.CheckpointError (non-reentrant) or wrong gradients (reentrant)."""
    model = build(family)
    batch = make_batch(model.config.vocab_size)
    want_loss = plain_step(model, batch)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5: the new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    if backend == "varlen":
        from chunkflow.runtime.attention.varlen import VarlenKernel
        from tests.runtime.varlen_reference import reference_ops

        backend = VarlenKernel(reference_ops())
    for k in (1, 2):
        result = ChunkFlowEngine(model, chunk_size=16, k=k,
                                 attention_backend=backend).forward_backward(batch)
        torch.testing.assert_close(result.loss, want_loss, rtol=1e-12, atol=0)
        assert_grads_close(grads(model), want)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("lora_head", [False, True])
def test_the_fused_loss_through_a_transformers_model(lora_head):
    """A head too large for the logits budget takes the fused loss; tied embeddings (Qwen2) and
    a LoRA adapter on the head itself, with the gradients of plain training."""
    model = build("qwen2", tie_word_embeddings=True)
    if lora_head:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)).double()
    batch = make_batch(61)
    plain_step(model, batch)
    want = grads(model)
    model.zero_grad(set_to_none=True)
    ChunkFlowEngine(model, chunk_size=16, k=2, logits_budget=8 * 61 * 3).forward_backward(batch)
    assert_grads_close(grads(model), want)


def test_the_family_table_says_which_layouts_each_family_runs():
    from chunkflow.models.families import FAMILIES, REFERENCE_FAMILIES
    from chunkflow.models.hf import SUPPORTED_MODEL_TYPES
    from chunkflow.parallel.pipeline import split_stage
    from chunkflow.models.adapter import adapt

    def check_parallel_family(model, what, valid):
        adapt(model, what=what, valid=valid).check_parallel(what, valid)

    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES) == set(globals()["FAMILIES"])
    assert set(REFERENCE_FAMILIES) == {"llama", "qwen2", "qwen3", "mistral"}
    check_parallel_family(build("qwen3"), "tensor parallelism", "tp=1")  # has a plan
    for family in ("olmo2", "phi3", "mixtral", "qwen3_moe"):
        with pytest.raises(ValueError, match=f"tensor parallelism for model_type '{family}'"):
            check_parallel_family(build(family), "tensor parallelism", "tp=1")
    with pytest.raises(ValueError, match="pipeline parallelism for model_type 'phi3'.*fused"):
        split_stage(build("phi3"), 0, 2)


def test_the_attention_implementation_is_set_once_a_step_and_restored(monkeypatch):
    """Setting a transformers config attribute runs Python: once a step, not per chunk."""
    model = build("qwen2")
    sets = []
    cls = type(model.config)
    original = cls.__setattr__

    def counting(self, name, value):
        if name == "_attn_implementation":
            sets.append(value)
        original(self, name, value)

    monkeypatch.setattr(cls, "__setattr__", counting)
    engine = ChunkFlowEngine(model, chunk_size=8, k=1)
    result = engine.forward_backward(make_batch(model.config.vocab_size))
    assert result.num_chunks > 4
    assert sets == [ATTN_NAME, "sdpa"], sets
    assert model.config._attn_implementation == "sdpa"
