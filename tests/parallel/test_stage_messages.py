"""The pipeline's point-to-point messages cannot deadlock under NCCL: the order the real stage
I/O issues (recorded from the real executor on every stage, in one process) replays without a
deadlock under NCCL's rules for every schedule the runtime produces; the earlier order is caught
both by the replay and, on gloo, by a transport with NCCL's rendezvous."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.plan import ScheduleError
from chunkflow.plan.messages import check_messages, replay
from tests.parallel.stage_messages import EagerStageIO, check_pipeline, record_pipeline
from tests.parallel.workers import LENGTHS, eager_order_on_gloo, start

CHUNK = 8
# Standalone sequences (packed), and chains of 2..9 chunks at chunk 8.
lengths = st.lists(st.one_of(st.integers(1, CHUNK), st.integers(CHUNK + 1, 9 * CHUNK)),
                   min_size=1, max_size=7)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths, pp=st.integers(2, 8), k=st.integers(1, 4),
       recompute=st.sampled_from(["full", "selective"]), dp=st.integers(1, 2))
def test_every_schedule_replays_without_a_deadlock_under_nccl_rules(lengths, pp, k, recompute,
                                                                     dp):
    """A training step and an evaluation (forward only) on every stage of every replica."""
    check_pipeline(lengths, pp=pp, k=k, chunk_size=CHUNK, dp=dp, recompute=recompute)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths, pp=st.integers(2, 6), k=st.integers(1, 3),
       recompute=st.sampled_from(["full", "selective"]),
       schedule=st.sampled_from(["zb-h1", "zb-h2"]), dp=st.integers(1, 2))
def test_zero_bubble_schedules_replay_without_a_deadlock_under_nccl_rules(lengths, pp, k,
                                                                          recompute, schedule,
                                                                          dp):
    """Their messages go on channels (a stream per pair and direction), posted at once; a
    training step and an evaluation on every stage of every replica."""
    check_pipeline(lengths, pp=pp, k=k, chunk_size=CHUNK, recompute=recompute, dp=dp,
                   schedule=schedule)


def test_zb_h2_on_one_stream_per_rank_deadlocks_hence_its_channels():
    """Batched with the next receive on one stream, as 1F1B's messages are, zb-h2's order
    deadlocks: its first stages run further ahead than their neighbours mirror."""
    traces, _ = record_pipeline([23, 2, 51, 7, 3, 5, 58], pp=2, k=2, chunk_size=CHUNK,
                                schedule="zb-h2", evaluate=False, channels=False)
    assert not replay(traces).ok
    check_pipeline([23, 2, 51, 7, 3, 5, 58], pp=2, k=2, chunk_size=CHUNK, schedule="zb-h2")


@pytest.mark.parametrize("pp", [2, 4])
def test_the_earlier_eager_order_is_reported_as_a_deadlock(pp):
    """Every send posted as soon as it is computed, each receive alone: gloo ran it, NCCL
    hangs on it."""
    traces, schedules = record_pipeline(LENGTHS, pp=pp, k=1, chunk_size=16,
                                        io_class=EagerStageIO)
    assert not replay(traces).ok
    with pytest.raises(ScheduleError, match=r"(?s)deadlock under NCCL.*unmatched in flight: "
                                            r"post \d+ \(action #\d+\) \[send"):
        check_messages(traces, schedules=schedules)


def test_on_gloo_the_rendezvous_transport_turns_an_unsafe_order_into_a_clear_timeout(tmp_path):
    procs = start(eager_order_on_gloo, 2, 3.0, timeout_s=60.0, error_dir=tmp_path)
    t0 = time.monotonic()
    try:
        for p in procs:
            p.join(timeout=60)
        assert all(p.exitcode not in (None, 0) for p in procs), [p.exitcode for p in procs]
        errors = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
        assert any("waited 3 s for its match: under NCCL (a send completes only when its "
                   "receive runs, a rank's posts run in order) this stage message order "
                   "deadlocks" in e for e in errors), errors
        assert time.monotonic() - t0 < 60
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
