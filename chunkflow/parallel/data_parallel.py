"""Data parallelism for chunked steps: DDP and FSDP2, synchronised once per step.

A rank runs its share of the global batch as many backwards (one per chunk, in the order the
schedule gives), and ranks hold different numbers of chunks. So neither wrapper may communicate
per chunk: every collective must be issued the same number of times on every rank.

* **DDP**: its hooks stay idle (its forward, which would arm them, is never called) while
  gradients accumulate in ``.grad``; right before the step's last backward the reducer is armed
  with ``prepare_for_backward``, so that backward all-reduces the accumulated gradients, bucket by
  bucket, overlapped with the backward itself (what ``torch.distributed.pipelining`` does for its
  last micro-batch). A comm hook sums instead of averaging.
* **FSDP2** (``fully_shard`` on every decoder layer and on the rest): parameters are gathered at
  the step's first forward and stay gathered (``reshard_after_forward=False``, no resharding or
  gradient sync after each backward, so later forwards and backwards issue no collective); once
  the last backward ran, the accumulated gradients are reduce-scattered (summed) and parameters
  resharded. At rest (optimizer step, checkpoints) parameters, gradients and AdamW state are
  sharded over the replicas; during a step a replica holds its full stage, like ZeRO-2.
  Under bf16 autocast with float32 weights (``mixed_precision``), FSDP2 gathers bf16 copies
  and reduce-scatters float32 gradients (``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)``, as torchtitan does): the float32 master weights and the optimizer
  state stay sharded, and the gathered stage is half the size. The gradients a step accumulates
  before its one reduce-scatter are float32 (FSDP2 upcasts them to the reduce dtype).

The two private torch hooks this needs live in :mod:`chunkflow.parallel.internals`.

Both sum, and the loss normaliser is already global (``global_counts``, a sum over the replicas
before the first backward), so gradients equal one process running the whole global batch. A
replica with no chunk runs a one-token chunk with no target (zero gradient) so that it takes part
in every collective.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import (FSDPModule, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.nn.parallel import DistributedDataParallel

from chunkflow.models.adapter import ModelAdapter, adapt
from chunkflow.parallel.internals import arm_ddp_for_backward, finish_fsdp_backward
from chunkflow.parallel.mesh import ParallelContext
from chunkflow.runtime.peers import GradSync

DATA_PARALLEL = ("ddp", "fsdp")


def _sum_hook(group, bucket):
    buffer = bucket.buffer()
    fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
    return fut.then(lambda _: buffer)  # summed in place (a fake process group's work has no value)


def _no_forward_buffer_sync() -> dict:
    """DDP's option not to broadcast buffers before every forward (the buffers, RoPE's
    frequencies, are equal on every rank): ``forward_sync_buffers=False`` where torch has it
    (it deprecates ``broadcast_buffers``, with a FutureWarning per rank), else
    ``broadcast_buffers=False`` (torch 2.11, the GPU image's)."""
    import inspect

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def apply_ddp(model: nn.Module, ctx: ParallelContext) -> DistributedDataParallel:
    """Wrap ``model`` (the stage) in DDP over the data-parallel group; gradients are summed."""
    ddp = DistributedDataParallel(model, process_group=ctx.dp_group,
                                  device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                  else None, **_no_forward_buffer_sync())
    ddp.register_comm_hook(ctx.dp_group, _sum_hook)
    return ddp


def apply_fsdp(model: nn.Module, ctx: ParallelContext, *, mixed_precision: bool = False
               ) -> nn.Module:
    """``fully_shard`` every decoder layer, then the rest (embedding, final norm, head) as one
    group (FSDP2's root), over "dp". ``model``: a stage of chunkflow's reference model or of a
    transformers causal LM; returned sharded in place. ``mixed_precision`` (the run is under
    bf16 autocast): float32 weights are gathered as bf16, gradients reduced in float32."""
    adapter = check_fsdp(model)
    dtype = next(model.parameters()).dtype
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision and dtype == torch.float32 else MixedPrecisionPolicy())
    if (not hasattr(FSDPModule, "set_force_sum_reduction_for_comms")
            and dist.get_backend(ctx.dp_group) == "gloo" and dtype != torch.float64):
        # Without it FSDP2 reduce-scatters float32/bf16 gradients with ReduceOp.PREMUL_SUM,
        # which gloo does not implement: every rank would fail in its first step.
        raise ValueError(f"data_parallel='fsdp' on CPU (gloo) in {dtype} needs "
                         f"FSDPModule.set_force_sum_reduction_for_comms, which torch "
                         f"{torch.__version__} lacks; valid: a newer torch, "
                         f"--model.dtype=float64, or --parallel.data_parallel=ddp")
    # Every decoder layer, then the root (embedding, final norm, head), which the engine
    # enters through the adapter's root forward method: it gathers the root's parameters, and
    # they stay gathered for the head's loss.
    mesh = ctx.mesh["dp"]
    for layer in adapter.decoder_layers():
        fully_shard(layer, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    register_fsdp_forward_method(model, adapter.fsdp_root_forward())
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, like the single process's one backward
            # A plain SUM reduce-scatter: for float32/bf16 FSDP2 otherwise expresses the factor
            # as ReduceOp.PREMUL_SUM, which gloo (CPU) does not implement.
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # newer torch releases
                module.set_force_sum_reduction_for_comms(True)
    return model


def check_fsdp(model: nn.Module) -> ModelAdapter:
    """``model``'s adapter; refused, with the reason, where FSDP2 cannot train it exactly under
    chunkflow (LoRA, mixtures of experts: :meth:`ModelAdapter.check_fsdp`)."""
    adapter = adapt(model, what="data_parallel='fsdp'", valid="data_parallel='ddp'")
    adapter.check_fsdp()
    return adapter


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 module of ``model`` (after a forward-only
    pass, which has no backward to reshard them)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class DataParallelSync(GradSync):
    """The engine's hooks for one replica of a stage: global loss normaliser, then one gradient
    synchronisation per step (see the module docstring)."""

    def __init__(self, wrapped: nn.Module | None, ctx: ParallelContext,
                 all_reduce: list[torch.Tensor] | None = None, *,
                 tp_partial: list[torch.Tensor] = ()):
        """``all_reduce``: parameters whose gradients ``finish`` sums over the data-parallel
        group itself (DDP cannot bucket tensor-parallel DTensor gradients, nor wait for an
        expert that got no token on this replica). ``tp_partial``:
        replicated parameters each tensor-parallel rank holds part of the gradient of
        (:func:`chunkflow.parallel.tensor.partial_grad_names`), summed over the "tp" group."""
        self.wrapped, self.ctx, self.all_reduce = wrapped, ctx, all_reduce
        self.tp_partial = list(tp_partial)

    def global_counts(self, num_tokens: int, num_sequences: int) -> tuple[int, int]:
        if not self.ctx.dp_enabled:  # the replica holds the whole global batch
            return num_tokens, num_sequences
        t = torch.tensor([num_tokens, num_sequences], dtype=torch.int64,
                         device=self.ctx.comm_device)
        dist.all_reduce(t, group=self.ctx.dp_group)
        return int(t[0]), int(t[1])

    def start(self) -> None:
        # DDP's all-reduce and the step's own sums add up the whole .grad: gradients left from
        # an earlier call would be counted once per rank again.
        summed = list(self.tp_partial) + list(self.all_reduce or [])
        if isinstance(self.wrapped, DistributedDataParallel):
            summed += [p for p in self.wrapped.parameters() if p.requires_grad]
        held = sum(p.grad is not None for p in summed)
        if held:
            raise ValueError(f"{held} parameter(s) still hold a gradient from an earlier step; "
                             f"on this layout a step sums its gradients over the ranks in "
                             f"place, so earlier ones would be counted again. Valid: clear them "
                             f"first (optimizer.zero_grad(set_to_none=True)), and put more "
                             f"sequences in one global batch instead of accumulating steps")
        if isinstance(self.wrapped, FSDPModule):
            self.wrapped.set_requires_gradient_sync(False)
            self.wrapped.set_reshard_after_backward(False)
            self.wrapped.set_is_last_backward(False)

    def before_backward(self, *, last: bool) -> None:
        if last and isinstance(self.wrapped, DistributedDataParallel):
            # Arms DDP's hooks for this backward only: it all-reduces what .grad accumulated.
            arm_ddp_for_backward(self.wrapped)

    def finish(self) -> None:
        if self.all_reduce:
            _sum_grads(self.all_reduce, self.ctx.dp_group)
        if isinstance(self.wrapped, FSDPModule):
            fsdp = self.wrapped
            fsdp.set_requires_gradient_sync(True)
            fsdp.set_reshard_after_backward(True)
            fsdp.set_is_last_backward(True)
            finish_fsdp_backward(fsdp)  # reduce-scatter the accumulated gradients, reshard
        if self.tp_partial:  # sums commute with the data-parallel ones above
            _sum_grads(self.tp_partial, self.ctx.tp_group)


def _sum_grads(params: list[torch.Tensor], group) -> None:
    """Sum the gradients of ``params`` (their local shards) over ``group``: one all-reduce per
    dtype. Every rank passes the same parameters; a missing gradient counts as zero."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    local = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params)]
    for dtype in sorted({g.dtype for g in local}, key=str):  # the same order on every rank
        same = [g for g in local if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


def _tp_sharded(grad: torch.Tensor) -> bool:
    """Whether ``grad`` is a DTensor sharded over the "tp" mesh dimension."""
    mesh = getattr(grad, "device_mesh", None)
    if mesh is None or "tp" not in (mesh.mesh_dim_names or ()):
        return False
    return grad.placements[mesh.mesh_dim_names.index("tp")].is_shard()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, ctx: ParallelContext, *,
                   sharded: bool) -> float:
    """Clip the gradients of the whole model, spread over stages (and, ``sharded``, over FSDP
    shards) to ``max_norm``; return the total norm before clipping, as
    ``torch.nn.utils.clip_grad_norm_`` does for one process."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    acc = torch.promote_types(local[0].dtype, torch.float32) if local else torch.float64
    # squares of tensor-parallel shards (summed over the tp group) and of the rest (replicated
    # over it: counted once)
    sq = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for g, part in zip(grads, local):
        sq[int(_tp_sharded(g))] += part.detach().to(acc).pow(2).sum().to(torch.float64)
    sq = sq.to(ctx.comm_device)
    if ctx.tp_enabled:
        shards = sq[1:].clone()
        dist.all_reduce(shards, group=ctx.tp_group)
        sq[1] = shards[0]
    sq = sq.sum()
    if sharded and ctx.dp_enabled:
        dist.all_reduce(sq, group=ctx.dp_group)
    if ctx.pp_enabled:
        dist.all_reduce(sq, group=ctx.pp_group)
    norm = math.sqrt(float(sq))
    if math.isfinite(norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        for g in local:
            g.detach().mul_(coef)
    return norm
