"""The peak-memory estimate against the runtime's CPU meter, and its closed-form parts.

The meter (``StepResult.peak_memory_bytes`` on CPU) counts saved-for-backward tensors plus the
chains' key/value state, measured from autograd's saved-tensor hooks: an independent reference
for ``activations + kv_state``. The estimate must stay within ``TOLERANCE`` of it. Measured on
torch 2.13 (CPU), this file's grid: 1.000 where the peak chunk attends to a prefix or packs
several sequences; 1.045-1.046 where it is one sequence without a prefix (the o_proj input
aliases the attention output there, see the module docstring); 0.979-0.994 where the peak is a
chain's last chunk that also holds packed sequences (some q/k/v storage saved twice).
"""

from types import SimpleNamespace

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.models import ModelConfig, Transformer
from chunkflow.plan import build_chunks
from chunkflow.plan.memory import (
    MemoryEstimate,
    activation_bytes_per_token,
    estimate_peak_memory,
    host_pieces,
    kept_attention_host_bytes,
    kv_state_bytes,
    offloaded_state_buffers,
    offloaded_state_host_bytes,
    pinned_block_bytes,
)
from tests.torchless import run_without_torch

TOLERANCE = 0.10  # |estimate / meter - 1|

GQA = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2)
MHA = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, model_type="qwen2", tie_word_embeddings=True)

BATCHES = {
    "long chain + packed": [700, 90, 40, 25],  # two chains (700, 90), tails packed
    "short packed only": [60, 50, 40, 33, 20, 9],
    "one short sequence": [50],
}


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    out = {}
    for name, config in (("gqa", GQA), ("mha", MHA)):
        torch.manual_seed(0)
        out[name] = Transformer(config)
    return out


@pytest.mark.parametrize("model_name", ["gqa", "mha"])
@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize("chunk_size,k", [(64, 1), (64, 2), (128, 1), (128, 2)])
def test_estimate_matches_cpu_meter(models, model_name, batch_name, chunk_size, k):
    model = models[model_name]
    seq_lens = BATCHES[batch_name]
    torch.manual_seed(1)
    batch = [torch.randint(0, model.config.vocab_size, (n,)) for n in seq_lens]
    measured = ChunkFlowEngine(model, chunk_size=chunk_size, k=k).forward_backward(
        batch).peak_memory_bytes
    model.zero_grad(set_to_none=True)
    est = estimate_peak_memory(model.config, build_chunks(seq_lens, chunk_size=chunk_size), k=k)
    ratio = (est.activations + est.kv_state) / measured
    assert abs(ratio - 1) <= TOLERANCE, f"estimate/meter = {ratio:.3f}: {est.summary()}"


def test_chain_state_counts_positions_before_last_chunk_at_meter_precision(models):
    """Long chains are dominated by exact terms: the estimate is within 0.1% there."""
    model = models["gqa"]
    measured = ChunkFlowEngine(model, chunk_size=64, k=2).forward_backward(
        [torch.randint(0, 256, (1000,))]).peak_memory_bytes
    model.zero_grad(set_to_none=True)
    est = estimate_peak_memory(GQA, build_chunks([1000], chunk_size=64), k=2)
    assert est.activations + est.kv_state == pytest.approx(measured, rel=1e-3)


