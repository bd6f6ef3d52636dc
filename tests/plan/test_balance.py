"""Data-parallel sharding: chunk FLOPs against a closed form, LPT against brute-force optima and
Graham's bound, subplans against the ChunkPlan invariants written out independently."""

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.plan import (Segment, Sharding, balance_chunks, build_chunks, chunk_train_flops,
                            schedule, subplan, unit_costs, validate_schedule)
from chunkflow.plan.cost import ModelShape

# E=8, I=16, L=2, H=2 query heads, G=2 KV heads, D=4, V=10: small enough that attention matters.
SHAPE = ModelShape(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=4)
# E=4, I=8, L=1, H=2, G=1, D=2, V=10: the worked example below.
HAND = ModelShape(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=2)


def reference_flops(shape, segment_lens, prefix_len, recomputed):
    """From first principles: 2 FLOPs per weight per token (q/k/v/o, gate/up/down, the head);
    causal attention 4*H*D per (query, key) pair and layer; backward 2x (matmul), 2.5x
    (attention); a recomputed chunk runs its forward twice."""
    e, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    h, g, d, v = (shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim,
                  shape.vocab_size)
    weights = e * h * d + e * g * d + e * g * d + h * d * e + 3 * e * i  # q, k, v, o, MLP
    n = sum(segment_lens)
    matmul = 2 * n * (layers * weights + e * v)
    pairs = sum(m * (m + 1) // 2 for m in segment_lens) + segment_lens[0] * prefix_len
    attention = layers * 4 * h * d * pairs
    forward = matmul + attention
    return forward + 2 * matmul + 2.5 * attention + (forward if recomputed else 0)


def reference_chunk(plan, chunk, recomputed):
    prefix = chunk.chain_idx * plan.chunk_size if chunk.chain_id is not None else 0
    return reference_flops(SHAPE, [s.num_tokens for s in chunk.segments], prefix, recomputed)


def assert_valid_plan(plan):
    """Every ChunkPlan invariant of chunks.py, written out without the library's help."""
    cs, lens = plan.chunk_size, plan.seq_lens
    assert [c.chunk_id for c in plan.chunks] == list(range(plan.num_chunks))
    assert [ch.chain_id for ch in plan.chains] == list(range(len(plan.chains)))
    chain_chunks = [c for ch in plan.chains for c in ch.chunk_ids]
    assert chain_chunks == list(range(len(chain_chunks)))  # chains first, chain by chain
    assert [ch.seq_id for ch in plan.chains] == sorted(ch.seq_id for ch in plan.chains)
    for ch in plan.chains:
        assert lens[ch.seq_id] > cs and ch.num_chunks == math.ceil(lens[ch.seq_id] / cs)
        for idx, c in enumerate(ch.chunk_ids):
            chunk = plan.chunks[c]
            assert (chunk.chain_id, chunk.chain_idx) == (ch.chain_id, idx)
            start = idx * cs
            assert chunk.segments[0] == Segment(ch.seq_id, start, min(start + cs, lens[ch.seq_id]))
    pieces = {i: [] for i in range(len(lens))}
    for chunk in plan.chunks:
        assert 0 < chunk.num_tokens <= cs
        if chunk.chain_id is None:
            assert chunk.chain_idx is None and chunk.chunk_id >= len(chain_chunks)
        packed = chunk.segments[1:] if chunk.chain_id is not None else chunk.segments
        assert [s.seq_id for s in packed] == sorted(s.seq_id for s in packed)
        assert all(s.start == 0 and s.end == lens[s.seq_id] <= cs for s in packed)
        for s in chunk.segments:
            pieces[s.seq_id].append((s.start, s.end))
    for seq_id, n in enumerate(lens):  # every token exactly once, in order
        assert pieces[seq_id][0][0] == 0 and pieces[seq_id][-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(pieces[seq_id], pieces[seq_id][1:]))


def units_of(plan):
    """Whole units by hand: each chain's chunk ids, then each chunk outside every chain."""
    in_chains = {c for ch in plan.chains for c in ch.chunk_ids}
    return [ch.chunk_ids for ch in plan.chains] + [
        (c,) for c in range(plan.num_chunks) if c not in in_chains]


plans_st = st.builds(
    lambda lens, cs, tails: build_chunks(lens, chunk_size=cs, pack_chain_tails=tails),
    st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(4, 16), st.booleans())


# ---- costs -----------------------------------------------------------------------------------

def test_chunk_train_flops_worked_example():
    # q 4*2*2=16, k 4*1*2=8, v 8, o 16, MLP 3*4*8=96 -> 144 weights/layer, head 4*10=40:
    # 3 tokens * 2 * 184 = 1104 matmul FLOPs forward.
    plan = build_chunks([6], chunk_size=3)
    first, second = plan.chunks
    # chunk 0: 3*4/2 = 6 pairs * 4*H*D=16 = 96; 3*1104 + 3.5*96 = 3648
    assert chunk_train_flops(HAND, first, recomputed=False) == 3648
    # chunk 1 also sees the 3 earlier keys: 6 + 3*3 = 15 pairs -> 240; 3*1104 + 3.5*240 = 4152
    assert chunk_train_flops(HAND, second, recomputed=False) == 4152
    assert chunk_train_flops(HAND, second, recomputed=True) == 4152 + 1104 + 240


@settings(max_examples=100, deadline=None)
@given(plans_st, st.booleans())
def test_chunk_train_flops_closed_form(plan, recomputed):
    for chunk in plan.chunks:  # packed chain tails see no prefix, only the chain segment does
        assert chunk_train_flops(SHAPE, chunk, recomputed=recomputed) == pytest.approx(
            reference_chunk(plan, chunk, recomputed), rel=1e-12)


@pytest.mark.parametrize("recomputed", [False, True])
def test_later_chain_chunks_cost_more(recomputed):
    plan = build_chunks([8 * 32], chunk_size=32)
    flops = [chunk_train_flops(SHAPE, c, recomputed=recomputed) for c in plan.chunks]
    assert all(a < b for a, b in zip(flops, flops[1:]))


@settings(max_examples=100, deadline=None)
@given(plans_st, st.integers(1, 4))
def test_unit_costs_are_whole_units_in_plan_order(plan, k):
    units = unit_costs(plan, k=k, shape=SHAPE)
    assert [ids for ids, _ in units] == units_of(plan)
    for ids, cost in units:
        num_recomputed = max(len(ids) - k, 0) if plan.chunks[ids[0]].chain_id is not None else 0
        expected = sum(reference_chunk(plan, plan.chunks[c], idx < num_recomputed)
                       for idx, c in enumerate(ids))
        assert cost == pytest.approx(expected, rel=1e-12)


# ---- balancing -------------------------------------------------------------------------------

def brute_force_makespan(costs, num_ranks):
    best = math.inf
    for ranks in itertools.product(range(num_ranks), repeat=len(costs) - 1):
        loads = [0.0] * num_ranks
        for cost, rank in zip(costs, (0,) + ranks):  # unit 0 on rank 0: ranks are symmetric
            loads[rank] += cost
        best = min(best, max(loads))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=7), st.integers(4, 16),
       st.booleans(), st.integers(1, 3), st.integers(1, 4))
