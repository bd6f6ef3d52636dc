"""Every stage of a pipeline run in this one process with the real executor and the real stage
I/O, its posts recorded instead of sent (a receive gets zeros: the order of messages does not
depend on their values), so :mod:`chunkflow.plan.messages` can replay the order the runtime
issues for any schedule, at any pp, without spawning ranks."""

from __future__ import annotations

import torch

from chunkflow.models.families import model_shape
from chunkflow.parallel.pipeline import P2PStageIO, split_stage
from chunkflow.plan import balance_chunks, build_chunks, subplan
from chunkflow.plan.zero_bubble import pipeline_schedule
from chunkflow.plan.messages import check_messages
from chunkflow.runtime import ChunkFlowEngine
from tests.conftest import tiny_model


class RecordingTransport:
    """Posts nothing: receives are filled with zeros, sends dropped."""

    def post(self, ops, channel=None):
        for op, tensor in ops:
            if op.op == "recv":
                tensor.zero_()

    def wait(self, handle, ops):
        pass


class StageContext:
    """The part of :class:`~chunkflow.parallel.ParallelContext` the stage I/O reads: stage
    ``stage`` of a ``pp``-stage pipeline whose first rank is ``base``."""

    def __init__(self, stage: int, pp: int, base: int = 0):
        self.stage, self.pp, self.base = stage, pp, base
        self.rank = base + stage
        self.is_first_stage, self.is_last_stage = stage == 0, stage == pp - 1
        self.prev_rank, self.next_rank = self.rank - 1, self.rank + 1
        self.device = torch.device("cpu")


def batch_of(lengths, vocab: int = 53) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=g)} for n in lengths]


def record_pipeline(lengths, *, pp: int, k: int, chunk_size: int, dp: int = 1,
                    recompute: str = "full", evaluate: bool = True, io_class=None,
                    schedule: str = "1f1b", channels: bool | None = None):
    """Run one training step (and an evaluation) of ``lengths`` on every stage of ``dp``
    replicas of a ``pp``-stage pipeline; return (traces, action lists) per rank, ranks
    ``replica * pp + stage``. ``io_class``: the stage I/O (:class:`P2PStageIO`);
    ``channels``: its posting (default: channels for a zero-bubble ``schedule``, as the
    runtime)."""
    batch = batch_of(lengths)
    plan = build_chunks(list(lengths), chunk_size=chunk_size)
    def stage_model(s: int):
        model = tiny_model(num_hidden_layers=pp, hidden_size=16, intermediate_size=16)
        return split_stage(model, s, pp), model_shape(model.config)

    sharding = balance_chunks(plan, dp, k=k, shape=stage_model(0)[1])
    traces, schedules = [], []
    for replica in range(dp):
        mine = sharding.chunk_ids[replica]
        if mine:
            sub, seq_ids = subplan(plan, mine)
            local = [batch[i] for i in seq_ids]
        else:  # as ParallelEngine: one token with no target keeps the pipeline going
            sub, local = build_chunks([1], chunk_size=chunk_size), batch_of([1])
        stages = pipeline_schedule(sub, pp, k=k, recompute=recompute, schedule=schedule)
        for s in range(pp):
            model, _ = stage_model(s)
            engine = ChunkFlowEngine(model, chunk_size=chunk_size, k=k, recompute=recompute)
            io = (io_class or P2PStageIO)(StageContext(s, pp, replica * pp), hidden_size=16,
                            dtype=torch.float64, transport=RecordingTransport(),
                            channels=(schedule != "1f1b" if channels is None
                                      else channels))
            io.record()
            engine.forward_backward(local, plan=sub, actions=stages[s], io=io)
            io.wait()
            if evaluate:
                engine.evaluate(local, plan=sub, io=io)
                io.wait()
            traces.append(io.trace)
            schedules.append(io.actions)
    return traces, schedules


def check_pipeline(lengths, **kwargs) -> None:
    traces, schedules = record_pipeline(lengths, **kwargs)
    check_messages(traces, schedules=schedules)


_held_send = P2PStageIO._send


def eager_send(self, tensor: torch.Tensor, dst: int, label: str) -> None:
    """Post a send as soon as it is computed (alone)."""
    _held_send(self, tensor, dst, label)
    self._flush()


class EagerStageIO(P2PStageIO):
    """The stage I/O's order before NCCL's rules were considered: every send posted as soon as
    it is computed, every receive alone. gloo runs it; NCCL would hang (see the tests)."""

    _send = eager_send
