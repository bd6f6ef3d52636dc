"""HF checkpoints: logits and tensors against plain ``transformers`` models; every refusal.

The reference is always a ``LlamaForCausalLM``/``Qwen2ForCausalLM`` built by ``transformers``
itself, never our own output."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from chunkflow.models import ModelConfig, Transformer
from chunkflow.models.hf_checkpoint import (config_from_hf, config_to_hf, load_hf_checkpoint,
                                            save_hf_checkpoint)
from tests.conftest import tiny_model

# GQA (4 query heads, 2 KV heads), non-default theta and eps so a mis-mapped field shows.
SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5)
VARIANTS = {
    "llama": (LlamaConfig, {}),
    "llama-tied": (LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-bias": (LlamaConfig, dict(attention_bias=True)),
    "llama-head-dim": (LlamaConfig, dict(head_dim=16)),  # head_dim != hidden/heads
    "qwen2": (Qwen2Config, {}),
    "qwen2-tied": (Qwen2Config, dict(tie_word_embeddings=True)),
    # Qwen3: per-head q/k norms; its config class defaults head_dim to 128, not hidden/heads
    "qwen3": (Qwen3Config, dict(head_dim=16)),
    "qwen3-bias-tied": (Qwen3Config, dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral": (MistralConfig, dict(sliding_window=None)),
    # static RoPE variants, with a pre-training context (16) shorter than the test's 50 tokens
    "llama3.1-rope": (LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "yarn-rope": (Qwen2Config, dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "yarn-mscale-rope": (LlamaConfig, dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 0.5, "beta_fast": 16})),
    "linear-rope": (LlamaConfig, dict(rope_parameters={"rope_type": "linear", "factor": 2.0})),
}


def hf_model(name: str, seed: int = 0):
    config_cls, extra = VARIANTS[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**SHAPE, **extra), dtype=torch.float32)
    # HF initialises biases to 0 and norms to 1, which would hide a dropped bias or norm weight;
    # large weights also make logits O(1), so the 1e-5 tolerance is meaningful.
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0.0, 0.3)
    return model.eval()


def ids(seq_len: int = 50, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, SHAPE["vocab_size"], (batch, seq_len), generator=generator)


def hf_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def assert_same_weights(ours: Transformer, hf) -> None:
    hf_state = hf.state_dict()
    for k, t in ours.state_dict().items():
        assert torch.equal(t, hf_state[k]), k
    assert set(ours.state_dict()) == {k for k in hf_state if not k.endswith("inv_freq")}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_load_matches_transformers(tmp_path, name):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    model = load_hf_checkpoint(tmp_path)
    assert model.config.model_type == hf.config.model_type
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert_same_weights(model, hf)
    if hf.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_logits(hf, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-tied", "llama-bias", "qwen2", "qwen3-bias-tied",
                                  "mistral", "llama3.1-rope", "yarn-rope"])
def test_round_trip_through_transformers(tmp_path, name):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    save_hf_checkpoint(load_hf_checkpoint(tmp_path / "hf"), tmp_path / "ours")
    if hf.config.tie_word_embeddings:  # stored once, as HF does
        assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(hf)
    assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
    for k, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k
    x = ids()
    torch.testing.assert_close(hf_logits(back, x), hf_logits(hf, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(model_type="qwen2"), dict(model_type="llama"),
                                       dict(model_type="llama", attention_bias=True,
                                            tie_word_embeddings=True, head_dim=12),
                                       dict(model_type="qwen3", rope_scaling={
                                           "rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 16}),
                                       dict(model_type="mistral")])
def test_native_model_saved_runs_the_same_in_transformers(tmp_path, overrides):
    """A model chunkflow built (not loaded) computes the same logits under transformers."""
    model = tiny_model(dtype=torch.float32, **overrides)
    save_hf_checkpoint(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_weights(model, hf)
    x = torch.randint(0, 53, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_logits(hf, x), rtol=0, atol=1e-5)


def test_sharded_checkpoint(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_hf_checkpoint(tmp_path)
    assert_same_weights(model, hf)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_logits(hf, x), rtol=0, atol=1e-5)


def test_dtypes(tmp_path):
    hf = hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    ours = load_hf_checkpoint(tmp_path / "bf16")  # default: the stored dtype
    assert ours.lm_head.weight.dtype == torch.bfloat16
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    # Same op order as transformers, so bf16 agrees exactly too. The reference must come from
    # from_pretrained: hf.to(bfloat16) also rounds HF's inv_freq buffer and so its RoPE angles.
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(reference, x), rtol=0, atol=0)
    model = load_hf_checkpoint(tmp_path / "bf16", dtype="float32")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    save_hf_checkpoint(model, tmp_path / "out", dtype=torch.bfloat16)
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    for k, t in hf.state_dict().items():  # bf16 -> f32 -> bf16 is exact
        assert torch.equal(stored[k], t), k
    with pytest.raises(ValueError, match="dtype='int8'.*bfloat16"):
        save_hf_checkpoint(model, tmp_path / "bad", dtype="int8")


def test_config_round_trip_and_presets():
    from chunkflow.models import PRESETS
    for config in PRESETS.values():
        assert config_from_hf(config_to_hf(config, dtype="bfloat16")) == config
    # transformers 4.x layout: top-level rope_theta, rope_scaling null, no head_dim
    v4 = dict(model_type="qwen2", vocab_size=10, hidden_size=16, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2, rope_theta=1e6, rope_scaling=None,
              num_key_value_heads=None)
    assert config_from_hf(v4) == ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=8,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             model_type="qwen2", rope_theta=1e6)
    v5 = {k: v for k, v in v4.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert config_from_hf(v5).rope_theta == 1e6


BASE = config_to_hf(ModelConfig(**SHAPE), dtype="float32")


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma"), r"model_type='gemma'.*'llama', 'qwen2', 'qwen3', 'mistral'"),
    (dict(model_type="mistral", use_sliding_window=None), r"sliding_window=4096.*null"),
    (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types="),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'.*silu"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"rope_scaling.rope_type='dynamic'.*static"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e3}),
     r"rope_type 'llama3' needs low_freq_factor, high_freq_factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "beta_fast": 3,
                           "rope_theta": 5e3}), r"rope_type 'linear' takes \['factor'\]"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
     r"rope_parameters.rope_theta=500000.0.*top-level rope_theta=5000.0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 5e3,
                           "partial_rotary_factor": 0.5}), r"rope_parameters="),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5"),
    (dict(model_type="qwen2", use_sliding_window=True), r"use_sliding_window=True.*full causal"),
    (dict(mlp_bias=True), r"mlp_bias=True"),
    (dict(attention_dropout=0.1), r"attention_dropout=0.1.*0.0"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), r"quantization_config="),
    (dict(head_dim=7), r"head_dim=7 must be even"),
    (dict(num_key_value_heads=3), r"multiple of num_key_value_heads=3"),
    (dict(vocab_size=None), r"required field\(s\) missing: vocab_size"),
])
def test_config_refusals(change, message):
    hf = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=r"^ckpt/config.json: .*" + message):
        config_from_hf(hf, source="ckpt/config.json")


def test_refusals_on_load(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)

    # Stale rotary buffers from old checkpoints are ignored ...
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)},
              weights, metadata={"format": "pt"})
    load_hf_checkpoint(tmp_path)
    # ... but any other key mismatch names the keys.
    bad = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    bad["model.layers.0.mlp.up_proj.bias"] = torch.zeros(48)
    save_file(bad, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: \[model.layers.1.mlp.up_proj.weight\]; "
                                         r"unexpected: \[model.layers.0.mlp.up_proj.bias\]"):
        load_hf_checkpoint(tmp_path)
    # Untied model without its head: HF would random-initialise it; we refuse.
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, weights)
    with pytest.raises(ValueError, match=r"missing: \[lm_head.weight\]"):
        load_hf_checkpoint(tmp_path)
    # Wrong shape (config says vocab 97).
    save_file({**tensors, "lm_head.weight": torch.zeros(96, 32)}, weights)
    with pytest.raises(ValueError, match=r"lm_head.weight \(96, 32\) \(expected \(97, 32\)\)"):
        load_hf_checkpoint(tmp_path)

    # Pickle-only checkpoint.
    weights.unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*requires safetensors"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"no config.json"):
        load_hf_checkpoint(tmp_path)


def test_tied_checkpoint_with_head_copy(tmp_path):
    hf = hf_model("qwen2-tied")
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    embed = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embed.clone()}, weights)  # an equal copy is fine
    assert load_hf_checkpoint(tmp_path).lm_head.weight is not None
    save_file({**tensors, "lm_head.weight": embed + 1}, weights)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_hf_checkpoint(tmp_path)


def test_save_refuses_partial_model(tmp_path):
    model = tiny_model(dtype=torch.float32)
    del model.model.layers["1"]  # what a pipeline stage does
    with pytest.raises(ValueError, match=r"full 2-layer model: missing \[model.layers.1"):
        save_hf_checkpoint(model, tmp_path)
