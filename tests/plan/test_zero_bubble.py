"""State-aware zero-bubble schedules: the I/W actions' rules, the generated lists (valid,
memory-neutral for zb-h1, fewer bubbles than 1F1B) and the simulator's pricing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.plan import (Action, ActionKind, ScheduleError, build_chunks, format_pipeline,
                            parse_pipeline, parse_schedule, state_aware_1f1b, validate_pipeline,
                            validate_schedule)
from chunkflow.plan.zero_bubble import (_ListScheduler, _main_sequence, _peak_alive,
                                        _peak_tokens, pipeline_schedule, token_duration)
from chunkflow.sim import simulate

I, W = ActionKind.INPUT_BACKWARD, ActionKind.WEIGHT_BACKWARD


def test_input_and_weight_actions_print_and_parse():
    assert str(Action(I, 3)) == "I3" and str(Action(W, 12)) == "W12"
    assert parse_schedule("F0 I0 W0") == [Action(ActionKind.FORWARD, 0), Action(I, 0),
                                          Action(W, 0)]
    with pytest.raises(ValueError, match="F/S/R/B/I/W"):
        Action.parse("i3")
    with pytest.raises(ValueError, match="only S and R"):
        Action(W, 1, selective=True)


@pytest.mark.parametrize("lengths, k, text, why", [
    ([2], 1, "F0 W0 I0", "W0 needs I0 before it"),
    ([2], 1, "F0 I0", r"ran I but never W"),
    ([2], 1, "F0 I0 W0 W0", "W0 needs I0"),
    ([2], 1, "F0 I0 B0", "already ran backward"),
    # a chain of two chunks, k=1: chunk 1's graph is alive until W1, so R0 before it is a
    # second graph of the chain
    ([4], 1, "S0 F1 I1 R0 I0 W1 W0", "more than k=1"),
    ([4], 1, "S0 F1 I1 W1 R0 W0", r"must be followed by B0 \(or I0\)"),
    # the input backward keeps Algorithm 2's descending order
    ([4], 2, "F0 F1 I0 W0 I1 W1", "backward must be descending"),
])
def test_the_validator_knows_the_split_backward(lengths, k, text, why):
    plan = build_chunks(lengths, chunk_size=2)
    with pytest.raises(ScheduleError, match=why):
        validate_schedule(parse_schedule(text), plan, k=k)


def test_a_split_schedule_is_valid():
    plan = build_chunks([4, 2], chunk_size=2)
    validate_schedule(parse_schedule("S0 F1 I1 W1 R0 I0 W0 F2 I2 W2"), plan, k=1)


def test_the_paper_example_bubble_drops_below_30_percent_with_zb_h1():
    """`chunkflow simulate --chunk-size 2 --k 2 --schedule zb-h1`: 45.45% -> 25%."""
    plan = build_chunks([4, 2, 1, 1], chunk_size=2)
    d = token_duration(plan)
    ratios = {name: simulate(pipeline_schedule(plan, 4, k=2, schedule=name),
                             duration=d).bubble_ratio for name in ("1f1b", "zb-h1", "zb-h2")}
    assert ratios["1f1b"] == pytest.approx(20 / 44)
    assert ratios["zb-h1"] == pytest.approx(0.25)
    assert ratios["zb-h2"] <= ratios["zb-h1"]


def test_the_cross_stage_dependency_of_an_input_backward_is_the_next_stage_backward():
    stages = parse_pipeline("stage 0: F0 I0 W0\nstage 1: F0 B0")
    validate_pipeline(stages)
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_pipeline(parse_pipeline("stage 0: F0 I0 W0 F1 I1 W1\nstage 1: F1 B1 F0 B0"))


lengths = st.lists(st.integers(1, 40), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(lengths=lengths, chunk=st.sampled_from([4, 8]), p=st.integers(2, 6),
       k=st.integers(1, 3), recompute=st.sampled_from(["full", "selective"]),
       name=st.sampled_from(["zb-h1", "zb-h2"]))
def test_zero_bubble_lists_are_valid_and_round_trip(lengths, chunk, p, k, recompute, name):
    plan = build_chunks(lengths, chunk_size=chunk)
    stages = pipeline_schedule(plan, p, k=k, schedule=name, recompute=recompute)
    validate_pipeline(stages, plan, k=k)
    assert parse_pipeline(format_pipeline(stages)) == stages
    for s, acts in enumerate(stages):  # every backward is split
        assert not any(a.kind is ActionKind.BACKWARD for a in acts)
        assert sum(a.kind is I for a in acts) == sum(a.kind is W for a in acts) == plan.num_chunks
    if name == "zb-h1":
        # memory-neutral: the baseline candidate (plan order, each stage in its main order)
        # holds no more graphs on any stage than 1F1B's busiest stage; what is chosen holds
        # no more memory (graphs and key/value state, in tokens) than 1F1B or that baseline
        one_f_one_b = state_aware_1f1b(plan, p, k=k, recompute=recompute)
        main = [_main_sequence(a) for a in one_f_one_b]
        baseline = _ListScheduler(plan, main, k=k, duration=token_duration(plan)).run()
        most = max(_peak_alive(a) for a in one_f_one_b)
        assert all(_graphs_alive(acts) <= most for acts in baseline), format_pipeline(baseline)
        budget = max(_peak_tokens(plan, a) for a in one_f_one_b + baseline)
        assert all(_peak_tokens(plan, acts) <= budget for acts in stages)


def _graphs_alive(acts) -> int:
    alive = peak = 0
    for a in acts:
        if a.kind in (ActionKind.FORWARD, ActionKind.RECOMPUTE):
            alive += 1
            peak = max(peak, alive)
        elif a.kind in (ActionKind.BACKWARD, W):
            alive -= 1
    return peak


def test_zb_h1_has_fewer_bubbles_than_1f1b_on_average():
    import random

    rng, total = random.Random(0), {"1f1b": 0.0, "zb-h1": 0.0}
    for _ in range(30):
        lengths = [rng.choice([1, 2, 3, 5, 8, 13, 30]) for _ in range(rng.randint(2, 12))]
        plan = build_chunks(lengths, chunk_size=rng.choice([2, 4, 8]))
        p, k = rng.choice([2, 3, 4, 6]), rng.choice([1, 2, 3])
        for name in total:
            total[name] += simulate(pipeline_schedule(plan, p, k=k, schedule=name),
                                    duration=token_duration(plan)).bubble_ratio
    assert total["zb-h1"] < 0.7 * total["1f1b"], total


def test_the_simulator_holds_a_graph_until_its_weight_backward():
    stages = parse_pipeline("stage 0: F0 I0 W0")
    r = simulate(stages, duration=lambda s, a: 1.0, graph_bytes=lambda s, c: 10.0)
    assert r.peak_memory == [10.0]
    stages = parse_pipeline("stage 0: F0 I0 F1 W0 I1 W1")
    r = simulate(stages, duration=lambda s, a: 1.0, graph_bytes=lambda s, c: 10.0)
    assert r.peak_memory == [20.0]  # F1 runs while chunk 0 still waits for its W


def test_unknown_schedule_names_are_refused():
    plan = build_chunks([4], chunk_size=2)
    with pytest.raises(ValueError, match="valid: 1f1b, zb-h1, zb-h2"):
        pipeline_schedule(plan, 2, k=1, schedule="zb-v")