def test_lpt_partitions_units_and_meets_grahams_bound(lens, cs, tails, k, num_ranks):
    plan = build_chunks(lens, chunk_size=cs, pack_chain_tails=tails)
    sharding = balance_chunks(plan, num_ranks, k=k, shape=SHAPE)
    assert sharding.num_ranks == num_ranks == len(sharding.costs)
    assigned = [c for ids in sharding.chunk_ids for c in ids]
    assert sorted(assigned) == list(range(plan.num_chunks))  # each chunk on exactly one rank
    cost_of = dict(unit_costs(plan, k=k, shape=SHAPE))
    for ids, rank_cost in zip(sharding.chunk_ids, sharding.costs):
        assert list(ids) == sorted(ids)
        held = [u for u in units_of(plan) if set(u) & set(ids)]
        assert {c for u in held for c in u} == set(ids)  # chains never split
        assert rank_cost == pytest.approx(sum(cost_of[u] for u in held), rel=1e-12)
    opt = brute_force_makespan(list(cost_of.values()), num_ranks)
    assert max(sharding.costs) <= (4 / 3 - 1 / (3 * num_ranks)) * opt * (1 + 1e-12)
    assert sharding == balance_chunks(plan, num_ranks, k=k, shape=SHAPE)  # deterministic


def test_identical_units_balance_perfectly_in_plan_order():
    plan = build_chunks([64] * 6, chunk_size=64)
    sharding = balance_chunks(plan, 3, k=1, shape=SHAPE)
    assert sharding.chunk_ids == ((0, 3), (1, 4), (2, 5))  # ties: plan order, lowest rank
    assert sharding.imbalance == 1.0
    assert sharding.summary() == "3 ranks: chunks 2/2/2, cost imbalance 1.00 (max/mean)"
    chains = balance_chunks(build_chunks([200] * 4, chunk_size=64), 2, k=2, shape=SHAPE)
    assert chains.imbalance == 1.0 and [len(ids) for ids in chains.chunk_ids] == [8, 8]


