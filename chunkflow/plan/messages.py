"""Point-to-point messages replayed under NCCL's rules, stdlib only: does a recorded op order
deadlock on GPUs?

gloo buffers every send, so a CPU run passes with an op order that hangs under NCCL. This module
replays each rank's ordered point-to-point ops (:class:`Post` and :class:`Wait` events, recorded
from the stage I/O that really issued them, :class:`chunkflow.parallel.pipeline.P2PStageIO`)
under NCCL's semantics and reports a deadlock with the stuck ops and, given the schedule, its
grid with each stuck rank's action marked.

The rules (NCCL's documented behaviour and torch's ``ProcessGroupNCCL``):

* **Rendezvous.** A send completes only when the peer's matching receive runs (no eager buffer
  is assumed: NCCL's is a few MiB, a chunk's activation is tens of MiB). The n-th send from a to
  b on a communicator matches b's n-th receive from a on the same communicator.
* **Issue order per stream.** A rank's ops run on a communicator's stream in the order it
  posted them: a single ``isend``/``irecv`` on the 2-rank communicator of its pair (one stream
  per pair), a ``batch_isend_irecv`` group on the group's communicator (one stream for all of
  the rank's batched groups, whatever their peers). An op starts once every earlier op on its
  stream has completed; a batched group's ops start together and the group completes when all of
  them have matched. Batched and single ops go through different communicators and never
  match each other. A post on a *channel* (``Post.channel``, e.g. ``"F"``) goes through a
  2-rank process group of its own for the pair and that channel: its own communicator and
  stream, matched only with the same channel's posts.
* **Host order.** An op posted after its rank waited for another (a blocking receive, or a
  ``wait()``) starts only after that one completed: the rank could not post it earlier.

A replay that completes every op is deadlock-free under these rules for any message sizes and
timings; rules that only add order can only add deadlocks, so this is the conservative model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from chunkflow.plan.scheduling import Action, ScheduleError


@dataclass(frozen=True)
class P2POp:
    """One send or receive: ``peer`` is the other rank, ``label`` what it carries (``F3``: the
    forward activation of chunk 3, ``B3``: its gradient), ``nbytes`` its size."""

    op: str
    peer: int
    label: str = ""
    nbytes: int = 0

    def __post_init__(self):
        if self.op not in ("send", "recv"):
            raise ValueError(f"op must be 'send' or 'recv', got {self.op!r}")

    def __str__(self) -> str:
        arrow = "->" if self.op == "send" else "<-"
        return f"{self.op} {self.label}{arrow}{self.peer}"


@dataclass(frozen=True)
class Post:
    """Ops posted together: one ``batch_isend_irecv`` (``batched``), or a single isend/irecv.
    ``action_idx``: the index of the action (in the rank's schedule) that posted it."""

    ops: tuple[P2POp, ...]
    batched: bool = True
    action_idx: int | None = None
    channel: str | None = None
    """The pair's process group this post goes through (module docstring); None: the
    pipeline's group (batched) or the pair's communicator (single)."""

    def __post_init__(self):
        if not self.ops:
            raise ValueError("a post needs at least one op")
        if not self.batched and len(self.ops) != 1:
            raise ValueError(f"an unbatched post is one op, got {len(self.ops)}")
        if self.channel is not None and len(self.ops) != 1:
            raise ValueError(f"a post on channel {self.channel!r} is one op, got "
                             f"{len(self.ops)}")

    @property
    def communicator(self) -> tuple:
        """What its ops are matched on (with the pair): channel, batched or single."""
        return ("channel", self.channel) if self.channel is not None else ("group",
                                                                           self.batched)


@dataclass(frozen=True)
class Wait:
    """The rank blocks until its ``post_idx``-th post (counting its posts from 0) completed."""

    post_idx: int


Event = Post | Wait


@dataclass
class Stuck:
    """A rank that never finishes: its host blocks on post ``post_idx`` (``post``), or on none
    (``None``: it posted everything), and ``in_flight`` holds its started posts that never
    completed, each with its ops that never matched (the ones to read: what they wait for sits
    behind another rank's stuck op)."""

    post_idx: int | None
    post: Post | None
    in_flight: list[tuple[int, Post, list[P2POp]]]


@dataclass
class Replay:
    """What :func:`replay` found: ``stuck`` holds each rank that could not finish (empty when
    deadlock-free); ``mismatched`` each send whose matching receive (the same position in the
    pair's order) carries another label or size: (sender, send, receiver, receive)."""

    num_ranks: int
    completed_posts: int
    stuck: dict[int, Stuck] = field(default_factory=dict)
    mismatched: list[tuple[int, P2POp, int, P2POp]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.stuck and not self.mismatched


def replay(traces: Sequence[Sequence[Event]]) -> Replay:
    """Replay every rank's events (``traces[r]``: rank r's posts and waits, in order) under the
    module's rules."""
    n = len(traces)
    posts = [[e for e in t if isinstance(e, Post)] for t in traces]
    for r, trace in enumerate(traces):
        for e in trace:
            if isinstance(e, Wait) and not 0 <= e.post_idx < len(posts[r]):
                raise ValueError(f"rank {r}: wait for post {e.post_idx}, but it has "
                                 f"{len(posts[r])} posts")
            if isinstance(e, Post):
                for op in e.ops:
                    if not 0 <= op.peer < n or op.peer == r:
                        raise ValueError(f"rank {r}: {op} names peer {op.peer}; valid: another "
                                         f"rank of 0..{n - 1}")

    # Matching: the n-th send a->b on a communicator pairs with b's n-th receive from a.
    partner: dict[tuple[int, int, int], tuple[int, int, int]] = {}  # (rank, post, op) both ways
    queues: dict[tuple[tuple, int, int, str], list[tuple[int, int, int]]] = {}
    for r in range(n):
        for pi, post in enumerate(posts[r]):
            for oi, op in enumerate(post.ops):
                src, dst = (r, op.peer) if op.op == "send" else (op.peer, r)
                queues.setdefault((post.communicator, src, dst, op.op), []).append(
                    (r, pi, oi))
    unmatched: set[tuple[int, int, int]] = set()
    mismatched: list[tuple[int, P2POp, int, P2POp]] = []
    for (comm, src, dst, kind), ops in queues.items():
        if kind != "send":
            continue
        recvs = queues.get((comm, src, dst, "recv"), [])
        for a, b in zip(ops, recvs):
            partner[a], partner[b] = b, a
            send, recv = posts[a[0]][a[1]].ops[a[2]], posts[b[0]][b[1]].ops[b[2]]
            if ((send.label and recv.label and send.label != recv.label)
                    or (send.nbytes and recv.nbytes and send.nbytes != recv.nbytes)):
                mismatched.append((a[0], send, b[0], recv))
        unmatched.update(ops[len(recvs):])
    for (comm, src, dst, kind), ops in queues.items():
        if kind == "recv":
            sends = queues.get((comm, src, dst, "send"), [])
            unmatched.update(ops[len(sends):])

    # Streams: each post's predecessors on its stream(s), on its own rank.
    def streams(r: int, post: Post) -> set[tuple]:
        if post.channel is not None:
            return {("channel", r, post.channel, post.ops[0].peer)}
        return {("batch", r)} if post.batched else {("pair", r, post.ops[0].peer)}

    stream_prev: dict[tuple[int, int], list[int]] = {}
    for r in range(n):
        last: dict[tuple, int] = {}
        for pi, post in enumerate(posts[r]):
            stream_prev[r, pi] = [last[s] for s in streams(r, post) if s in last]
            for s in streams(r, post):
                last[s] = pi

    pc = [0] * n               # next event per rank
    posted = [0] * n           # posts issued per rank
    started: set[tuple[int, int]] = set()
    matched: set[tuple[int, int, int]] = set()
    complete: set[tuple[int, int]] = set()

    def is_complete(r: int, pi: int) -> bool:
        return (r, pi) in complete

    progressed = True
    while progressed:
        progressed = False
        for r in range(n):  # the host runs until it blocks on a wait
            while pc[r] < len(traces[r]):
                e = traces[r][pc[r]]
                if isinstance(e, Wait) and not is_complete(r, e.post_idx):
                    break
                if isinstance(e, Post):
                    posted[r] += 1
                pc[r] += 1
                progressed = True
        for r in range(n):  # start posts whose streams are free
            for pi in range(posted[r]):
                if (r, pi) not in started and all(is_complete(r, q)
                                                  for q in stream_prev[r, pi]):
                    started.add((r, pi))
                    progressed = True
        for r in range(n):  # rendezvous
            for pi in range(posted[r]):
                if (r, pi) not in started or (r, pi) in complete:
                    continue
                for oi in range(len(posts[r][pi].ops)):
                    key = (r, pi, oi)
                    other = partner.get(key)
                    if key not in matched and other is not None and other[:2] in started:
                        matched.update((key, other))
                        progressed = True
                if all((r, pi, oi) in matched for oi in range(len(posts[r][pi].ops))):
                    complete.add((r, pi))
                    progressed = True

    result = Replay(num_ranks=n, completed_posts=len(complete), mismatched=mismatched)
    for r in range(n):
        pending = [pi for pi in range(len(posts[r])) if (r, pi) not in complete]
        if not pending:
            continue
        blocking = traces[r][pc[r]].post_idx if pc[r] < len(traces[r]) else None
        result.stuck[r] = Stuck(
            blocking, None if blocking is None else posts[r][blocking],
            [(pi, posts[r][pi], [op for oi, op in enumerate(posts[r][pi].ops)
                                 if (r, pi, oi) not in matched])
             for pi in pending if (r, pi) in started])
    if unmatched and result.ok:  # cannot happen: an op without a partner never completes
        raise AssertionError("an op without a partner completed")
    return result


def check_messages(traces: Sequence[Sequence[Event]], *, ranks: Sequence[int] | None = None,
                   schedules: Sequence[Sequence[Action]] | None = None) -> None:
    """Raise :class:`ScheduleError` if :func:`replay` of ``traces`` deadlocks (or pairs a send
    with a receive of another label or size), with the stuck ops per rank and, given each rank's action list (``schedules[r]``), the grid with the
    action each stuck rank posted its blocking op in marked ``>>F3<<``. ``ranks``: the global
    rank of each trace, which the ops' peers name (default: 0..n-1)."""
    names = list(ranks) if ranks is not None else list(range(len(traces)))
    if len(names) != len(traces):
        raise ValueError(f"{len(names)} ranks named for {len(traces)} traces")
    if ranks is not None:  # ops name global ranks; replay numbers the traces 0..n-1
        index = {rank: i for i, rank in enumerate(names)}

        def local(op: P2POp, r: int) -> P2POp:
            if op.peer not in index:
                raise ValueError(f"rank {names[r]}: {op} names rank {op.peer}, which has no "
                                 f"trace; valid: {names}")
            return replace(op, peer=index[op.peer])

        traces = [[replace(e, ops=tuple(local(op, r) for op in e.ops))
                   if isinstance(e, Post) else e for e in trace]
                  for r, trace in enumerate(traces)]
    result = replay(traces)
    if result.ok:
        return

    def named(op: P2POp) -> str:
        return str(replace(op, peer=names[op.peer])) + (f" ({op.nbytes} B)" if op.nbytes else "")

    lines = []
    if result.mismatched:
        lines.append("messages matched in order carry different data "
                     "(chunkflow.plan.messages): the n-th send of a pair meets its n-th receive")
        lines += [f"  rank {names[a]}: {named(send)} meets rank {names[b]}: {named(recv)}"
                  for a, send, b, recv in result.mismatched[:5]]
        if len(result.mismatched) > 5:
            lines.append(f"  ... and {len(result.mismatched) - 5} more")
    if not result.stuck:
        raise ScheduleError("\n".join(lines))
    lines.append("deadlock under NCCL's point-to-point rules (chunkflow.plan.messages): "
                 f"{len(result.stuck)} of {result.num_ranks} ranks never finish")

    def where(pi: int, post: Post, ops) -> str:
        at = "" if post.action_idx is None else f" (action #{post.action_idx})"
        return f"post {pi}{at} [{', '.join(named(op) for op in ops)}]"

    for r, stuck in sorted(result.stuck.items()):
        blocked = (f"blocked in {where(stuck.post_idx, stuck.post, stuck.post.ops)}"
                   if stuck.post else "posted everything")
        flight = "; ".join(where(pi, post, ops) for pi, post, ops in stuck.in_flight)
        lines.append(f"  rank {names[r]}: {blocked}; unmatched in flight: {flight or 'none'}")
    if schedules is not None:
        lines.append("schedule (the action that posted each rank's blocking post marked):")
        for r, acts in enumerate(schedules):
            stuck = result.stuck.get(r)
            idx = stuck.post.action_idx if stuck and stuck.post else None
            lines.append(f"  rank {names[r]}: " + " ".join(
                f">>{a}<<" if i == idx else str(a) for i, a in enumerate(acts)))
    raise ScheduleError("\n".join(lines))


def format_trace(trace: Sequence[Event]) -> str:
    """One line per event: ``post [send F3->1, recv B0<-1] @4`` / ``wait 2``."""
    out = []
    for e in trace:
        if isinstance(e, Wait):
            out.append(f"wait {e.post_idx}")
        else:
            at = "" if e.action_idx is None else f" @{e.action_idx}"
            kind = (f"channel {e.channel}" if e.channel is not None
                    else "post" if e.batched else "single")
            out.append(f"{kind} [" + ", ".join(str(op) for op in e.ops) + "]" + at)
    return "\n".join(out)
