"""Chunking is invisible to the mathematics: loss and every gradient equal unchunked training.

float64 throughout; the bound is 1e-10 relative to the largest gradient entry.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow import ChunkFlowEngine
from chunkflow.runtime.attention.tiled import TiledMathKernel
from chunkflow.runtime.attention.varlen import VarlenKernel
from tests.conftest import grads, reference_loss, tiny_model
from tests.runtime.varlen_reference import reference_ops

MODEL = tiny_model()


def _batch(lengths, *, mask_prob: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for n in lengths:
        ids = torch.randint(0, MODEL.config.vocab_size, (n,), generator=gen)
        labels = ids.clone()
        labels[torch.rand(n, generator=gen) < mask_prob] = -100
        batch.append({"input_ids": ids, "labels": labels})
    return batch


def _check(batch, *, chunk_size, k, normalization, pack_chain_tails=True, backend="auto",
           recompute="full"):
    MODEL.zero_grad(set_to_none=True)
    ref = reference_loss(MODEL, batch, normalization)
    if ref.requires_grad:
        ref.backward()
    expected = grads(MODEL)
    MODEL.zero_grad(set_to_none=True)
    engine = ChunkFlowEngine(MODEL, chunk_size=chunk_size, k=k,
                             loss_normalization=normalization, pack_chain_tails=pack_chain_tails,
                             attention_backend=backend, recompute=recompute)
    result = engine.forward_backward(batch)
    got = grads(MODEL)
    scale = max(g.abs().max() for g in expected.values())
    for name in expected:
        err = (got[name] - expected[name]).abs().max() / scale
        assert err <= 1e-10, f"{name}: relative error {err:.3g}"
    ref = float(ref.detach())
    assert abs(float(result.loss) - ref) <= 1e-10 * max(1.0, abs(ref))
    return result


# Long-tail lengths: mostly short, one long; packed and split chunks in one batch.
LENGTHS = [3, 1, 9, 2, 47, 5, 12, 2, 30]


# Every attention kernel that runs on CPU; varlen's adapter through the CPU reference of
# varlen_attn's contract (tests/runtime/varlen_reference.py). Tiles of 3 make every chunk many.
BACKENDS = {"cpu-flash": "cpu-flash", "math": TiledMathKernel(tile_size=3),
            "varlen": VarlenKernel(reference_ops(gqa=True)),
            "varlen-no-gqa": VarlenKernel(reference_ops(gqa=False))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])  # 1000: no chain at all
@pytest.mark.parametrize("k", [1, 2, 100])                # 100: nothing recomputed
def test_gradients_equal_unchunked(backend, chunk_size, k):
    for normalization, mask_prob in (("token", 0.4), ("token", 0.0), ("sequence", 0.0),
                                     ("sequence", 0.4)):
        if backend == "varlen-no-gqa" and (normalization, mask_prob) != ("token", 0.4):
            continue  # only the key/value layout differs from "varlen"
        batch = _batch(LENGTHS, mask_prob=mask_prob, seed=chunk_size * 7 + k)
        result = _check(batch, chunk_size=chunk_size, k=k, normalization=normalization,
                        backend=BACKENDS[backend])
    if chunk_size == 7:  # really mixes chains (47, 9, 12, 30) with packed chunks
        assert len(result.plan.chains) == 4
        assert any(len(c.segments) > 1 for c in result.plan.chunks)  # packed sequences
        assert any(c.chain_id is not None and len(c.segments) > 1
                   for c in result.plan.chunks)  # a chain's last chunk with packed tails


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16])
@pytest.mark.parametrize("k", [1, 2])
def test_selective_recompute_equals_unchunked(backend, chunk_size, k):
    """recompute="selective": every recomputed chunk reuses the attention outputs its state
    forward kept (chunk sizes and K that recompute something; the rest schedule no R)."""
    for normalization, mask_prob in (("token", 0.4), ("sequence", 0.0)):
        batch = _batch(LENGTHS, mask_prob=mask_prob, seed=chunk_size * 5 + k)
        result = _check(batch, chunk_size=chunk_size, k=k, normalization=normalization,
                        backend=BACKENDS[backend], recompute="selective")
    assert any(len(c.chunk_ids) > k for c in result.plan.chains)  # something was recomputed


@pytest.mark.parametrize("pack_chain_tails", [True, False])
def test_tail_packing_is_exact(pack_chain_tails):
    batch = _batch([20, 3, 2, 1, 13], mask_prob=0.2, seed=3)
    result = _check(batch, chunk_size=8, k=1, normalization="token",
                    pack_chain_tails=pack_chain_tails)
    tails = [c for c in result.plan.chunks if c.chain_id is not None and len(c.segments) > 1]
    assert bool(tails) == pack_chain_tails


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.one_of(st.integers(1, 8), st.integers(9, 60)), min_size=1, max_size=7),
    chunk_size=st.sampled_from([1, 3, 7, 16, 64]),
    k=st.integers(1, 4),
    normalization=st.sampled_from(["token", "sequence"]),
    mask_prob=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 2**16),
    recompute=st.sampled_from(["full", "selective"]),
)
def test_property_gradients_equal_unchunked(lengths, chunk_size, k, normalization, mask_prob,
                                            seed, recompute):
    batch = _batch(lengths, mask_prob=mask_prob, seed=seed)
    if not any((b["labels"][1:] != -100).any() for b in batch):
        return  # covered by test_no_supervised_token_gives_zero_loss_and_gradients
    _check(batch, chunk_size=chunk_size, k=k, normalization=normalization, recompute=recompute)


@pytest.mark.parametrize("overrides", [
    dict(model_type="llama", num_key_value_heads=4),                 # MHA, no biases
    dict(model_type="llama", attention_bias=True, tie_word_embeddings=True),
    dict(num_key_value_heads=1, head_dim=6),                         # MQA, odd head_dim*heads
    dict(model_type="qwen3", head_dim=8, attention_bias=True),       # per-head q/k norms
    dict(model_type="mistral", rope_scaling={"rope_type": "llama3", "factor": 8.0,  # Llama 3.1
         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,            # cos/sin scaled too
                       "original_max_position_embeddings": 8}),
])
def test_other_model_shapes(overrides):
    global MODEL
    saved, MODEL = MODEL, tiny_model(**overrides)
    try:
        _check(_batch([17, 4, 3, 26], mask_prob=0.2, seed=5), chunk_size=5, k=2,
               normalization="token")
    finally:
        MODEL = saved


def test_no_supervised_token_gives_zero_loss_and_gradients():
    MODEL.zero_grad(set_to_none=True)
    batch = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.full((3,), -100)},
             {"input_ids": torch.tensor([4]), "labels": torch.tensor([5])}]  # last token: no target
    for normalization in ("token", "sequence"):
        result = ChunkFlowEngine(MODEL, chunk_size=2,
                                 loss_normalization=normalization).forward_backward(batch)
        assert float(result.loss) == 0.0 and result.num_loss_tokens == 0
        assert not torch.isnan(result.loss)
        for p in MODEL.parameters():
            assert p.grad is not None and not p.grad.any()


def test_gradients_accumulate_like_backward():
    batch = _batch([19, 4], mask_prob=0.0, seed=1)
    MODEL.zero_grad(set_to_none=True)
    engine = ChunkFlowEngine(MODEL, chunk_size=6, k=1)
    engine.forward_backward(batch)
    once = grads(MODEL)
    engine.forward_backward(batch)
    scale = max(g.abs().max() for g in once.values())
    for name, g in grads(MODEL).items():
        torch.testing.assert_close(g, 2 * once[name], rtol=0, atol=1e-12 * scale)


def test_sequence_normalization_ignores_unsupervised_sequences():
    batch = _batch([9, 6], mask_prob=0.0, seed=2)
    batch.append({"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.full((4,), -100)})
    _check(batch, chunk_size=4, k=1, normalization="sequence")


@pytest.mark.parametrize("trainable", [
    ("lm_head",),                                  # body frozen: no k/v requires grad
    ("q_proj", "v_proj"),                          # LoRA-style targets, base frozen
    ("layers.1.",),                                # only the last layer trains
    ("embed_tokens", "k_proj"),
])
def test_frozen_parameters(trainable):
    model = tiny_model(seed=4)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in trainable))
    batch = _batch([21, 3, 9], mask_prob=0.1, seed=4)
    reference_loss(model, batch).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    ChunkFlowEngine(model, chunk_size=4, k=1).forward_backward(batch)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=1e-12)
        else:
            assert p.grad is None


@pytest.mark.parametrize("backend", ["cpu-flash", "math", "varlen"])
def test_activation_checkpointing_inside_chunks_is_exact(backend):
    """--chunking.activation_checkpointing: each decoder layer recomputed in its chunk's
    backward (non-reentrant); the same gradients, for every kernel."""
    batch = _batch(LENGTHS, mask_prob=0.3, seed=11)
    MODEL.zero_grad(set_to_none=True)
    reference_loss(MODEL, batch).backward()
    expected = grads(MODEL)
    scale = max(g.abs().max() for g in expected.values())
    for k, recompute in ((1, "full"), (2, "full"), (1, "selective")):
        MODEL.zero_grad(set_to_none=True)
        ChunkFlowEngine(MODEL, chunk_size=7, k=k, attention_backend=BACKENDS[backend],
                        activation_checkpointing=True, recompute=recompute).forward_backward(batch)
        for name, g in grads(MODEL).items():
            assert (g - expected[name]).abs().max() / scale <= 1e-10, (k, recompute, name)


def test_chunking_options_are_one_frozen_value_the_engines_share():
    import dataclasses

    from chunkflow import ChunkingOptions

    options = ChunkingOptions(chunk_size=5, k=2, recompute="selective")
    engine = ChunkFlowEngine(MODEL, options)
    assert engine.options is options and (engine.chunk_size, engine.k) == (5, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.k = 3
    with pytest.raises(TypeError, match="not both"):
        ChunkFlowEngine(MODEL, options, k=1)
    with pytest.raises(ValueError, match="offload='all' also moves"):
        ChunkingOptions(chunk_size=5, offload="all")
    # the trainer's --chunking.* section builds the same value
    from chunkflow.train.config import TrainConfig

    cfg = TrainConfig()
    cfg.chunking.chunk_size, cfg.chunking.k, cfg.chunking.recompute = 5, 2, "selective"
    assert cfg.chunking.options() == options
