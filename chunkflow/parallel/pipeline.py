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
and at the end of the step). A zero-bubble ``W`` sends and receives nothing, and must not
change those batches (nor delay an ``I``'s input gradient by its own time): at its start the
held sends go out at once, in one batch with the receive of the next action that is not a
``W`` (posted early, waited for by that action), so the posts are those of state-aware 1F1B
whatever ``W`` sit between them
and at the end of the step). :mod:`chunkflow.plan.messages` replays the recorded order under
NCCL's rules; the tests run it over every schedule the runtime produces.
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


class P2PStageIO(StageIO):
    """Point-to-point inputs and outputs of one pipeline stage (see the module docstring).

    :meth:`record` starts recording every post and wait (:mod:`chunkflow.plan.messages` events,
    in ``trace``) and the actions they were posted in (``actions``); :meth:`check_recorded`
    replays them under NCCL's rules."""

    def __init__(self, ctx: ParallelContext, *, hidden_size: int, dtype: torch.dtype,
                 shard: SequenceShard | None = None, transport=None):
        """``shard``: under sequence parallelism a stage sends its rows of the chunk to the same
        tensor-parallel rank of the next stage. ``transport``: how posts travel
        (:class:`BatchedP2P` on the pipeline group by default)."""
        self.ctx, self.hidden_size, self.dtype, self.shard = ctx, hidden_size, dtype, shard
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
        self._upcoming: list[Action] = []  # this step's actions, for a W's look-ahead
        self._plan = None
        self._position = 0
        self._preposted: tuple | None = None  # (label, buf, handle, ops, post index)

    # -- recording ------------------------------------------------------------------------------

    def record(self) -> None:
        """Start a new recording of posts and waits (between steps: nothing is in flight)."""
        if self._sends or self._posted:
            raise RuntimeError("record() between steps only: messages are still in flight")
        self.trace, self.actions, self._num_posts = [], [], 0

    def _post(self, ops: list[tuple[P2POp, torch.Tensor]]):
        handle = self.transport.post(ops)
        if self.trace is not None:
            self.trace.append(Post(tuple(op for op, _ in ops), action_idx=self._action_idx))
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

    def begin(self, actions, plan) -> None:
        self._upcoming, self._plan, self._position = list(actions), plan, 0

    def start(self, action: Action) -> None:
        """An action begins: the sends of the previous one go out now, in one post with this
        action's receive if it has one (:meth:`_recv`), else alone; a ``W`` posts them with
        the receive of the next action that is not a ``W`` (module docstring)."""
        if self.trace is not None:
            self.actions.append(action)
            self._action_idx = len(self.actions) - 1
        position, self._position = self._position, self._position + 1
        if action.kind is ActionKind.WEIGHT_BACKWARD and self._sends:
            later = (a for a in self._upcoming[position + 1:]
                     if a.kind is not ActionKind.WEIGHT_BACKWARD)
            after = next(later, None)
            if after is not None and self._receives(after):
                self._prepost(after)
                return
        if not self._receives(action):
            self._flush()

    def _source(self, action: Action) -> tuple[int, str]:
        """The rank ``action`` receives from and the label of what it receives."""
        if action.kind in (ActionKind.BACKWARD, ActionKind.INPUT_BACKWARD):
            return self.ctx.next_rank, f"B{action.chunk_id}"
        return self.ctx.prev_rank, f"F{action.chunk_id}"

    def _prepost(self, action: Action) -> None:
        """Post the held sends with ``action``'s receive now; ``action`` waits for it."""
        src, label = self._source(action)
        buf, op = self._recv_buffer(self._plan.chunks[action.chunk_id], src, label)
        ops, self._sends = self._sends + [(op, buf)], []
        handle, idx = self._post(ops)
        self._preposted = (label, buf, handle, ops, idx)

    def _flush(self) -> None:
        if self._sends:
            ops, self._sends = self._sends, []
            handle, idx = self._post(ops)
            self._posted.append((handle, ops, idx))

    def _recv_buffer(self, chunk: Chunk, src: int, label: str) -> tuple[torch.Tensor, P2POp]:
        rows = chunk.num_tokens if self.shard is None else self.shard.rows(chunk.num_tokens)
        buf = torch.empty(1, rows, self.hidden_size, dtype=self.dtype, device=self.ctx.device)
        return buf, P2POp("recv", src, label, buf.numel() * buf.element_size())

    def _recv(self, chunk: Chunk, src: int, label: str) -> torch.Tensor:
        if self._preposted is not None:
            posted, buf, handle, ops, idx = self._preposted
            assert posted == label, f"{label} received, but {posted} was posted"
            self._preposted = None
            self._wait(handle, ops, idx)
            return buf
        buf, op = self._recv_buffer(chunk, src, label)
        ops, self._sends = self._sends + [(op, buf)], []
        handle, idx = self._post(ops)
        self._wait(handle, ops, idx)
        return buf

    def _send(self, tensor: torch.Tensor, dst: int, label: str) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        op = P2POp("send", dst, label, tensor.numel() * tensor.element_size())
        self._sends.append((op, tensor))

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
