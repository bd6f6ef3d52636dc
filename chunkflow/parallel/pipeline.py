"""Pipeline parallelism: a stage is the model minus other stages' modules; chunks flow between
stages by point-to-point sends.

Each stage executes its own action list from :func:`chunkflow.plan.state_aware_1f1b`, the lists
:mod:`chunkflow.sim` simulates, through the single-device engine: :class:`P2PStageIO` is where a
stage's inputs come from and its outputs go. ``F``/``S`` receive the previous stage's hidden
states (1, n, E) (under sequence parallelism, each TP rank its rows of them, to the same TP
rank of the next stage) and send theirs on; ``R`` recomputes from the input the stage kept at ``S``
(nothing travels); ``B`` receives the gradient of its output and sends its input's gradient back.
Every stage keeps the key/value state of its own layers only, and at most k graphs per chain.

Shapes are known on both sides without any metadata message: every rank holds the plan, and a
chunk's token count says how big its activation is. Messages need no tags (NCCL has none): both
partners derive their order from the same schedule.

NCCL, unlike gloo, does not buffer sends: a rank's messages run in the order posted and a send
completes only when its receive runs, so a stage that posts ``send F1`` and then ``recv B0``
while its neighbour posts ``send B0`` and then ``recv F1`` hangs both. So an action's sends are
held until the next action begins and go out in one ``batch_isend_irecv`` with that action's
receive, as Megatron's ``send_forward_recv_backward`` does (alone when it receives nothing,
and at the end of the step). :mod:`chunkflow.plan.messages` replays the recorded order under
NCCL's rules; the tests run it over every schedule the runtime produces.

The zero-bubble schedules (:mod:`chunkflow.plan.zero_bubble`) run a stage's forwards and
backwards in an order that neighbours do not mirror (a ``W`` sits anywhere, ``zb-h2`` runs
further ahead), which one in-order stream per rank cannot carry. They use *channels*
(:class:`ChannelP2P`): a 2-rank process group per pair of neighbouring stages and direction,
``F`` (activations, to the next stage) and ``B`` (gradients, to the previous one), so each
direction of each pair is a stream of its own. A send is posted as soon as it is computed (an
``I``'s input gradient leaves before its ``W`` runs), a receive when its action starts. Both
ends of a channel take its messages in the same order (every stage runs the chunks' forwards,
and their backwards, in one order), so a channel never waits on a message queued behind
another, and the schedule itself is free of dependency cycles (its simulation finishes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from chunkflow.models.adapter import adapt
from chunkflow.parallel.mesh import ParallelContext
from chunkflow.parallel.tensor import SequenceShard
from chunkflow.plan import Action, ActionKind, Chunk
from chunkflow.plan.messages import P2POp, Post, Wait, check_messages
from chunkflow.runtime.peers import StageIO


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Decoder layers of each stage: balanced, a remainder to the first stages (the last one also
    holds the output head), as :attr:`chunkflow.plan.cost.CostModel.stage_layers`."""
    if num_stages > num_layers:
        raise ValueError(f"pp={num_stages} stages for a model of {num_layers} layers; valid: "
                         f"pp <= {num_layers} (every stage needs a layer)")
    q, r = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        n = q + (s < r)
        ranges.append(range(start, start + n))
        start += n
    return ranges


def split_stage(model: torch.nn.Module, stage: int, num_stages: int) -> torch.nn.Module:
    """In place: keep stage ``stage``'s decoder layers, the embedding on the first stage and the
    final norm and output head on the last (:meth:`~chunkflow.models.adapter.ModelAdapter.
    keep_stage`). Parameter names stay those of the whole model. ``model``: chunkflow's
    reference model or a transformers causal LM (LoRA included) of a supported family."""
    adapter = adapt(model, what="pipeline parallelism", valid="--parallel.pp=1")
    adapter.check_pp(num_stages)
    layers = stage_layer_ranges(len(adapter.decoder_layers()), num_stages)[stage]
    adapter.keep_stage(layers, first=stage == 0, last=stage == num_stages - 1)
    return model