def test_fewer_units_than_ranks_leaves_ranks_empty():
    plan = build_chunks([256, 10], chunk_size=64)  # a chain with no room left, one short chunk
    sharding = balance_chunks(plan, 5, k=1, shape=SHAPE)
    assert sharding.chunk_ids == ((0, 1, 2, 3), (4,), (), (), ())
    assert sharding.costs[2:] == (0.0, 0.0, 0.0)
    assert sharding.imbalance == pytest.approx(sharding.costs[0] / (sum(sharding.costs) / 5))
    assert sharding.summary().startswith("5 ranks: chunks 4/1/0/0/0, cost imbalance ")


def test_cost_balance_beats_count_balance_with_a_long_chain():
    # One chain of 4 chunks (its late chunks attend to up to 192 earlier tokens, its first 3 are
    # recomputed) and 8 standalone chunks: by cost the chain is worth ~11 standalone chunks.
    plan = build_chunks([256] + [64] * 8, chunk_size=64)
    sharding = balance_chunks(plan, 2, k=1, shape=SHAPE)
    assert sharding.chunk_ids == ((0, 1, 2, 3), tuple(range(4, 12)))
    units = unit_costs(plan, k=1, shape=SHAPE)
    # the best split with equal chunk counts (6/6): the chain plus 2 standalone chunks
    by_count = min(
        max(sum(cost for (ids, cost), r in zip(units, ranks) if r == rank) for rank in (0, 1))
        for ranks in itertools.product((0, 1), repeat=len(units))
        if sum(len(ids) for (ids, _), r in zip(units, ranks) if r == 0) == 6)
    assert max(sharding.costs) < by_count
    count_imbalance = by_count / (sum(c for _, c in units) / 2)
    assert sharding.imbalance < count_imbalance - 0.15


@pytest.mark.parametrize("num_ranks", [0, -1, 1.5])
def test_balance_rejects_bad_num_ranks(num_ranks):
    with pytest.raises(ValueError, match="num_ranks"):
        balance_chunks(build_chunks([5], chunk_size=4), num_ranks, k=1, shape=SHAPE)


def test_balance_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        balance_chunks(build_chunks([5], chunk_size=4), 2, k=0, shape=SHAPE)


def test_imbalance_of_a_hand_made_sharding():
    assert Sharding(((0,), (1,), ()), (3.0, 2.0, 1.0)).imbalance == 1.5


