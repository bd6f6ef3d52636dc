"""The cost model against closed forms: FLOPs of tiny shapes, prefix attention, sharded memory."""

import dataclasses

import pytest

from chunkflow.models import PRESETS
from chunkflow.models.families import model_shape
from chunkflow.plan import build_chunks
from chunkflow.plan.cost import (GPU_PROFILES, MODEL_SHAPES, CostModel, GPUProfile, ModelShape,
                                 attention_pairs, chunk_segments, get_gpu, get_model_shape)
from chunkflow.plan.memory import activation_bytes_per_token, kv_state_bytes

# E=8, I=16, L=2, H=2 query heads, G=2 KV heads, D=4, V=10.
TINY = ModelShape(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=4)
# A GPU that does exactly 1 FLOP/s on matmuls and 2 on attention, with no other costs.
UNIT = GPUProfile("unit", peak_flops=1.0, memory_bytes=2**30, matmul_efficiency=1.0,
                  attention_efficiency=2.0, tokens_half_efficiency=0, layer_overhead_s=0.0,
                  nvlink_bytes_per_s=1.0, network_bytes_per_s=1.0)


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_shapes_are_the_presets(name):
    shape, preset = get_model_shape(name), PRESETS[name]
    for field in dataclasses.fields(shape):
        assert getattr(shape, field.name) == getattr(preset, field.name), field.name
    assert shape.num_params == preset.num_params


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b", "qwen2.5-7b"])
def test_shape_from_config_counts_the_parameters_of_the_model(name):
    assert ModelShape.from_config(PRESETS[name]).num_params == PRESETS[name].num_params


def test_shape_from_transformers_configs_sees_qwen2_biases():
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
    # Qwen2 always has q/k/v biases (its config has no flag for them); Llama has none by default.
    for config, bias in ((transformers.Qwen2Config(**kw), True),
                         (transformers.LlamaConfig(**kw), False)):
        shape = model_shape(config)
        assert shape.qkv_bias is bias
        model = transformers.AutoModelForCausalLM.from_config(config)
        assert shape.num_params == sum(p.numel() for p in model.parameters())


def test_qwen25_7b_has_about_7_6b_parameters():
    assert 7.6e9 < MODEL_SHAPES["qwen2.5-7b"].num_params < 7.7e9  # published: 7.61B


def test_forward_flops_closed_form():
    # per token and layer: q 8*8 + k,v 2*8*8 + o 8*8 + MLP 3*8*16 = 640 params -> 1280 FLOPs
    cost = CostModel(TINY, UNIT)
    f = cost.forward_flops([3, 2], stage_idx=0)
    assert f.layers_matmul == 5 * 1280 * 2
    assert f.head_matmul == 5 * 2 * 8 * 10
    # causal pairs 3*4/2 + 2*3/2 = 9; 4 * H * D per pair and layer
    assert f.attention == 4 * 2 * 4 * 9 * 2
    # the first segment's 3 queries also see a prefix of 5 keys
    assert cost.forward_flops([3, 2], prefix_len=5).attention == 4 * 2 * 4 * (9 + 15) * 2
    assert cost.forward_seconds([3, 2]) == f.layers_matmul + f.head_matmul + f.attention / 2


def test_tensor_parallel_splits_flops():
    one, two = CostModel(TINY, UNIT), CostModel(TINY, UNIT, tp=2)
    a, b = one.forward_flops([7]), two.forward_flops([7])
    assert (b.layers_matmul, b.head_matmul, b.attention) == (
        a.layers_matmul / 2, a.head_matmul / 2, a.attention / 2)


def test_pipeline_stages_split_layers_and_the_head():
    cost = CostModel(TINY, UNIT, pp=2)
    first, last = cost.forward_flops([4], stage_idx=0), cost.forward_flops([4], stage_idx=1)
    assert first.head_matmul == 0 and last.head_matmul == 4 * 2 * 8 * 10
    assert first.layers_matmul == last.layers_matmul == 4 * 1280
    assert CostModel(MODEL_SHAPES["qwen2.5-7b"], UNIT, pp=3).stage_layers == (10, 9, 9)


def test_backward_factors_and_megatron_recompute():
    lens, kw = [6], dict(prefix_len=10)
    f = CostModel(TINY, UNIT).forward_flops(lens, **kw)
    mm, attn = f.layers_matmul + f.head_matmul, f.attention / 2  # seconds on UNIT
    assert CostModel(TINY, UNIT).backward_seconds(lens, **kw) == pytest.approx(2 * mm + 2.5 * attn)
    sel = CostModel(TINY, UNIT, recompute="selective").backward_seconds(lens, **kw)
    assert sel == pytest.approx(2 * mm + 3.5 * attn)  # core attention once more
    full = CostModel(TINY, UNIT, recompute="full").backward_seconds(lens, **kw)
    assert full == pytest.approx(2 * mm + 2.5 * attn + f.layers_matmul + attn)  # not the head
    assert CostModel(TINY, UNIT).recompute_seconds(lens, **kw) == pytest.approx(mm + attn)