def test_peak_moment_follows_the_schedule():
    """1000 tokens, chunk 64: 15 full chunks and one of 40 tokens; the state holds 960 positions."""
    plan = build_chunks([1000], chunk_size=64)
    assert estimate_peak_memory(GQA, plan, k=1).peak_tokens == 64  # R j: one full chunk
    assert estimate_peak_memory(GQA, plan, k=2).peak_tokens == 64 + 40  # kept: last two
    assert estimate_peak_memory(GQA, plan, k=3).peak_tokens == 64 + 64 + 40
    assert estimate_peak_memory(GQA, plan, k=99).peak_tokens == 1000  # nothing recomputed
    for k in (1, 2, 99):
        est = estimate_peak_memory(GQA, plan, k=k)
        # 2 (k, v) * layers * kv heads * head dim * positions * (fp32 value + fp32 gradient)
        assert est.kv_state == 2 * 2 * 2 * 16 * 960 * (4 + 4)
    # A chain's moments hold a full chunk (or the whole sequence) plus state, so they beat any
    # standalone chunk; with K=1 the 2-chunk chain's peak is R0, not its 36-token tail.
    plan = build_chunks([100, 64, 64, 64], chunk_size=64)
    est = estimate_peak_memory(GQA, plan, k=1)
    assert est.peak_tokens == 64 and est.kv_state == 2 * 2 * 2 * 16 * 64 * (4 + 4)
    # Without chains the fullest standalone chunk sets the peak, with no state.
    est = estimate_peak_memory(GQA, build_chunks([30, 64, 20, 10], chunk_size=64), k=1)
    assert est.kv_state == 0 and est.peak_tokens == 64
    # Packed tokens count like chain tokens: six short sequences in one chunk of 212.
    est = estimate_peak_memory(GQA, build_chunks([60, 50, 40, 33, 20, 9], chunk_size=256), k=1)
    assert est.peak_tokens == 212 and est.activations == 212 * activation_bytes_per_token(
        GQA, activation_bytes=4)


