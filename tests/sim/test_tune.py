"""Predictions and the auto-tuner: closed forms where they exist, the budget, the ordering."""

import dataclasses
import random
from types import SimpleNamespace

import pytest

from chunkflow.plan import build_chunks
from chunkflow.plan.cost import GPU_PROFILES, MODEL_SHAPES, CostModel, GPUProfile
from chunkflow.plan.memory import estimate_peak_memory
from chunkflow.plan.units import format_size, parse_size
from chunkflow.sim.tune import (Candidate, autotune, format_candidates, layouts,
                                 predict_chunkflow, predict_megatron, split_sequences)
from chunkflow.plan.lengths import sample_lengths

SHAPE = MODEL_SHAPES["qwen2.5-7b"]
H100 = GPU_PROFILES["h100-80gb"]
# No launch overhead, no small-GEMM penalty, free P2P: only FLOPs cost time.
FLOPS_ONLY = GPUProfile("flops only", peak_flops=1e15, memory_bytes=80 * 2**30,
                        matmul_efficiency=0.5, attention_efficiency=0.5,
                        tokens_half_efficiency=0, layer_overhead_s=0.0,
                        nvlink_bytes_per_s=float("inf"), network_bytes_per_s=float("inf"))


@pytest.mark.parametrize("text, value", [
    ("256K", 256 * 1024), ("32k", 32768), ("4096", 4096), ("1.5K", 1536), ("1M", 2**20),
    ("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("80 gib", 80 * 2**30), ("512MiB", 2**29),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "80XB", "0", "1.3", "-5K"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_size():
    assert format_size(8192, tokens=True) == "8K" and format_size(80 * 2**30) == "80.0GiB"


def test_layouts_follow_megatrons_rules():
    got = layouts(SHAPE, 16)
    assert all(tp * pp * dp == 16 for tp, pp, dp in got)
    assert {tp for tp, _, _ in got} == {1, 2, 4}  # 4 KV heads: TP 8 is not allowed
    assert all(28 % pp == 0 for _, pp, _ in got) and (4, 4, 1) in got and (1, 16, 1) not in got


def test_megatron_without_pipeline_is_the_sum_of_its_micro_batches():
    lens = [100, 5000, 1200, 30000]
    cost = CostModel(SHAPE, FLOPS_ONLY, tp=4, recompute="full")
    pred = predict_megatron(cost, lens)
    serial = sum(cost.forward_seconds([n]) + cost.backward_seconds([n]) for n in lens)
    assert pred.iteration_seconds == pytest.approx(serial)
    assert pred.bubble_ratio == pytest.approx(0, abs=1e-12)


def test_megatron_pipeline_of_equal_micro_batches_has_1f1b_bubbles():
    m, p = 8, 4
    headless = dataclasses.replace(SHAPE, vocab_size=1)  # equal stages: 7 layers each
    cost = CostModel(headless, FLOPS_ONLY, tp=4, pp=p)
    pred = predict_megatron(cost, [4096] * m)
    step = cost.forward_seconds([4096]) + cost.backward_seconds([4096])
    assert pred.bubble_ratio == pytest.approx((p - 1) / (m + p - 1), abs=1e-4)
    assert pred.iteration_seconds == pytest.approx((m + p - 1) * step, rel=1e-4)


def test_chunkflow_memory_on_one_gpu_matches_the_step_estimate():
    """The simulator's peak is the step estimate's: the same moments, gradients from the first
    backward on (a k=2 chain's kept chunks run first and peak without them)."""
    cost = CostModel(SHAPE, H100)
    grads = cost.grad_bytes(0)
    # the step estimate with float32-sized gradients only (bf16 "parameters" of half the
    # count, SGD): its peak less its weights is the moments' step parts, with gradients
    # where they exist
    grads_only = SimpleNamespace(**dataclasses.asdict(SHAPE), num_params=int(grads) // 2)
    peaks_at = set()
    for lens, k, size in [([20000], 1, 4096), ([20000], 2, 4096), ([9000, 3000, 500], 1, 4096),
                          ([16384], 4, 4096), ([16384], 2, 8192)]:
        plan = build_chunks(lens, chunk_size=size)
        pred = predict_chunkflow(cost, lens, chunk_size=size, k=k)
        est = estimate_peak_memory(grads_only, plan, k=k, param_bytes=2, optimizer="sgd")
        assert est.grads == grads
        chunks = cost.static_bytes(0) - grads + est.total - est.weights
        optimizer_step = cost.static_bytes(0) + cost.optimizer_step_bytes(0)
        assert optimizer_step == cost.static_bytes(0) + grads  # AdamW's temporaries, unsharded
        assert pred.peak_memory_bytes == max(chunks, optimizer_step)
        peaks_at.add(est.peak_at)
    assert len(peaks_at) == 2  # both kinds of chunk moment were the chunks' peak


def test_chunkflow_rejects_core_attention_recompute():
    with pytest.raises(ValueError, match="recompute='selective'"):
        predict_chunkflow(CostModel(SHAPE, H100, recompute="selective"), [10], chunk_size=8,
                          k=1)


def test_chunkflow_layer_recompute_is_activation_checkpointing():
    """The cost model's full layer recompute prices chunkflow's activation checkpointing as the
    step estimate does: each layer's input kept, one layer recomputed in a backward."""
    cost = CostModel(SHAPE, H100, recompute="full", distributed_optimizer=False)
    grads = cost.grad_bytes(0)
    grads_only = SimpleNamespace(**dataclasses.asdict(SHAPE), num_params=int(grads) // 2)
    peaks = []
    for lens, k, size in [([20000], 1, 4096), ([262144], 2, 16384)]:
        pred = predict_chunkflow(cost, lens, chunk_size=size, k=k)
        est = estimate_peak_memory(grads_only, build_chunks(lens, chunk_size=size), k=k,
                                   param_bytes=2, optimizer="sgd",
                                   activation_checkpointing=True)
        chunks = cost.static_bytes(0) - grads + est.total - est.weights
        assert est.transient > 0
        assert pred.peak_memory_bytes == max(chunks, cost.static_bytes(0) + grads)
        peaks.append(pred.peak_memory_bytes == chunks)
    assert peaks == [False, True]  # the 256K chain's state outweighs the optimizer step's


def test_sequences_are_balanced_over_replicas():
    lens = sample_lengths(random.Random(0), 64, max_len=65536)
    cost = CostModel(SHAPE, H100, tp=4, dp=4)
    shares = split_sequences(cost, lens)
    assert sorted(n for share in shares for n in share) == sorted(lens)
    load = [sum(cost.forward_seconds([n]) + cost.backward_seconds([n]) for n in s) for s in shares]
    longest = max(cost.forward_seconds([n]) + cost.backward_seconds([n]) for n in lens)
    assert max(load) - min(load) <= longest  # greedy (LPT) bound


def test_autotune_respects_the_budget_and_sorts():
    kw = dict(max_len=65536, num_gpus=8, global_batch=32, seed=0,
              chunk_sizes=(4096, 16384), ks=(1, 4))
    everything = autotune(SHAPE, H100, memory_budget=float("inf"), **kw)
    assert everything and all(isinstance(c, Candidate) for c in everything)
    times = [c.iteration_seconds for c in everything]
    assert times == sorted(times)
    assert {(c.tp, c.pp, c.dp) for c in everything} <= set(layouts(SHAPE, 8))
    budget = sorted(c.peak_memory_bytes for c in everything)[len(everything) // 2]
    within = autotune(SHAPE, H100, memory_budget=budget, **kw)
    assert within == [c for c in everything if c.peak_memory_bytes <= budget]
    text = format_candidates(within, top=3)
    assert text.splitlines()[1].startswith("*") and "more within the budget" in text
    with pytest.raises(ValueError, match="smallest predicted peak"):
        autotune(SHAPE, H100, memory_budget=2**30, **kw)


def test_autotune_tries_each_effective_k_once():
    cands = autotune(SHAPE, H100, max_len=8192, num_gpus=1, memory_budget=float("inf"),
                     seq_lens=[6000, 3000, 100], chunk_sizes=(4096,), ks=(1, 2, 4, 8))
    assert sorted(c.k for c in cands) == [1, 2]  # the longest chain has two chunks


def test_chunkflow_replicas_get_whole_units_and_idle_layouts_are_not_chosen():
    """Issue 25 §4: 8 short chats make one 4K chunk, which the runtime places on one replica;
    pricing sequences split before chunking made DP=2 look twice as fast, and plan --auto chose
    it though one replica sat idle in most steps."""
    chats = [300] * 8
    dp2 = CostModel(SHAPE, H100, dp=2)
    runtime = predict_chunkflow(dp2, chats, chunk_size=4096, k=1, shard="units")
    paper = predict_chunkflow(dp2, chats, chunk_size=4096, k=1)
    one = predict_chunkflow(CostModel(SHAPE, H100), chats, chunk_size=4096, k=1)
    assert runtime.idle_replicas == 0.5 and paper.idle_replicas == 0.0
    assert runtime.stage_busy_seconds[0] > 1.5 * paper.stage_busy_seconds[0]  # 8 chats, not 4
    assert runtime.num_microbatches == one.num_microbatches == 1
    # a long sequence and short ones: both replicas busy, balanced as the runtime balances
    mixed = predict_chunkflow(dp2, [20000, *chats], chunk_size=4096, k=1, shard="units")
    assert mixed.idle_replicas == 0.0
    with pytest.raises(ValueError, match="shard='chunks'"):
        predict_chunkflow(dp2, chats, chunk_size=4096, k=1, shard="chunks")
    cands = autotune(SHAPE, H100, max_len=4096, num_gpus=2, memory_budget=200 << 30,
                     batches=[chats] * 5, chunk_sizes=[4096], ks=[1], runtime="chunkflow")
    assert cands[0].dp == 1 and not cands[0].mostly_idle
    assert [c.mostly_idle for c in cands if c.dp == 2] == [True]
    assert cands[-1].dp == 2  # listed, after every layout that uses its GPUs


def test_autotune_tries_the_zero_bubble_schedules_where_they_could_win():
    kw = dict(max_len=65536, num_gpus=8, global_batch=32, seed=0, memory_budget=float("inf"),
              chunk_sizes=(4096, 16384), ks=(1, 4))
    plain = autotune(SHAPE, H100, **kw)
    every = autotune(SHAPE, H100, schedules=("1f1b", "zb-h1", "zb-h2"), **kw)
    zero_bubble = [c for c in every if c.schedule != "1f1b"]
    assert zero_bubble and all(c.pp > 1 for c in zero_bubble)
    assert [c for c in every if c.schedule == "1f1b"] == plain
    assert every[0].iteration_seconds <= plain[0].iteration_seconds
    # tried only while they could beat the fastest found: never for all pipelined candidates
    pipelined = [c for c in plain if c.pp > 1]
    assert len(zero_bubble) < 2 * len(pipelined)
    # the best zero-bubble candidate idles less than the same settings under 1F1B
    best = zero_bubble[0]
    same = next(p for p in plain if (p.chunk_size, p.k, p.tp, p.pp, p.dp)
                == (best.chunk_size, best.k, best.tp, best.pp, best.dp))
    assert best.bubble_ratio < same.bubble_ratio
