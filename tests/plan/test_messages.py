"""The point-to-point replay under NCCL's rules (chunkflow.plan.messages), on hand-written traces
whose outcome each rule decides: rendezvous, issue order per stream (a pair's stream for single
ops, one per rank for batched groups), host order after a wait, and matching by position."""

import pytest

from chunkflow.plan import Action, ActionKind, ScheduleError
from chunkflow.plan.messages import P2POp, Post, Wait, check_messages, format_trace, replay


def send(peer, label="", nbytes=0):
    return P2POp("send", peer, label, nbytes)


def recv(peer, label="", nbytes=0):
    return P2POp("recv", peer, label, nbytes)


def single(op):
    return Post((op,), batched=False)


def batch(*ops, at=None):
    return Post(tuple(ops), action_idx=at)


def test_crossing_sends_deadlock_and_one_batch_each_does_not():
    """Both ranks send first, then receive: a send waits for a receive queued behind the
    peer's own send. Posting each rank's send and receive as one group lets them progress
    together (Megatron's send_forward_recv_backward)."""
    crossing = [[single(send(1)), single(recv(1)), Wait(0), Wait(1)],
                [single(send(0)), single(recv(0)), Wait(0), Wait(1)]]
    result = replay(crossing)
    assert not result.ok and set(result.stuck) == {0, 1}
    assert result.stuck[0].in_flight == [(0, crossing[0][0], [send(1)])]
    grouped = [[batch(send(1), recv(1)), Wait(0)], [batch(send(0), recv(0)), Wait(0)]]
    assert replay(grouped).ok


def test_an_early_receive_posted_alone_still_blocks_the_sends_behind_it():
    """A rank's ops on a stream run in issue order: a receive posted before a send holds it."""
    traces = [[single(recv(1)), single(send(1)), Wait(0), Wait(1)],
              [single(recv(0)), single(send(0)), Wait(0), Wait(1)]]
    assert set(replay(traces).stuck) == {0, 1}
    ordered = [[single(send(1)), single(recv(1)), Wait(0), Wait(1)],
               [single(recv(0)), single(send(0)), Wait(0), Wait(1)]]
    assert replay(ordered).ok


def ring(batched: bool):
    """Rank 0 sends A to 1 and B to 2; rank 2 passes C to 1 once B arrived; rank 1 takes C
    before A."""
    post = batch if batched else (lambda op: single(op))
    return [[post(send(1, "A")), post(send(2, "B")), Wait(0), Wait(1)],
            [post(recv(2, "C")), Wait(0), post(recv(0, "A")), Wait(1)],
            [post(recv(0, "B")), Wait(0), post(send(1, "C")), Wait(1)]]


def test_single_ops_run_per_pair_and_batched_groups_share_one_stream_per_rank():
    """Single isend/irecv go through the pair's own communicator: rank 0's send to 2 does not
    wait for its send to 1. Batched groups run on the group's communicator, one stream per
    rank: the send to 2 waits behind the send to 1, whose receive waits for C, which waits for
    B: a deadlock."""
    assert replay(ring(batched=False)).ok
    result = replay(ring(batched=True))
    assert set(result.stuck) == {0, 1, 2}
    assert result.stuck[0].in_flight == [(0, batch(send(1, "A")), [send(1, "A")])]


def test_an_op_posted_after_a_wait_starts_only_once_the_waited_op_completed():
    """Three ranks in a ring, each receiving from its predecessor and sending to its successor
    on separate pair streams: posting the send before waiting for the receive runs; waiting
    first (a blocking recv) deadlocks the ring."""
    def ring3(wait_first: bool):
        traces = []
        for r in range(3):
            prev, nxt = (r - 1) % 3, (r + 1) % 3
            if wait_first:
                traces.append([single(recv(prev)), Wait(0), single(send(nxt)), Wait(1)])
            else:
                traces.append([single(recv(prev)), single(send(nxt)), Wait(0), Wait(1)])
        return traces

    assert replay(ring3(wait_first=False)).ok
    result = replay(ring3(wait_first=True))
    assert set(result.stuck) == {0, 1, 2}
    assert all(s.post_idx == 0 and s.in_flight == [(0, single(recv((r - 1) % 3)),
                                                    [recv((r - 1) % 3)])]
               for r, s in result.stuck.items())


def test_a_send_without_a_receive_never_completes_and_batched_never_meets_single():
    lonely = [[batch(send(1)), Wait(0)], []]
    result = replay(lonely)
    assert set(result.stuck) == {0}
    assert result.stuck[0].post_idx == 0
    # not waited for: the rank posted everything, the send is still in flight
    unwaited = replay([[batch(send(1))], []])
    assert unwaited.stuck[0].post is None and unwaited.stuck[0].in_flight
    mixed = [[batch(send(1)), Wait(0)], [single(recv(0)), Wait(0)]]
    assert set(replay(mixed).stuck) == {0, 1}


