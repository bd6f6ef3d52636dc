"""Reference model: HF names, causality, RoPE positions, config validation, presets."""

import pytest
import torch

from chunkflow.models import ModelConfig, Transformer, get_preset
from tests.conftest import tiny_model


def test_hf_parameter_names():
    model = tiny_model(num_hidden_layers=1)  # qwen2: q/k/v biases, no o bias
    names = set(model.state_dict())
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.0.input_layernorm.weight",
                 "model.layers.0.post_attention_layernorm.weight"]:
        assert name in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    llama = tiny_model(model_type="llama", num_hidden_layers=1)
    assert not any(n.endswith(".bias") for n in llama.state_dict())


def test_tied_embeddings_share_storage():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params


def test_causal_and_batched():
    model = tiny_model()
    ids = torch.randint(0, 53, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, 53)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 53
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(ids[1:])[0], logits[1], rtol=0, atol=1e-12)


def test_rope_matches_closed_form():
    """q·k after RoPE depends only on the position difference (the defining property)."""
    model = tiny_model()
    rope = model.model.rotary_emb
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    from chunkflow.models.transformer import apply_rope

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]), torch.float64)
        ck, sk = rope(torch.tensor([[pk]]), torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), rtol=1e-5, atol=1e-6)


def test_presets():
    assert round(get_preset("qwen2.5-7b").num_params / 1e9, 2) == 7.62
    assert round(get_preset("qwen2.5-0.5b").num_params / 1e9, 2) == 0.49
    assert round(get_preset("qwen2.5-72b").num_params / 1e9, 1) == 72.7
    assert get_preset("tiny").num_key_value_heads < get_preset("tiny").num_attention_heads
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        get_preset("gpt5")


@pytest.mark.parametrize("kw, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(head_dim=5), "even"),
])
def test_config_errors(kw, match):
    base = dict(vocab_size=10, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=4)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **kw})


def test_unchunked_training_is_plain_pytorch():
    model = Transformer(get_preset("tiny"))
    ids = torch.randint(0, 256, (1, 33))
    loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_casting_the_model_keeps_rope_frequencies_in_float32():
    model = tiny_model(dtype=torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    reference = tiny_model(dtype=torch.float32).model.rotary_emb.inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, reference)
