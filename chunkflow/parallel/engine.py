"""One training step on a (dp x pp x tp) layout: the global batch's chunks over replicas and
stages (one process is the 1x1x1 layout, whose collectives are the identity).

:class:`ParallelEngine` wraps :class:`chunkflow.runtime.ChunkFlowEngine` for one rank:

1. every rank builds the chunk plan of the whole global batch (the same plan a single process
   would build, so chunking is identical);
2. :func:`chunkflow.plan.balance_chunks` hands whole units (a chain with all its chunks, or a
   standalone chunk) to the ``dp`` replicas, balancing the cost model's FLOPs, which count the
   attention over chain prefixes; each replica runs its :func:`~chunkflow.plan.subplan`;
3. with ``pp`` stages, a replica runs its subplan's :func:`~chunkflow.plan.state_aware_1f1b`
   lists, this rank the list of its stage; with one stage, the single-device schedule;
4. gradients are summed over replicas once per step (:mod:`chunkflow.parallel.data_parallel`).

Loss and gradients equal one process training on the whole global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chunkflow.parallel.data_parallel import DataParallelSync, clip_grad_norm, reshard
from chunkflow.parallel.mesh import LocalContext, ParallelContext
from chunkflow.parallel.parallelize import parallelize
from chunkflow.parallel.pipeline import P2PStageIO
from chunkflow.plan import (
    ChunkPlan,
    Sharding,
    balance_chunks,
    build_chunks,
    schedule,
    subplan,
)
from chunkflow.plan.zero_bubble import check_schedule_name, pipeline_schedule
from chunkflow.models import families
from chunkflow.runtime.engine import ChunkFlowEngine, EvalResult, StepResult
from chunkflow.runtime.options import ChunkingOptions
from chunkflow.runtime.loss import IGNORE_INDEX


@dataclass(frozen=True)
class PreparedStep:
    """What a step's lengths alone decide (:meth:`ParallelEngine.prepare`): the global plan,
    its sharding, this replica's subplan, sequences and chunk ids, and this rank's actions."""

    seq_lens: tuple[int, ...]
    plan: ChunkPlan
    sharding: Sharding
    sub: ChunkPlan
    seq_ids: tuple[int, ...] | None
    """The replica's sequences (None: it got no unit and runs one empty token)."""
    chunk_ids: tuple[int, ...]
    actions: tuple


@dataclass
class ParallelStepResult:
    loss: float
    """The global batch's loss (summed over every replica's last stage)."""
    num_loss_tokens: int
    num_tokens: int
    """Tokens of the whole global batch."""
    peak_memory_bytes: int
    """The largest peak over all ranks."""
    plan: ChunkPlan
    """The global batch's plan."""
    sharding: Sharding
    local: StepResult
    """This rank's own step: its subplan, chunks, tokens and peak memory."""

    @property
    def imbalance(self) -> float:
        """max / mean of the replicas' estimated cost (1.0 = perfect)."""
        return self.sharding.imbalance