def test_chain_chunks_cost_more_the_later_they_come():
    cs = 4096
    plan = build_chunks([5 * cs], chunk_size=cs)
    cost = CostModel(MODEL_SHAPES["qwen2.5-7b"], GPU_PROFILES["h100-80gb"], tp=4)
    pairs = [attention_pairs(*chunk_segments(c)) for c in plan.chunks]
    assert pairs == [cs * j * cs + cs * (cs + 1) // 2 for j in range(5)]
    times = []
    for chunk in plan.chunks:
        lens, prefix = chunk_segments(chunk)
        times.append(cost.forward_seconds(lens, prefix_len=prefix))
    assert all(a < b for a, b in zip(times, times[1:]))
    # standalone chunk of the same size costs what the chain's first chunk does
    alone = build_chunks([cs], chunk_size=cs).chunks[0]
    assert cost.forward_seconds([alone.num_tokens]) == times[0]


def test_short_micro_batches_run_at_lower_efficiency():
    cost = CostModel(MODEL_SHAPES["qwen2.5-7b"], GPU_PROFILES["h100-80gb"], tp=4)
    per_token = lambda n: cost.forward_seconds([n]) / n  # noqa: E731
    assert per_token(128) > 3 * per_token(8192)


def test_static_memory_shards_over_tp_and_pp():
    shape = MODEL_SHAPES["qwen2.5-7b"]
    e, layers = shape.hidden_size, shape.num_hidden_layers
    pp4 = CostModel(shape, UNIT, pp=4)
    assert sum(pp4.stage_params(s) for s in range(4)) == shape.num_params
    tp4 = CostModel(shape, UNIT, tp=4)
    norms = 2 * e * layers + e  # replicated on every TP rank
    assert 4 * tp4.stage_params(0) == pytest.approx(shape.num_params + 3 * norms)
    # Megatron mixed precision: 2 + 4 + 12 bytes/param, the 12 sharded over DP when distributed
    no_dist = CostModel(shape, UNIT, pp=4, dp=8, distributed_optimizer=False)
    dist = CostModel(shape, UNIT, pp=4, dp=8)
    assert no_dist.static_bytes(1) == 18 * no_dist.stage_params(1)
    assert dist.static_bytes(1) == (6 + 12 / 8) * dist.stage_params(1)


def test_activation_and_kv_bytes_reuse_the_memory_estimate():
    shape, preset = MODEL_SHAPES["qwen2.5-7b"], PRESETS["qwen2.5-7b"]
    plain = CostModel(shape, UNIT)
    assert plain.activation_bytes_per_token() == activation_bytes_per_token(
        preset, activation_bytes=2)
    assert plain.kv_state_bytes(1000) == kv_state_bytes(preset, 1000, activation_bytes=2)
    tp4 = CostModel(shape, UNIT, tp=4)  # 4 KV heads: one per GPU
    assert tp4.activation_bytes_per_token() == pytest.approx(
        plain.activation_bytes_per_token() / 4)
    assert tp4.kv_state_bytes(1000) == plain.kv_state_bytes(1000) / 4
    tp4pp4 = CostModel(shape, UNIT, tp=4, pp=4)
    assert sum(tp4pp4.kv_state_bytes(1000, s) for s in range(4)) == tp4.kv_state_bytes(1000)
    full = CostModel(shape, UNIT, recompute="full")
    per_layer = (plain.activation_bytes_per_token() - full.activation_bytes_per_token()) / 28
    # full recompute keeps only each layer's input (2E bytes) and, during a backward, one layer
    assert per_layer + 2 * shape.hidden_size == pytest.approx(full.backward_transient_bytes(1))
    assert plain.backward_transient_bytes(1) == 0


def test_chunkflow_runtime_tp_keeps_embedding_and_head_weights_whole_per_rank():
    """vocab_parallel=False: how chunkflow's runtime runs TP (replicated embedding and head
    weights), with sequence parallelism (its default) and without, priced against Megatron's
    split."""
    shape = get_model_shape("qwen2.5-7b")
    one = CostModel(shape, UNIT)
    megatron = CostModel(shape, UNIT, tp=2)
    ours = CostModel(shape, UNIT, tp=2, vocab_parallel=False)
    no_sp = CostModel(shape, UNIT, tp=2, sp=1, vocab_parallel=False)
    assert no_sp.activation_bytes_per_token() == one.activation_bytes_per_token()
    assert ours.activation_bytes_per_token() == one.activation_bytes_per_token() / 2
    assert megatron.activation_bytes_per_token() == one.activation_bytes_per_token() / 2
    # chunkflow keeps the attention and MLP inputs gathered for their backward: 2 x E x 2 bytes
    # per token and layer, of which sequence parallelism saves nothing
    gathered = CostModel(shape, UNIT, tp=2, vocab_parallel=False, gathered_inputs=True)
    assert gathered.activation_bytes_per_token() == pytest.approx(
        ours.activation_bytes_per_token() + 28 * 2 * shape.hidden_size * 2 / 2)
    embed = shape.vocab_size * shape.hidden_size
    # embedding and (untied) head: whole on each rank, vs half of each
    assert ours.stage_params() - megatron.stage_params() == pytest.approx(embed)
    seg = [4096]
    # the head on every rank's rows (sequence parallel) or on its vocabulary slice: half each
    assert no_sp.forward_flops(seg).head_matmul == one.forward_flops(seg).head_matmul
    assert ours.forward_flops(seg).head_matmul == one.forward_flops(seg).head_matmul / 2
    assert megatron.forward_flops(seg).head_matmul == one.forward_flops(seg).head_matmul / 2
    assert ours.forward_flops(seg).layers_matmul == megatron.forward_flops(seg).layers_matmul


def test_kv_heads_replicate_when_tp_exceeds_them():
    shape = dataclasses.replace(TINY, num_key_value_heads=1)
    assert CostModel(shape, UNIT, tp=2).kv_heads_per_gpu == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(tp=4, sp=2), "sp must equal tp"),
    (dict(recompute="some"), "recompute"),
    (dict(tp=3), "tp=3 must divide"),
    (dict(pp=3), "pp=3 exceeds"),
])
def test_invalid_layouts_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CostModel(TINY, UNIT, **kwargs)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="qwen2.5-7b"):
        get_model_shape("llama-7b")
    with pytest.raises(ValueError, match="h100-80gb"):
        get_gpu("tpu")
