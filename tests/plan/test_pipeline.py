"""Pipeline schedules: generated ones always validate; broken ones fail with the grid marked."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.plan import ScheduleError, build_chunks
from chunkflow.plan.pipeline import (format_pipeline, one_f_one_b, parse_pipeline,
                                     state_aware_1f1b, validate_pipeline)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=12),
       chunk_size=st.integers(1, 24), k=st.integers(1, 5), p=st.integers(1, 8),
       seed=st.integers(0, 10**6))
def test_every_generated_schedule_validates(lengths, chunk_size, k, p, seed):
    import random

    plan = build_chunks(lengths, chunk_size=chunk_size)
    validate_pipeline(state_aware_1f1b(plan, p, k=k), plan, k=k)
    # any order that keeps each chain ascending is valid too, chains interleaved with the rest
    rng = random.Random(seed)
    queues = [[c.chunk_id] for c in plan.chunks if c.chain_id is None]
    queues += [list(c.chunk_ids) for c in plan.chains]
    order = []
    while queues:
        q = rng.choice(queues)
        order.append(q.pop(0))
        queues = [q for q in queues if q]
    validate_pipeline(state_aware_1f1b(plan, p, k=k, order=order), plan, k=k)


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("p", range(1, 9))
def test_plain_1f1b_validates(m, p):
    validate_pipeline(one_f_one_b(m, p))


def fails(stages, plan, k, message):
    with pytest.raises(ScheduleError) as e:
        validate_pipeline(stages, plan, k=k)
    assert message in str(e.value), str(e.value)
    return str(e.value)


def test_broken_schedules_are_refused_with_the_grid():
    plan = build_chunks([4, 2, 1, 1], chunk_size=2)  # chain 0 = chunks 0, 1
    good = format_pipeline(state_aware_1f1b(plan, 2, k=2))
    # backward of a chain ascending instead of descending
    bad = parse_pipeline(good.replace("B1 B0", "B0 B1"))
    msg = fails(bad, plan, 2, "backward must be descending")
    assert ">>B0<<" in msg
    # more than k graphs of one chain alive on a stage
    fails(state_aware_1f1b(plan, 2, k=2), plan, 1, "last min(k=1, 2) chunks run F")
    # a stage that skips a chunk's forward
    stages = parse_pipeline(good)
    stages[1] = [a for a in stages[1] if str(a) != "F2"]
    assert ">>B2<<" in fails(stages, plan, 2, "backward of chunk 2 without a live graph")
    # a micro-batch one stage never runs: its partner on the other stage waits forever
    msg = fails(parse_pipeline("stage 0: F0 F1 B0 B1\nstage 1: F0 B0"), None, 1,
                "stage 0 runs B1 but stage 1 never runs its backward")
    assert "stage 0: F0 F1 B0 >>B1<<" in msg


def test_deadlock_is_found_by_the_dry_run():
    # stage 0 waits for B1 before F1, but stage 1 can only run B1 after F1: circular wait
    # each list is fine alone, but stage 0's B0 needs stage 1's B0, which comes after stage 1's
    # F1, which needs stage 0's F1, which comes after stage 0's B0
    stages = parse_pipeline("stage 0: F0 B0 F1 B1\nstage 1: F1 F0 B0 B1")
    msg = fails(stages, None, 1, "deadlock")
    assert "stage 0: F0 >>B0<< F1 B1" in msg and "stage 1: >>F1<< F0 B0 B1" in msg


def test_parse_errors_name_the_line():
    with pytest.raises(ValueError, match="line 2: 'stage 3: F0': expected 'stage 1: "):
        parse_pipeline("stage 0: F0 B0\nstage 3: F0")


def test_orders_must_keep_chains_ascending():
    plan = build_chunks([4, 2, 1, 1], chunk_size=2)  # chain 0 = chunks 0, 1
    with pytest.raises(ValueError, match=r"runs chain 0's chunks \[0, 1\] out of ascending"):
        state_aware_1f1b(plan, 2, k=1, order=[1, 0, 2, 3])


def test_the_dry_run_refuses_out_of_turn_actions():
    from chunkflow.plan.pipeline import run_pipeline

    for text in ("stage 0: F0 B0\nstage 1: B0 F0", "stage 0: F0 F0 B0"):
        with pytest.raises(ScheduleError, match="out of turn"):
            run_pipeline(parse_pipeline(text), duration=lambda s, a: 1)
