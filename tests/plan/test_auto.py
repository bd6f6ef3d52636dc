"""``--chunking.auto``'s search: what it tries, how it ranks, and that its choice fits.

The budget test runs the chosen settings on the benchmark model (``chunkflow bench``'s "cpu"
model and batches) at 4K/16K/32K: static memory (weights, gradients, AdamW moments) plus the
runtime's CPU meter must stay within the budget. Each budget is tight: the settings the search
would choose without a limit do not fit it.
"""

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.bench.workload import batch_lengths, get_model_config, global_batch
from chunkflow.models import Transformer
from chunkflow.plan.auto import Settings, candidate_settings, choose_settings, format_choices
from chunkflow.plan.cost import CPU_PROFILE, GPU_PROFILES, ModelShape, get_model_shape

BENCH = get_model_config("cpu")
SHAPE = ModelShape.from_config(BENCH)


def test_candidates_are_distinct_and_offload_only_where_allowed():
    cands = candidate_settings(5000, offload=False, chunk_sizes=(1024, 2048, 4096, 8192, 16384))
    assert len(cands) == len(set(cands))
    assert {c.chunk_size for c in cands} == {1024, 2048, 4096, 8192}  # 8192 holds it whole
    assert all(c.offload == "none" for c in cands)
    whole = [c for c in cands if c.chunk_size == 8192]  # no chain: no recompute, no state
    assert {(c.k, c.recompute) for c in whole} == {(1, "full")}
    assert max(c.k for c in cands if c.chunk_size == 1024) == 5  # the longest chain
    gpu = candidate_settings(5000, offload=True, chunk_sizes=(1024,))
    assert {c.offload for c in gpu} == {"none", "state", "all"}
    assert all(c.recompute == "selective" for c in gpu if c.offload == "all")


def test_without_a_limit_it_recomputes_nothing():
    batches = [batch_lengths(4096, 16, seed=s) for s in range(3)]
    best = choose_settings(SHAPE, batches, memory_budget=1 << 40, profile=CPU_PROFILE)[0]
    assert best.settings == Settings(4096, 1)  # one chunk holds every sequence


def test_offload_only_when_it_is_needed_to_fit():
    """Offload's copies are priced as hidden, so they never make a step faster: a budget that
    fits without offload gets none; a tighter one offloads."""
    shape, h100 = get_model_shape("qwen2.5-7b"), GPU_PROFILES["h100-80gb"]
    lengths = [[32768, 2000, 500]]
    roomy = choose_settings(shape, lengths, memory_budget=140 << 30, profile=h100,
                            param_bytes=2, offload=True)[0]
    assert roomy.settings.offload == "none" and roomy.host_bytes == 0
    tight = choose_settings(shape, [[131072, 2000, 500]], memory_budget=80 << 30, profile=h100,
                            param_bytes=2, offload=True)[0]
    assert tight.settings.offload != "none"


def test_an_offloaded_varlen_state_is_priced_with_its_extra_chunk_of_host_rows():
    """The CUDA varlen kernel's chain state holds a chunk of rows past its prefix; offloaded,
    they are pinned host memory too."""
    from chunkflow.plan import build_chunks
    from chunkflow.plan.memory import estimate_peak_memory

    shape, h100 = get_model_shape("qwen2.5-7b"), GPU_PROFILES["h100-80gb"]
    lengths = [131072, 2000, 500]
    plain, varlen = (choose_settings(shape, [lengths], memory_budget=80 << 30, profile=h100,
                                     param_bytes=2, offload=True, varlen_state=v)[0]
                     for v in (False, True))
    s = varlen.settings
    assert s == plain.settings and s.offload != "none"
    est = estimate_peak_memory(shape, build_chunks(lengths, chunk_size=s.chunk_size), k=s.k,
                               param_bytes=2, recompute=s.recompute, offload=s.offload,
                               activation_checkpointing=s.activation_checkpointing,
                               state_extra_rows=s.chunk_size)
    assert varlen.host_bytes == est.host > plain.host_bytes


def test_nothing_fits_names_the_smallest_peak():
    with pytest.raises(ValueError, match=r"no chunk settings fit a memory budget of 8\.0 MiB: "
                                         r"the smallest estimated peak is .*chunk_size=256"):
        choose_settings(SHAPE, [[32768, 100]], memory_budget=8 << 20, profile=CPU_PROFILE)


def test_selective_recompute_wins_when_its_outputs_fit():
    """7B at 128K on one 80 GiB H100: the time model prefers selective recompute, and takes
    offload when that is what fits (the GPU's budget is the binding constraint here)."""
    shape = get_model_shape("qwen2.5-7b")
    choices = choose_settings(shape, [[131072, 2000, 500]], memory_budget=80 << 30,
                              profile=GPU_PROFILES["h100-80gb"], param_bytes=2, offload=True)
    assert choices[0].settings.recompute == "selective"
    assert all(c.peak_bytes <= 80 << 30 for c in choices)
    times = [c.step_seconds for c in choices]
    assert times == sorted(times)
    assert "*" in format_choices(choices).splitlines()[1]


@pytest.mark.parametrize("max_len, budget_mib", [(4096, 40), (16384, 72), (32768, 110)])
def test_the_chosen_settings_fit_the_budget_on_the_bench_model(max_len, budget_mib):
    budget = budget_mib << 20
    batches = [batch_lengths(max_len, 4, seed=s) for s in range(4)]
    unlimited = choose_settings(SHAPE, batches, memory_budget=1 << 40, profile=CPU_PROFILE)[0]
    assert unlimited.peak_bytes > budget  # the budget binds
    best = choose_settings(SHAPE, batches, memory_budget=budget, profile=CPU_PROFILE)[0]
    s = best.settings
    torch.manual_seed(0)
    model = Transformer(BENCH)
    engine = ChunkFlowEngine(model, chunk_size=s.chunk_size, k=s.k, recompute=s.recompute,
                             activation_checkpointing=s.activation_checkpointing)
    static = SHAPE.num_params * 4 * 4  # float32 weights, gradients, two AdamW moments
    for seed in range(1):  # seed 0 holds a sequence of max_len: the longest chain
        batch = global_batch(max_len, 4, seed=seed, vocab_size=BENCH.vocab_size)
        measured = engine.forward_backward(batch).peak_memory_bytes
        model.zero_grad(set_to_none=True)
        assert static + measured <= budget, (s, static + measured, budget)
        assert static + measured <= best.peak_bytes