def test_static_parts_closed_form():
    model = SimpleNamespace(**{f: getattr(GQA, f) for f in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size")}, num_params=1_000_000)
    plan = build_chunks([10], chunk_size=16)
    est = estimate_peak_memory(model, plan, k=1)
    assert (est.weights, est.grads, est.optimizer_state) == (4_000_000, 4_000_000, 8_000_000)
    bf16 = estimate_peak_memory(model, plan, k=1, param_bytes=2)
    assert (bf16.weights, bf16.grads, bf16.optimizer_state) == (2_000_000, 2_000_000, 4_000_000)
    sgd = estimate_peak_memory(model, plan, k=1, optimizer="sgd")
    assert sgd.optimizer_state == 0
    # one 10-token chunk, whose activations weigh less than the gradients: the device peaks
    # at the optimizer step, AdamW's with its foreach temporaries (one parameter-sized
    # tensor), SGD's with none
    assert est.optimizer_transient == 4_000_000 and est.peak_at == "the optimizer step"
    assert est.total == est.weights + est.grads + est.optimizer_state + 4_000_000
    assert sgd.optimizer_transient == 0 and sgd.total == sgd.weights + sgd.grads
    # Activations default to the parameter width; overriding them leaves the static parts alone.
    half = estimate_peak_memory(model, plan, k=1, activation_bytes=2)
    assert half.weights == est.weights and half.activations < est.activations


def test_weights_equal_the_models_parameter_bytes(models):
    for name, model in models.items():
        params = {id(p): p for p in model.parameters()}.values()  # tied weights once
        actual = sum(p.numel() * p.element_size() for p in params)
        est = estimate_peak_memory(model.config, build_chunks([8], chunk_size=8), k=1)
        assert est.weights == actual, name


def test_per_token_figures_quoted_in_runtime_docs():
    """docs/runtime.md: float32, 4 layers, hidden 256, 8 query heads: KV state 4 KiB/token with
    2 KV heads, 16 KiB/token with 8; about 85 KiB/token of chunk activations."""
    gqa = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    mha = gqa.replace(num_key_value_heads=8)
    assert kv_state_bytes(gqa, 1, activation_bytes=4) == 4 * 1024
    assert kv_state_bytes(mha, 1, activation_bytes=4) == 16 * 1024
    assert 84 * 1024 <= activation_bytes_per_token(gqa, activation_bytes=4) <= 86 * 1024


def test_summary_names_every_part():
    est = MemoryEstimate(weights=2**30, grads=2**30, optimizer_state=2**31, activations=3 * 2**20,
                         kv_state=0, peak_tokens=64)
    text = est.summary()
    assert text.startswith("peak 4.00 GiB")
    for part in ("weights 1.00 GiB", "optimizer 2.00 GiB", "activations 3.0 MiB (64 tokens)",
                 "KV state 0.0 MiB"):
        assert part in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be a positive integer"),
    (dict(k=1, param_bytes=0), "param_bytes"),
    (dict(k=1, activation_bytes=-2), "activation_bytes"),
    (dict(k=1, optimizer="adam"), "optimizer='adam'; valid: adamw, sgd"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_peak_memory(GQA, build_chunks([10], chunk_size=8), **kwargs)


def test_bad_model_and_plan():
    with pytest.raises(ValueError, match="lacks .*num_params"):
        estimate_peak_memory(SimpleNamespace(hidden_size=8), build_chunks([4], chunk_size=4), k=1)
    with pytest.raises(ValueError, match="ChunkPlan"):
        estimate_peak_memory(GQA, [4, 5], k=1)


def test_imports_without_torch():
    out = run_without_torch("""
from types import SimpleNamespace
from chunkflow.plan import build_chunks
from chunkflow.plan.memory import estimate_peak_memory
model = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=11,
                        num_params=100)
print(estimate_peak_memory(model, build_chunks([9, 3], chunk_size=4), k=1).summary())
""")
    assert out.startswith("peak ")


@pytest.mark.parametrize("recompute, offload, checkpointing", [
    ("selective", "none", False), ("full", "state", False), ("selective", "state", False),
    ("selective", "all", False), ("full", "none", True), ("selective", "state", True)])
@pytest.mark.parametrize("k", [1, 2])
def test_recompute_and_offload_estimates_match_cpu_meter(recompute, offload, checkpointing, k):
    """The kept attention outputs, the offloaded state and checkpointed layers priced as the
    meter counts them (four layers, so an offloaded state keeps half of them on the device)."""
    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Transformer(config)
    seq_lens = [700, 90, 40]
    torch.manual_seed(1)
    batch = [torch.randint(0, 256, (n,)) for n in seq_lens]
    plan = build_chunks(seq_lens, chunk_size=64)
    measured = ChunkFlowEngine(model, chunk_size=64, k=k, recompute=recompute, offload=offload,
                               activation_checkpointing=checkpointing,
                               ).forward_backward(batch).peak_memory_bytes
    est = estimate_peak_memory(config, plan, k=k, recompute=recompute, offload=offload,
                               activation_checkpointing=checkpointing)
    ratio = est.step / measured
    assert est.step == est.activations + est.kv_state + est.kept_attention
    assert abs(ratio - 1) <= TOLERANCE, f"estimate/meter = {ratio:.3f}: {est.summary()}"
    full = estimate_peak_memory(config, plan, k=k)
    assert (est.kept_attention > 0) == (recompute == "selective" and offload != "all")
    assert (est.host > 0) == (offload != "none")
    if offload != "none":
        # two of four layers' keys/values, no gradients: a quarter of the state (all float32)
        assert est.kv_state * 4 == full.kv_state
        assert est.total < full.total + est.kept_attention + est.transient
    # the layer a checkpointed backward recomputes: one layer of the largest (64-token) chunk
    per_layer = (activation_bytes_per_token(config, activation_bytes=4)
                 - activation_bytes_per_token(config, activation_bytes=4,
                                              activation_checkpointing=True)) // 4 + 4 * 128
    assert est.transient == (64 * per_layer if checkpointing else 0)


@pytest.mark.parametrize("backend, seq_lens, chunk_size, kv_heads", [
    ("cpu-flash", [300, 40], 64, 2), ("varlen", [300, 40], 64, 2),
    ("cpu-flash", [200], 24, 1), ("varlen", [517, 9], 50, 4)])
def test_offloaded_host_memory_is_what_the_state_allocates(backend, seq_lens, chunk_size,
                                                           kv_heads, monkeypatch):
    """The planner's ``host`` is the pinned memory the offloaded state takes on CUDA: the
    pieces it asks for (recorded here), each rounded up to a power of two as torch's caching
    host allocator does. (One allocation per buffer, as before, rounded each, took up to twice
    the state; and the planner priced the state less its device layers, unrounded.)"""
    from chunkflow.runtime.kv_state import Copier
    from tests.runtime.test_equivalence import BACKENDS

    requests = []
    empty = Copier.host_empty

    def recording(self, shape, dtype):
        out = empty(self, shape, dtype)
        requests.append(out.nbytes)
        return out

    monkeypatch.setattr(Copier, "host_empty", recording)
    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=kv_heads)
    torch.manual_seed(0)
    model = Transformer(config)
    batch = [torch.randint(0, 256, (n,)) for n in seq_lens]
    engine = ChunkFlowEngine(model, chunk_size=chunk_size, k=1, offload="state",
                             attention_backend=BACKENDS[backend])
    engine.forward_backward(batch)
    extra = chunk_size if backend == "varlen" else 0  # the thd state's room for a last chunk
    est = estimate_peak_memory(config, build_chunks(seq_lens, chunk_size=chunk_size), k=1,
                               offload="state", state_extra_rows=extra)
    assert requests and len(requests) <= 4  # a few pieces, not one per layer and buffer
    assert est.host == sum(pinned_block_bytes(n) for n in requests)
    exact = kv_state_bytes(config, engine_state_positions(seq_lens, chunk_size),
                           activation_bytes=4) + 2 * 4 * kv_heads * config.head_dim * extra * 4
    assert exact <= est.host < 1.25 * exact  # the pieces' rounding wastes little


def test_kept_outputs_host_memory_is_what_offload_all_allocates(monkeypatch):
    """offload="all": each kept chunk's attention outputs and LSEs, every layer's, are made in
    a few pinned pieces at its first layer; the planner prices those pieces, rounded (it was
    their sum, unrounded, with one pinned allocation per layer and tensor)."""
    from chunkflow.runtime.attention import KeptAttention

    kept = []
    init = KeptAttention.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        kept.append(self)

    monkeypatch.setattr(KeptAttention, "__init__", recording)
    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    engine = ChunkFlowEngine(Transformer(config), chunk_size=64, k=1, recompute="selective",
                             offload="all")
    engine.forward_backward([torch.randint(0, 256, (300,))])  # chunks of 64 x 4 + 44
    assert len(kept) == 4
    for keep in kept:
        assert len(keep._pieces) <= (2 * 6).bit_length() + 1  # a few, not 2 per layer
        assert keep.host_bytes == kept_attention_host_bytes(config, 64, activation_bytes=4,
                                                            pinned=False)
        assert sum(pinned_block_bytes(p.nbytes) for p in keep._pieces) == \
            kept_attention_host_bytes(config, 64, activation_bytes=4)
    plan = build_chunks([300], chunk_size=64)
    state, everything = (estimate_peak_memory(config, plan, k=1, recompute="selective",
                                              offload=o) for o in ("state", "all"))
    per_chunk = kept_attention_host_bytes(config, 64, activation_bytes=4)
    # after the chain's last forward: the state and the 4 recomputed chunks' outputs
    assert everything.host == state.host + 4 * per_chunk


def engine_state_positions(seq_lens, chunk_size):
    """Positions before the last chunk of the one chain of these batches."""
    plan = build_chunks(seq_lens, chunk_size=chunk_size)
    (chain,) = plan.chains
    return plan.chunks[chain.chunk_ids[-1]].segments[0].start


def test_host_pieces_waste_less_than_a_buffer_each():
    """Pieces hold the buffers in order; each, rounded up to a power of two, wastes less than
    the buffer after it would have needed; at 7B shapes (28 layers, 4 x 128 key/value heads,
    bf16) and 256K positions nothing is wasted, where one allocation for all takes 64 GiB for
    42 GiB and one per buffer a power of two each."""
    qwen7b = SimpleNamespace(num_hidden_layers=28, num_key_value_heads=4, head_dim=128)
    bufs = offloaded_state_buffers(qwen7b, 262144, activation_bytes=2)
    assert sum(bufs) == 42 * 2**30
    assert offloaded_state_host_bytes(qwen7b, 262144, activation_bytes=2) == 42 * 2**30
    assert pinned_block_bytes(sum(bufs)) == 64 * 2**30
    for num_positions, extra in [(100000, 0), (28672, 4096), (777, 13)]:
        bufs = offloaded_state_buffers(qwen7b, num_positions, activation_bytes=2,
                                       extra_rows=extra)
        pieces = host_pieces(bufs)
        assert sum(n for n, _ in pieces) == len(bufs)
        first = 0
        for count, nbytes in pieces:
            assert nbytes == sum(bufs[first:first + count])  # (all multiples of HOST_ALIGN)
            first += count
            if first < len(bufs):
                assert pinned_block_bytes(nbytes) - nbytes < bufs[first]
        assert len(pieces) <= len(bufs).bit_length() + 1
    assert [pinned_block_bytes(n) for n in (1, 2, 3, 4096, 4097)] == [1, 2, 4, 4096, 8192]


def _shape(num_params: int, **fields):
    base = {f: getattr(GQA, f) for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads",
                                         "head_dim", "vocab_size")}
    return SimpleNamespace(**{**base, **fields}, num_params=num_params)


def test_gradients_exist_from_the_first_backward_on():
    """A plan's first chunk runs before any gradient exists; every later moment holds them."""
    model = _shape(10_000)  # small static parts: the chunk moments set the peak
    per_token = activation_bytes_per_token(model, activation_bytes=4)
    static = 4 * 10_000 * (1 + 2)  # weights, AdamW's two moments
    alone = estimate_peak_memory(model, build_chunks([64], chunk_size=64), k=1)
    assert "before any gradient" in alone.peak_at
    assert alone.total == static + 64 * per_token
    # a second, smaller chunk after it: the first still peaks when its activations outweigh
    # the second's plus the gradients
    grads = 4 * 10_000
    two = estimate_peak_memory(model, build_chunks([64, 10], chunk_size=64), k=1)
    assert two.total == static + max(64 * per_token, 10 * per_token + grads)
    # a chain's recompute moments come after its kept chunks' backward: gradients included
    chain = estimate_peak_memory(model, build_chunks([192], chunk_size=64), k=1)
    state = kv_state_bytes(model, 128, activation_bytes=4)
    assert chain.peak_at == "a chunk's backward"
    assert chain.total == static + grads + 64 * per_token + state


def test_lora_trains_adapters_only_and_keeps_frozen_weight_casts_per_graph():
    """LoRA: frozen weights in their dtype; adapters, their gradients and AdamW state in
    float32. Under bf16 autocast every live graph keeps its own 16-bit cast of the frozen
    matmul weights; a full fine-tune's trained weights are cast once per step."""
    model = _shape(1_000_000, vocab_size=1000, hidden_size=100)  # an untied 100K embedding
    plan = build_chunks([4096], chunk_size=1024)  # a 4-chunk chain
    full = estimate_peak_memory(model, plan, k=2, param_bytes=4, activation_bytes=2)
    lora = estimate_peak_memory(model, plan, k=2, param_bytes=4, activation_bytes=2,
                                trainable_params=5_000)
    assert (lora.weights, lora.grads, lora.optimizer_state) == (
        4_000_000 + 20_000, 20_000, 40_000)
    assert lora.activations == full.activations and lora.kv_state == full.kv_state
    cast = 2 * (1_000_000 - 100_000)  # all but the embedding lookup's weight
    assert full.weight_copies == cast  # the step's peak: the 2 kept graphs, one cached copy
    assert lora.weight_copies == 2 * cast  # each kept graph its own
    assert "before any gradient" in lora.peak_at  # the chain's kept chunks, run first
    assert lora.total == lora.weights + lora.weight_copies + lora.optimizer_state + lora.step
    bf16 = estimate_peak_memory(model, plan, k=2, param_bytes=2, trainable_params=5_000)
    assert bf16.weight_copies == 0 and bf16.weights == 2_000_000 + 20_000  # no casts
    tied = estimate_peak_memory(_shape(1_000_000, tie_word_embeddings=True), plan, k=1,
                                param_bytes=4, activation_bytes=2)
    assert tied.weight_copies == 2 * 1_000_000  # the head multiplies by the embedding
