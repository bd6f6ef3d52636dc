"""Every benchmarked method trains the same thing: loss and gradients equal plain unchunked
training (float64), and the FLOP accounting matches closed forms."""

import pytest
import torch

from chunkflow.bench.methods import DenseRunner, MethodConfig, build_runner
from chunkflow.bench.workload import (batch_lengths, count_tokens, forward, global_batch,
                                      model_flops)
from chunkflow.plan.cost import ModelShape
from tests.conftest import grads, reference_loss, tiny_model

CONFIGS = [MethodConfig("chunkflow", chunk_size=16, k=1),
           MethodConfig("chunkflow", chunk_size=16, k=2),
           MethodConfig("pad", micro_batch=3),
           MethodConfig("pad", recompute=True),
           MethodConfig("packed"),
           MethodConfig("packed", recompute=True),
           MethodConfig("hf", micro_batch=3),
           MethodConfig("hf", micro_batch=8, recompute=True)]


@pytest.fixture(scope="module")
def reference():
    batch = global_batch(70, 8, seed=3, vocab_size=53)
    model = tiny_model(model_type="llama")
    loss = reference_loss(model, batch)
    loss.backward()
    return batch, float(loss.detach()), grads(model)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_method_matches_unchunked_training(config, reference):
    batch, ref_loss, ref_grads = reference
    model = tiny_model(model_type="llama")
    runner = build_runner(config, model, ModelShape.from_config(model.config))
    stats = runner.step(batch)
    assert stats.micro_batches_run == stats.micro_batches
    # transformers computes its loss from float32 logits; everything else stays float64
    tol = 1e-6 if config.method == "hf" else 1e-12
    assert stats.loss == pytest.approx(ref_loss, rel=tol)
    params = dict(runner.model.named_parameters())
    for name, g in ref_grads.items():
        torch.testing.assert_close(params[name].grad, g, rtol=tol, atol=tol * g.abs().max(),
                                   msg=f"{config.label}: {name}")


def test_qwen2_weights_load_into_the_transformers_copy():
    model = tiny_model()  # qwen2: q/k/v biases
    runner = build_runner(MethodConfig("hf", micro_batch=2), model,
                          ModelShape.from_config(model.config))
    assert type(runner.model).__name__ == "Qwen2ForCausalLM"
    batch = global_batch(40, 3, seed=0, vocab_size=53)
    assert runner.step(batch).loss == pytest.approx(float(reference_loss(model, batch)), rel=1e-6)


def test_padded_micro_batches_can_be_sampled():
    model = tiny_model(model_type="llama")
    runner = build_runner(MethodConfig("pad"), model, ModelShape.from_config(model.config))
    stats = runner.step(global_batch(50, 5, seed=1, vocab_size=53), max_micro_batches=2)
    assert (stats.micro_batches_run, stats.micro_batches) == (2, 5)


def test_workload_has_one_sequence_of_the_maximum_length_and_masked_prompts():
    lengths = batch_lengths(4096, 16, seed=7)
    assert len(lengths) == 16 and lengths.count(4096) >= 1 and max(lengths) == 4096
    batch = global_batch(4096, 16, seed=7, vocab_size=100)
    assert [len(ex["input_ids"]) for ex in batch] == lengths
    tokens, supervised = count_tokens(batch)
    assert tokens == sum(lengths)
    for ex in batch:  # the first 10-50% of each sequence is the prompt
        n, masked = len(ex["labels"]), int((ex["labels"] == -100).sum())
        assert int(0.1 * n) <= masked <= int(0.5 * n)
        assert (ex["labels"][:masked] == -100).all()
    assert supervised == sum(len(ex["labels"]) - max(int((ex["labels"] == -100).sum()), 1)
                             for ex in batch)


SHAPE = ModelShape(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=4, qkv_bias=False)


def _flops(config, lengths):
    """Executed FLOPs of one step, from a runner that never touches the model's weights."""
    runner = DenseRunner(config, None, SHAPE)
    return sum(runner._flops(g, max(lengths)) for g in runner.micro_batches(lengths))


def test_work_of_the_dense_methods_in_closed_form():
    lengths = [10, 3, 7]
    # per token: 2 layers x 2 x (q 64 + k,v 64 + o 64 + MLP 384 params) + head 2 x 80 = 2464
    per_token = 2 * 2 * (64 + 64 + 64 + 384) + 2 * 80
    assert forward(SHAPE, [10]) == 10 * per_token + 4 * 2 * 4 * 55 * 2  # 55 causal pairs, 2 layers
    useful = model_flops(SHAPE, lengths)
    assert _flops(MethodConfig("packed"), lengths) == pytest.approx(useful)  # the ideal: 1.0
    # padding: every sequence costs what the 10-token one does
    assert _flops(MethodConfig("pad"), lengths) == pytest.approx(3 * 3 * forward(SHAPE, [10]))
    # full recompute adds one forward of the layers (not the head)
    layers = sum(forward(SHAPE, [n], head=False) for n in lengths)
    assert _flops(MethodConfig("packed", recompute=True), lengths) == pytest.approx(useful + layers)
    # a dense mask over 2 packed sequences of 3 computes all 36 pairs instead of 2 * 6
    dense = forward(SHAPE, [3, 3], dense_attention=True) - forward(SHAPE, [3, 3])
    assert dense == 4 * 2 * 4 * (36 - 12) * 2


def test_chunkflow_work_counts_the_recomputed_chunks():
    model = tiny_model(model_type="llama")
    shape = ModelShape.from_config(model.config)
    batch = global_batch(64, 1, seed=0, vocab_size=53)  # one chain of 4 chunks of 16
    useful = model_flops(shape, [64])
    recomputed = lambda k: sum(forward(shape, [16], prefix_len=16 * j, head=False)
                               for j in range(4 - k))
    for k in (1, 2, 4):
        stats = build_runner(MethodConfig("chunkflow", chunk_size=16, k=k), model,
                             shape).step(batch)
        assert stats.executed_flops == pytest.approx(useful + recomputed(k))