class ParallelEngine:
    """This rank's part of chunkflow training on ``ctx``'s (dp x pp x tp) layout (a
    :class:`~chunkflow.parallel.LocalContext` for one process).

    ``model``: the whole model, identical on every rank (same seed or checkpoint), made this
    rank's part in place by :func:`~chunkflow.parallel.parallelize` (pipeline stage; tensor
    parallel, with sequence parallelism unless ``sequence_parallel=False`` and a
    vocabulary-parallel embedding and head unless ``vocab_parallel=False``; DDP or FSDP2 as
    ``data_parallel`` says). Build the optimizer over :attr:`parameters` afterwards.
    """

    def __init__(self, model: nn.Module, ctx: ParallelContext | LocalContext,
                 options: ChunkingOptions | None = None, *, data_parallel: str = "ddp",
                 sequence_parallel: bool = True, vocab_parallel: bool = True,
                 mixed_precision: bool = False, schedule: str = "1f1b", **kwargs):
        """``options``: a :class:`~chunkflow.runtime.options.ChunkingOptions`, or its fields as
        keyword arguments. ``mixed_precision``: steps run under bf16 autocast (FSDP2 then
        gathers bf16 copies of float32 weights). ``schedule``: the pipeline schedule,
        ``1f1b`` (state-aware 1F1B) or a zero-bubble one, ``zb-h1``/``zb-h2``
        (:mod:`chunkflow.plan.zero_bubble`; only with pp > 1, where there are bubbles)."""
        if options is None:
            options = ChunkingOptions(**kwargs)
        elif kwargs:
            raise TypeError(f"ParallelEngine takes options or keyword arguments, not both "
                            f"(got {sorted(kwargs)})")
        self.schedule = check_schedule_name(schedule)
        if schedule != "1f1b":
            _check_zero_bubble(schedule, ctx, options, data_parallel)
        self.ctx, self.data_parallel = ctx, data_parallel
        self.shape = families.model_shape(model.config)
        parts = parallelize(model, ctx, data_parallel=data_parallel,
                            sequence_parallel=sequence_parallel, vocab_parallel=vocab_parallel,
                            mixed_precision=mixed_precision)
        model, shard = parts.model, parts.sequence_shard
        self.model, self.wrapped, self.sequence_shard = model, parts.wrapped, shard
        self.loss_replicated = parts.loss_replicated
        self.engine = ChunkFlowEngine(model, options, sequence_shard=shard,
                                      loss_fn=parts.loss_fn)
        self.sync = DataParallelSync(parts.wrapped, ctx, parts.all_reduce,
                                     tp_partial=parts.tp_partial)
        param = next(iter(model.parameters()))
        self.io = P2PStageIO(ctx, hidden_size=model.config.hidden_size, dtype=param.dtype,
                             shard=shard, channels=schedule != "1f1b")
        if ctx.pp_enabled and os.environ.get("CHUNKFLOW_CHECK_MESSAGES", "0") == "1":
            self.io.record()  # every step's messages replayed under NCCL's rules

    @property
    def chunk_size(self) -> int:
        return self.engine.options.chunk_size

    @property
    def k(self) -> int:
        return self.engine.options.k

    @property
    def state_module(self) -> nn.Module:
        """What a checkpoint's state dicts are taken from: the DDP wrapper, else the stage
        (FSDP2 shards it in place; parameter names are the whole model's either way)."""
        return self.wrapped if isinstance(self.wrapped, DistributedDataParallel) \
            else self.model

    def parameters(self) -> list[torch.Tensor]:
        """This rank's trainable parameters (FSDP: its shards)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def shard(self, seq_lens: list[int]) -> tuple[ChunkPlan, Sharding]:
        """The global batch's plan and its units' placement on the replicas."""
        plan = build_chunks(seq_lens, chunk_size=self.chunk_size,
                            pack_chain_tails=self.engine.options.pack_chain_tails)
        return plan, balance_chunks(plan, self.ctx.dp, k=self.k, shape=self.shape)

    def prepare(self, seq_lens: list[int], *, training: bool = True) -> PreparedStep:
        """Everything a step of a global batch with these sequence lengths needs before its
        data: the chunk plan, the replicas' shares, this rank's action list (a zero-bubble
        schedule's takes a simulation to build). Pure host work, safe in a background thread
        while another step trains (the trainer's ``--data.prefetch``)."""
        plan, sharding = self.shard(list(seq_lens))
        mine = sharding.chunk_ids[self.ctx.dp_rank]
        if mine:
            sub, seq_ids = subplan(plan, mine)
            chunk_ids, seq_ids = tuple(sorted(mine)), tuple(seq_ids)
        else:  # fewer units than replicas: one token with no target keeps the collectives going
            sub, seq_ids, chunk_ids = build_chunks([1], chunk_size=self.chunk_size), None, (
                plan.num_chunks,)
        actions = ()
        if training:
            recompute = self.engine.options.recompute
            actions = tuple(schedule(sub, k=self.k, recompute=recompute)
                            if not self.ctx.pp_enabled
                            else pipeline_schedule(sub, self.ctx.pp, k=self.k,
                                                   recompute=recompute,
                                                   schedule=self.schedule)[self.ctx.stage])
        return PreparedStep(tuple(seq_lens), plan, sharding, sub, seq_ids, chunk_ids, actions)

    def _local(self, batch: list[dict], prepared: PreparedStep | None = None, *,
               training: bool = True) -> tuple[PreparedStep, list[dict]]:
        """The step's :class:`PreparedStep` (``prepared`` if it is this batch's) and this
        replica's sequences."""
        lengths = tuple(len(item["input_ids"]) for item in batch)
        if prepared is None or prepared.seq_lens != lengths or (training and not prepared.actions):
            prepared = self.prepare(list(lengths), training=training)
        if prepared.seq_ids is None:
            return prepared, [{"input_ids": torch.zeros(1, dtype=torch.long),
                               "labels": torch.full((1,), IGNORE_INDEX)}]
        return prepared, [batch[i] for i in prepared.seq_ids]

    def evaluate(self, batch: list[dict]) -> EvalResult:
        """Forward-only loss of the global ``batch`` (the same list on every rank): each
        replica runs its units through the pipeline; the sums are those of the whole batch."""
        prepared, local_batch = self._local(batch, training=False)
        plan = prepared.plan
        try:
            local = self.engine.evaluate(local_batch, plan=prepared.sub, io=self.io)
            self.io.wait()
            self.io.check_recorded()
        except RuntimeError as e:
            raise RuntimeError(f"rank {self.ctx.rank} (replica {self.ctx.dp_rank}, stage "
                               f"{self.ctx.stage}) failed in an evaluation: {e}") from e
        if self.data_parallel == "fsdp" and self.ctx.dp_enabled:
            reshard(self.model)
        # Only last stages hold a loss; each supervised token is counted on one rank (the
        # tensor-parallel ranks of a stage hold the same, replicated loss, the first counts;
        # under sequence parallelism with a replicated head each holds its rows' part).
        last = self.ctx.is_last_stage
        first = last and self.ctx.tp_rank == 0
        loss_sum, num_loss_tokens = self.ctx.all_sum(
            [local.loss_sum if first or (last and not self.loss_replicated) else 0.0,
             float(local.num_loss_tokens) if first else 0.0])
        return EvalResult(loss_sum=loss_sum, num_loss_tokens=int(num_loss_tokens),
                          num_tokens=plan.num_tokens, num_chunks=plan.num_chunks)

    def forward_backward(self, batch: list[dict], *,
                         prepared: PreparedStep | None = None) -> ParallelStepResult:
        """Forward and backward of this rank's share of the global ``batch`` (a list of dicts
        with ``input_ids`` and optional ``labels``, the same list on every rank).
        ``prepared``: :meth:`prepare` of its lengths, done ahead (else done here)."""
        prepared, local_batch = self._local(batch, prepared)
        plan, sharding = prepared.plan, prepared.sharding
        self.sync.start()
        try:
            local = self.engine.forward_backward(
                local_batch, plan=prepared.sub, actions=list(prepared.actions), io=self.io,
                sync=self.sync, chunk_ids=list(prepared.chunk_ids))
            self.io.wait()
            self.io.check_recorded()
        except RuntimeError as e:  # say which rank; a peer's failure shows up here as a
            # closed connection, a silent peer as a timeout (parallel.timeout_s)
            raise RuntimeError(f"rank {self.ctx.rank} (replica {self.ctx.dp_rank}, stage "
                               f"{self.ctx.stage}) failed in a training step: {e}") from e
        # replicated over tp, or (sequence parallel, replicated head) each rank's rows' part
        mine = float(local.loss) if self.ctx.tp_rank == 0 or not self.loss_replicated else 0.0
        # Only last stages hold a loss; every replica's share adds up. The peak is the largest.
        loss, = self.ctx.all_sum([mine])
        peak = self.ctx.all_max(local.peak_memory_bytes)
        return ParallelStepResult(loss=loss, num_loss_tokens=local.num_loss_tokens,
                                  num_tokens=plan.num_tokens, peak_memory_bytes=peak,
                                  plan=plan, sharding=sharding, local=local)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip this step's gradients of the whole model; return the norm before clipping."""
        return clip_grad_norm(self.parameters(), max_norm, self.ctx,
                              sharded=self.data_parallel == "fsdp" and self.ctx.dp_enabled)


def _check_zero_bubble(name: str, ctx, options: ChunkingOptions, data_parallel: str) -> None:
    """Refuse the layouts a zero-bubble schedule cannot run exactly, with the reason."""
    if not ctx.pp_enabled:
        raise ValueError(f"--parallel.schedule={name} with pp=1: one stage has no bubbles to "
                         f"fill. Valid: 1f1b, or pp > 1")
    if options.compile:
        raise ValueError(f"--parallel.schedule={name} with --train.compile: a compiled layer's "
                         f"backward is one autograd node, which computes its input and weight "
                         f"gradients together, so the input pass (I) and the weight pass (W) "
                         f"cannot run apart (torch's own zero-bubble schedules refuse compiled "
                         f"stages too). Valid: --parallel.schedule=1f1b, or "
                         f"--train.compile=false")
    if options.activation_checkpointing:
        raise ValueError(f"--parallel.schedule={name} with activation checkpointing: the "
                         f"weight pass (W) would recompute every layer a second time. Valid: "
                         f"--parallel.schedule=1f1b, or --chunking.activation_checkpointing="
                         f"false")
    if data_parallel == "fsdp" and ctx.dp_enabled:
        raise ValueError(f"--parallel.schedule={name} with FSDP: FSDP2 reduces a layer's "
                         f"gradients when its backward reaches the layer's input, which the "
                         f"input pass (I) does before the weight pass (W) computes them. "
                         f"Valid: --parallel.data_parallel=ddp, or --parallel.schedule=1f1b")