class BatchedP2P:
    """How a stage's messages travel: every post is one ``dist.batch_isend_irecv`` on the
    pipeline's process group, so all of a rank's messages go through one communicator (torch's
    NCCL backend runs a batch on the group's communicator, a single isend/irecv on a 2-rank one
    of its own; mixing them, a send on one never meets its receive on the other) and run on its
    stream in the order posted."""

    def __init__(self, group=None):
        self.group = group

    def post(self, ops: list[tuple[P2POp, torch.Tensor]]) -> list:
        return dist.batch_isend_irecv([
            dist.P2POp(dist.isend if op.op == "send" else dist.irecv, tensor, op.peer,
                       self.group) for op, tensor in ops])

    def wait(self, handle: list, ops: list[tuple[P2POp, torch.Tensor]]) -> None:
        for work in handle:
            work.wait()


class ChannelP2P:
    """How a zero-bubble stage's messages travel (module docstring): one 2-rank process group
    per pair of neighbouring stages of every pipeline and per direction, ``F`` to the next
    stage and ``B`` to the previous one. Creating a process group involves every rank, so
    every rank creates all of them, in one order; each rank keeps its own (at most four)."""

    def __init__(self, ctx: ParallelContext):
        layout, self.groups = ctx.layout, {}
        for dp in range(layout.dp):
            for tp in range(layout.tp):
                for stage in range(layout.pp - 1):
                    a, b = layout.rank(dp, stage, tp), layout.rank(dp, stage + 1, tp)
                    for channel in ("F", "B"):
                        group = dist.new_group([a, b])
                        if ctx.rank in (a, b):
                            self.groups[channel, b if ctx.rank == a else a] = group
        for group in self.groups.values():  # in creation order on both ends
            # the group's NCCL communicator is created by a collective of both ranks
            dist.all_reduce(torch.zeros(1, device=ctx.comm_device), group=group)

    def post(self, ops: list[tuple[P2POp, torch.Tensor]], channel: str) -> list:
        (op, tensor), = ops
        group = self.groups[channel, op.peer]
        return dist.batch_isend_irecv([dist.P2POp(dist.isend if op.op == "send" else dist.irecv,
                                                  tensor, op.peer, group)])

    def wait(self, handle: list, ops: list[tuple[P2POp, torch.Tensor]]) -> None:
        for work in handle:
            work.wait()


