"""Algorithm 2 as data: shape of the schedule, print/parse round trip, validator rejections."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.plan import (
    Action,
    ActionKind,
    ScheduleError,
    build_chunks,
    format_schedule,
    parse_schedule,
    schedule,
    validate_schedule,
)


def test_chain_schedule_matches_algorithm_2():
    plan = build_chunks([40], chunk_size=8)  # one chain of 5 chunks
    assert format_schedule(schedule(plan, k=2)) == "S0 S1 S2 F3 F4 B4 B3 R2 B2 R1 B1 R0 B0"
    assert format_schedule(schedule(plan, k=1)) == "S0 S1 S2 S3 F4 B4 R3 B3 R2 B2 R1 B1 R0 B0"
    assert format_schedule(schedule(plan, k=5)) == "F0 F1 F2 F3 F4 B4 B3 B2 B1 B0"
    assert schedule(plan, k=9) == schedule(plan, k=5)


def test_standalone_chunks_are_forward_then_backward():
    plan = build_chunks([3, 2, 5], chunk_size=6)  # BFD: [5] and [3, 2]
    assert format_schedule(schedule(plan, k=1)) == "F0 B0 F1 B1"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=12), st.integers(1, 16),
       st.integers(1, 6))
def test_schedules_validate_and_round_trip(seq_lens, chunk_size, k):
    plan = build_chunks(seq_lens, chunk_size=chunk_size)
    actions = schedule(plan, k=k)
    validate_schedule(actions, plan, k=k)
    assert parse_schedule(format_schedule(actions)) == actions
    # forward work: every chunk once, plus one recompute per chunk beyond the last k of a chain
    recomputes = sum(max(c.num_chunks - k, 0) for c in plan.chains)
    assert sum(a.kind is ActionKind.RECOMPUTE for a in actions) == recomputes


@pytest.mark.parametrize("text, why", [
    ("S0 S1 F2 B2 R0 B0 R1 B1", "recompute must be descending"),
    ("F0 F1 F2 B2 B1 B0", "last min"),                     # k=1 but all kept
    ("S0 S1 F2 B2 R1 R0 B1 B0", "R1 must be followed by B1"),
    ("S0 S1 F2 B2 R1 B1 B0", "without a live graph"),
    ("S1 S0 F2 B2 R1 B1 R0 B0", "forward must be ascending"),
    ("S0 S1 F2 B2 R1 B1", r"never ran backward"),
    ("S0 S0 S1 F2 B2 R1 B1 R0 B0", "already ran forward"),
    ("S0 S1 F2 B2 R1 B1 R0 B0 B0", "already ran backward"),
    ("S0 S1 F7 B2", "not in the plan"),
])
def test_validator_rejects(text, why):
    plan = build_chunks([24], chunk_size=8)
    assert format_schedule(schedule(plan, k=1)) == "S0 S1 F2 B2 R1 B1 R0 B0"
    with pytest.raises(ScheduleError, match=why) as info:
        validate_schedule(parse_schedule(text), plan, k=1)
    assert ">>" in str(info.value)  # the grid marks the failing action


def test_validator_rejects_backward_order_and_standalone_state():
    plan = build_chunks([16, 3], chunk_size=8)  # chain 0,1 then standalone 2
    with pytest.raises(ScheduleError, match="backward must be descending"):
        validate_schedule(parse_schedule("F0 F1 B0 B1 F2 B2"), plan, k=2)
    with pytest.raises(ScheduleError, match="no state"):
        validate_schedule(parse_schedule("F0 F1 B1 B0 S2 B2"), plan, k=2)
    with pytest.raises(ScheduleError, match="graphs alive"):
        validate_schedule(parse_schedule("F2 F0 F1 B1 B0 B2"), plan, k=2)


@pytest.mark.parametrize("text", ["X1", "F", "Fa", "3F", ""])
def test_parse_errors(text):
    with pytest.raises(ValueError, match="cannot parse"):
        Action.parse(text)


def test_bad_k():
    plan = build_chunks([5], chunk_size=4)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be"):
            schedule(plan, k=bad)


def test_validator_requires_recompute_right_before_its_backward():
    plan = build_chunks([32], chunk_size=8)  # chain of 4
    with pytest.raises(ScheduleError, match="R0 must be followed by B0"):
        validate_schedule(parse_schedule("S0 F1 F2 F3 B3 B2 B1 R0 F9"), plan, k=3)
    with pytest.raises(ScheduleError, match="R0 must be followed by B0"):
        validate_schedule(parse_schedule("S0 F1 F2 F3 B3 B2 B1 R0"), plan, k=3)