def test_the_nth_send_meets_the_nth_receive_and_a_label_or_size_mismatch_is_reported():
    swapped = [[batch(send(1, "F1", 64)), batch(send(1, "F2", 32)), Wait(0), Wait(1)],
               [batch(recv(0, "F2", 32)), batch(recv(0, "F1", 64)), Wait(0), Wait(1)]]
    result = replay(swapped)
    assert not result.stuck and len(result.mismatched) == 2
    with pytest.raises(ScheduleError, match=r"rank 0: send F1->1 \(64 B\) meets rank 1: "
                                            r"recv F2<-0 \(32 B\)"):
        check_messages(swapped)
    unlabelled = [[batch(send(1)), Wait(0)], [batch(recv(0, "F1", 8)), Wait(0)]]
    assert replay(unlabelled).ok


def test_a_deadlock_is_reported_with_the_stuck_ops_and_the_schedule_grid_on_global_ranks():
    """Ranks 4 and 6 (one pipeline of a larger job): ops name global ranks."""
    f1, b0 = Action(ActionKind.FORWARD, 1), Action(ActionKind.BACKWARD, 0)
    s0 = Action(ActionKind.STATE_FORWARD, 0)
    traces = [[batch(send(6, "F1"), at=1), batch(recv(6, "B0"), at=2), Wait(1), Wait(0)],
              [batch(send(4, "B0"), at=2), batch(recv(4, "F1"), at=3), Wait(1), Wait(0)]]
    schedules = [[s0, f1, b0], [s0, Action(ActionKind.RECOMPUTE, 0), b0, f1]]
    with pytest.raises(ScheduleError) as err:
        check_messages(traces, ranks=[4, 6], schedules=schedules)
    text = str(err.value)
    assert "deadlock under NCCL's point-to-point rules" in text
    assert "rank 4: blocked in post 1 (action #2) [recv B0<-6]" in text
    assert "unmatched in flight: post 0 (action #1) [send F1->6]" in text
    assert "rank 4: S0 F1 >>B0<<" in text and "rank 6: S0 R0 B0 >>F1<<" in text
    check_messages([[batch(send(6), recv(6)), Wait(0)], [batch(recv(4), send(4)), Wait(0)]],
                   ranks=[4, 6])
    with pytest.raises(ValueError, match=r"rank 4: send ->5 names rank 5, which has no trace; "
                                          r"valid: \[4, 6\]"):
        check_messages([[batch(send(5))], []], ranks=[4, 6])


def test_bad_traces_are_refused_with_what_is_valid():
    with pytest.raises(ValueError, match="op must be 'send' or 'recv', got 'put'"):
        P2POp("put", 1)
    with pytest.raises(ValueError, match="a post needs at least one op"):
        Post(())
    with pytest.raises(ValueError, match="an unbatched post is one op, got 2"):
        Post((send(1), recv(1)), batched=False)
    with pytest.raises(ValueError, match="rank 0: wait for post 1, but it has 1 posts"):
        replay([[batch(send(1)), Wait(1)], [batch(recv(0))]])
    with pytest.raises(ValueError, match=r"rank 1: send ->1 names peer 1; valid: another rank "
                                          r"of 0..1"):
        replay([[], [batch(send(1))]])
    with pytest.raises(ValueError, match="3 ranks named for 2 traces"):
        check_messages([[], []], ranks=[0, 1, 2])
    with pytest.raises(ValueError, match="a post on channel 'F' is one op, got 2"):
        Post((send(1), recv(1)), channel="F")


def test_channels_are_streams_of_their_own():
    """Both ranks send first, then receive: on one stream per pair that is a deadlock, on a
    channel per direction (the zero-bubble stage I/O) it completes; a channel matches only
    its own channel's posts."""
    def on(channel, op):
        return Post((op,), channel=channel)

    def single(op):
        return Post((op,), batched=False)

    pair = [[single(send(1)), single(recv(1)), Wait(1)],
            [single(send(0)), single(recv(0)), Wait(1)]]
    assert not replay(pair).ok
    channels = [[on("F", send(1)), on("B", recv(1)), Wait(1)],
                [on("B", send(0)), on("F", recv(0)), Wait(1)]]
    assert replay(channels).ok
    crossed = [[on("F", send(1)), Wait(0)], [on("B", recv(0)), Wait(0)]]
    assert not replay(crossed).ok


def test_format_trace():
    trace = [batch(send(1, "F3"), recv(1, "B0"), at=4), Wait(0), single(recv(2, "F1"))]
    assert format_trace(trace) == ("post [send F3->1, recv B0<-1] @4\nwait 0\n"
                                   "single [recv F1<-2]")