class P2PStageIO(StageIO):
    """Point-to-point inputs and outputs of one pipeline stage (see the module docstring).

    :meth:`record` starts recording every post and wait (:mod:`chunkflow.plan.messages` events,
    in ``trace``) and the actions they were posted in (``actions``); :meth:`check_recorded`
    replays them under NCCL's rules."""

    def __init__(self, ctx: ParallelContext, *, hidden_size: int, dtype: torch.dtype,
                 shard: SequenceShard | None = None, transport=None, channels: bool = False):
        """``shard``: under sequence parallelism a stage sends its rows of the chunk to the same
        tensor-parallel rank of the next stage. ``channels``: post every message at once on
        its channel (a zero-bubble schedule's, module docstring) instead of batching a send
        with the next receive. ``transport``: how posts travel (default: :class:`ChannelP2P`
        with ``channels``, else :class:`BatchedP2P` on the pipeline group)."""
        self.ctx, self.hidden_size, self.dtype, self.shard = ctx, hidden_size, dtype, shard
        self.channels = channels
        if transport is None and channels and ctx.pp_enabled:
            transport = ChannelP2P(ctx)
        if transport is None:
            group = ctx.pp_group if ctx.pp_enabled else None
            if group is not None:
                # batch_isend_irecv's first call on a group must involve all its ranks (its
                # NCCL communicator is created then); a collective creates it instead.
                dist.all_reduce(torch.zeros(1, device=ctx.comm_device), group=group)
            transport = BatchedP2P(group)
        self.transport = transport
        self._sends: list[tuple[P2POp, torch.Tensor]] = []  # computed, not yet posted
        self._posted: list[tuple[object, list, int]] = []   # posted sends, waited by wait()
        self._num_posts = 0
        self.trace: list | None = None
        self.actions: list[Action] = []
        self._action_idx: int | None = None

    # -- recording ------------------------------------------------------------------------------

    def record(self) -> None:
        """Start a new recording of posts and waits (between steps: nothing is in flight)."""
        if self._sends or self._posted:
            raise RuntimeError("record() between steps only: messages are still in flight")
        self.trace, self.actions, self._num_posts = [], [], 0

    def _post(self, ops: list[tuple[P2POp, torch.Tensor]]):
        channel = None
        if self.channels:  # one op: to the next stage or from the previous one is "F"
            (op, _), = ops
            forward = (op.peer == self.ctx.next_rank) == (op.op == "send")
            channel = "F" if forward else "B"
            handle = self.transport.post(ops, channel)
        else:
            handle = self.transport.post(ops)
        if self.trace is not None:
            self.trace.append(Post(tuple(op for op, _ in ops), action_idx=self._action_idx,
                                   channel=channel))
        self._num_posts += 1
        return handle, self._num_posts - 1

    def _wait(self, handle, ops, post_idx: int) -> None:
        self.transport.wait(handle, ops)
        if self.trace is not None:
            self.trace.append(Wait(post_idx))

    # -- the action protocol ----------------------------------------------------------------------

    @property
    def is_last_stage(self) -> bool:
        return self.ctx.is_last_stage

    def _receives(self, action: Action) -> bool:
        if action.kind in (ActionKind.RECOMPUTE, ActionKind.WEIGHT_BACKWARD):
            return False  # local: from what the stage kept
        if action.kind in (ActionKind.BACKWARD, ActionKind.INPUT_BACKWARD):
            return not self.ctx.is_last_stage
        return not self.ctx.is_first_stage

    def start(self, action: Action) -> None:
        """An action begins: the sends of the previous one go out now, in one post with this
        action's receive if it has one (:meth:`_recv`), else alone (with channels nothing
        is held: every message went out when it was computed)."""
        if self.trace is not None:
            self.actions.append(action)
            self._action_idx = len(self.actions) - 1
        if not self._receives(action):
            self._flush()

    def _flush(self) -> None:
        if self._sends:
            ops, self._sends = self._sends, []
            handle, idx = self._post(ops)
            self._posted.append((handle, ops, idx))

    def _recv(self, chunk: Chunk, src: int, label: str) -> torch.Tensor:
        rows = chunk.num_tokens if self.shard is None else self.shard.rows(chunk.num_tokens)
        buf = torch.empty(1, rows, self.hidden_size, dtype=self.dtype, device=self.ctx.device)
        op = P2POp("recv", src, label, buf.numel() * buf.element_size())
        ops, self._sends = self._sends + [(op, buf)], []
        handle, idx = self._post(ops)
        self._wait(handle, ops, idx)
        return buf

    def _send(self, tensor: torch.Tensor, dst: int, label: str) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        op = P2POp("send", dst, label, tensor.numel() * tensor.element_size())
        self._sends.append((op, tensor))
        if self.channels:
            self._flush()

    def recv_forward(self, chunk: Chunk) -> torch.Tensor | None:
        return (None if self.ctx.is_first_stage
                else self._recv(chunk, self.ctx.prev_rank, f"F{chunk.chunk_id}"))

    def send_forward(self, chunk: Chunk, hidden: torch.Tensor) -> None:
        self._send(hidden, self.ctx.next_rank, f"F{chunk.chunk_id}")

    def recv_backward(self, chunk: Chunk) -> torch.Tensor | None:
        return (None if self.ctx.is_last_stage
                else self._recv(chunk, self.ctx.next_rank, f"B{chunk.chunk_id}"))

    def send_backward(self, chunk: Chunk, grad: torch.Tensor) -> None:
        self._send(grad, self.ctx.prev_rank, f"B{chunk.chunk_id}")

    def wait(self) -> None:
        """End of the step: post the last sends and complete every send (their buffers are
        freed afterwards)."""
        self._flush()
        for handle, ops, idx in self._posted:
            self._wait(handle, ops, idx)
        self._posted.clear()

    def check_recorded(self) -> None:
        """Replay the step's recorded messages of the whole pipeline (every stage of this
        replica, gathered over the pipeline group) under NCCL's rules; raise
        :class:`~chunkflow.plan.ScheduleError` with the stuck ops and the schedule grid if they
        could deadlock. Then start a new recording. Call it on every stage after :meth:`wait`."""
        if self.trace is None or not self.ctx.pp_enabled:
            return
        group = self.ctx.pp_group
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, (self.trace, self.actions), group=group)
        self.record()
        check_messages([t for t, _ in every], schedules=[a for _, a in every],
                       ranks=dist.get_process_group_ranks(group))