# ---- subplans --------------------------------------------------------------------------------

def check_subplan(plan, ids):
    sub, seq_ids = subplan(plan, ids)
    assert_valid_plan(sub)
    assert sub.chunk_size == plan.chunk_size
    assert list(seq_ids) == sorted({s.seq_id for c in ids for s in plan.chunks[c].segments})
    assert sub.seq_lens == tuple(plan.seq_lens[s] for s in seq_ids)
    originals = [plan.chunks[c] for c in sorted(ids)]
    assert sub.num_chunks == len(originals)
    for new, old in zip(sub.chunks, originals):  # equal to the originals after renumbering
        assert tuple(Segment(seq_ids[s.seq_id], s.start, s.end) for s in new.segments) == \
            old.segments
        assert new.chain_idx == old.chain_idx and (new.chain_id is None) == (old.chain_id is None)
    old_chains = [ch for ch in plan.chains if ch.chunk_ids[0] in ids]
    assert [seq_ids[ch.seq_id] for ch in sub.chains] == [ch.seq_id for ch in old_chains]
    for k in (1, 2):
        validate_schedule(schedule(sub, k=k), sub, k=k)
    return sub, seq_ids


@settings(max_examples=100, deadline=None)
@given(plans_st, st.integers(1, 4), st.integers(1, 3))
def test_subplans_of_a_sharding_cover_the_plan(plan, num_ranks, k):
    assert_valid_plan(plan)  # the reference checker accepts what build_chunks makes
    sharding = balance_chunks(plan, num_ranks, k=k, shape=SHAPE)
    tokens = {}
    for ids in sharding.chunk_ids:
        if not ids:
            continue
        sub, seq_ids = check_subplan(plan, ids)
        for chunk in sub.chunks:
            for s in chunk.segments:  # tokens map back through seq_ids
                tokens.setdefault(seq_ids[s.seq_id], []).extend(range(s.start, s.end))
    assert tokens == {i: list(range(n)) for i, n in enumerate(plan.seq_lens)}


@settings(max_examples=100, deadline=None)
@given(plans_st, st.data())
def test_subplan_of_any_whole_units(plan, data):
    units = units_of(plan)
    picked = data.draw(st.lists(st.sampled_from(units), min_size=1, unique=True))
    ids = [c for u in picked for c in u]
    check_subplan(plan, data.draw(st.permutations(ids)))  # any order of the ids


def test_subplan_renumbers_a_worked_example():
    # seq 0 (10) is chain 0 = chunks 0-2, seq 2 (12) chain 1 = chunks 3-5; seq 3 (2) fills chain
    # 0's tail, seq 1 (3) is chunk 6.
    plan = build_chunks([10, 3, 12, 2], chunk_size=4)
    assert [c.segments for c in plan.chunks[2:3]] == [(Segment(0, 8, 10), Segment(3, 0, 2))]
    sub, seq_ids = subplan(plan, [6, 3, 4, 5])
    assert seq_ids == (1, 2)
    assert sub.seq_lens == (3, 12) and [c.seq_id for c in sub.chains] == [1]
    assert sub.chains[0].chunk_ids == (0, 1, 2) and sub.chunks[3].segments == (Segment(0, 0, 3),)


def test_subplan_errors():
    plan = build_chunks([10, 3, 12, 2], chunk_size=4)  # chains (0, 1, 2) and (3, 4, 5), chunk 6
    with pytest.raises(ValueError, match="empty"):
        subplan(plan, [])
    for bad in (-1, 7):
        with pytest.raises(ValueError, match=rf"chunk id {bad} is not in the plan.*0\.\.6"):
            subplan(plan, [6, bad])
    with pytest.raises(ValueError, match="chunk id 6 is selected twice"):
        subplan(plan, [6, 6])
    with pytest.raises(ValueError, match=r"chain 1 .*split.*\[5\].*\[3, 4, 5\]"):
        subplan(plan, [3, 4, 6])
