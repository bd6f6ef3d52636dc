"""Compiled decoder layers (``compile=True``): float64 gradients equal eager ones, every layer runs
compiled (no attention call outside a graph), and a run with varied chains compiles its graphs
once: nothing recompiles after the warm-up.

The graphs are compiled by inductor on this CPU; each test starts from an empty dynamo cache
(``torch.compiler.reset``), so it counts its own graphs.
"""

from types import SimpleNamespace

import pytest
import torch
import transformers

from chunkflow import ChunkFlowEngine
from chunkflow.parallel.engine import _check_zero_bubble
from chunkflow.runtime import ChunkingOptions, compiled
from tests.conftest import tiny_model

LENGTHS = (40, 100, 7, 130, 64, 3)


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def make_batch(lengths=LENGTHS, *, seed=1, vocab=53):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # a masked prompt
        batch.append({"input_ids": ids, "labels": labels})
    return batch


def run(model, batch, **options):
    engine = ChunkFlowEngine(model, chunk_size=32, **options)
    model.zero_grad(set_to_none=True)
    result = engine.forward_backward(batch)
    return result.loss, {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def assert_same(eager, comp, tol=1e-10):
    (loss_e, grads_e), (loss_c, grads_c) = eager, comp
    assert abs(float(loss_e - loss_c)) <= tol * abs(float(loss_e))
    assert grads_e.keys() == grads_c.keys()
    for name, g in grads_e.items():
        rel = float((grads_c[name] - g).norm() / g.norm())
        assert rel <= tol, (name, rel)


@pytest.mark.parametrize("options", [
    dict(k=1),
    dict(k=2),
    dict(k=1, recompute="selective"),
    dict(k=1, activation_checkpointing=True),
    dict(k=2, recompute="selective", activation_checkpointing=True),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_reference_model_compiled_equals_eager_in_float64(options):
    batch = make_batch()
    eager = run(tiny_model(), batch, **options)
    before = compiled.COUNTER.eager_calls
    comp = run(tiny_model(), batch, compile=True, **options)
    assert_same(eager, comp)
    assert compiled.COUNTER.eager_calls == before  # every layer ran compiled


def _float64_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_hugging_face_model_compiled_equals_eager_in_float64(monkeypatch,
                                                             activation_checkpointing):
    # transformers' RMSNorm computes in float32 whatever the model's dtype, and inductor sums
    # in another order than eager, which leaves float32 rounding (~1e-7); in float64 here.
    monkeypatch.setattr(transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm, "forward",
                        _float64_rms_norm)

    def model():
        config = transformers.Qwen2Config(
            vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
        torch.manual_seed(0)
        m = transformers.Qwen2ForCausalLM(config).double().train()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        return m

    batch = make_batch()
    options = dict(k=1, activation_checkpointing=activation_checkpointing)
    eager = run(model(), batch, **options)
    before = compiled.COUNTER.eager_calls
    comp = run(model(), batch, compile=True, **options)
    assert_same(eager, comp)
    # with checkpointing, chunkflow checkpoints around the compiled layer (transformers' own
    # checkpoint inside the layer's forward would break the graph)
    assert compiled.COUNTER.eager_calls == before


def test_no_recompilation_after_warm_up_over_varied_chains():
    """Warm-up: a batch with full chunks, a short last chunk, chains (state-only forwards without
    grad) and an evaluation. Then batches of other lengths, so other segment layouts, prefix
    lengths and chain counts: no graph compiles again (dynamo refuses to, under
    ``fail_on_recompile``)."""
    model = tiny_model()
    engine = ChunkFlowEngine(model, chunk_size=32, k=1, compile=True)
    before = compiled.COUNTER.graphs
    engine.forward_backward(make_batch((40, 100, 7, 130, 64, 3)))
    engine.evaluate(make_batch((40, 100, 7), seed=2))
    warm = compiled.COUNTER.graphs - before
    # grad and no-grad forwards, each for full chunks and then any length (automatic dynamic)
    assert 2 <= warm <= 4, warm
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, lengths in enumerate([(300, 5, 17), (33, 31, 64, 2), (250,), (9, 190, 45)]):
            engine.forward_backward(make_batch(lengths, seed=seed + 3))
            engine.evaluate(make_batch(lengths[:2], seed=seed))
    assert compiled.COUNTER.graphs - before == warm


def test_identical_layers_share_one_graph():
    model = tiny_model(num_hidden_layers=6)
    engine = ChunkFlowEngine(model, chunk_size=32, k=2, compile=True)
    before = compiled.COUNTER.graphs
    engine.forward_backward(make_batch((32, 32)))  # full chunks, standalone: one graph
    assert compiled.COUNTER.graphs - before == 1


def test_refusals_name_the_reason():
    two_stages = SimpleNamespace(pp_enabled=True)
    with pytest.raises(ValueError, match="input pass .I. and the weight pass .W. cannot run"):
        _check_zero_bubble("zb-h1", two_stages, ChunkingOptions(chunk_size=32, compile=True),
                           "ddp")

    class NoLayers(torch.nn.Module):
        config = tiny_model().config
        lm_head = None
        layer_ids = (0,)

        def hidden_states(self, input_ids, *, position_ids, attention,
                          activation_checkpointing=False):
            return input_ids

    with pytest.raises(ValueError, match=r"does not name them \(decoder_layers\(\)\)"):
        ChunkFlowEngine(NoLayers(), chunk_size=32, compile=True)


def test_a_compiled_layer_outside_the_engine_says_so():
    model = tiny_model()
    ChunkFlowEngine(model, chunk_size=32, compile=True)
    layer = model.model.layers["0"]
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    cos = sin = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="ran outside a chunk"):
        layer(x, cos, sin, compiled.attention)


def test_the_private_inductor_backend_name_still_exists():
    """compiled.inductor_backend() is the one private torch name on the compiled path: this
    fails when a release renames it."""
    assert callable(compiled.inductor_backend())


def test_an_eager_engine_refuses_compiled_layers():
    model = tiny_model()
    ChunkFlowEngine(model, chunk_size=32, compile=True)
    with pytest.raises(ValueError, match="valid: compile=True, or a fresh copy of the model"):
        ChunkFlowEngine(model, chunk_size=32)
