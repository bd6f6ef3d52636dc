"""``parallelize(model, ctx)``: a whole model becomes this rank's part of a (dp x pp x tp) layout,
from outside the model code (torchtitan's manner).

In order, each step in place on the same module, parameter names kept the whole model's:

1. ``pp > 1``: :func:`~chunkflow.parallel.pipeline.split_stage` keeps this rank's stage;
2. ``tp > 1``: :func:`~chunkflow.parallel.tensor.apply_tp` shards its decoder layers over "tp"
   (with sequence parallelism by default), and
   :func:`~chunkflow.parallel.vocab.apply_vocab_parallel` its embedding and head by vocabulary
   (by default);
3. ``dp > 1``: :func:`~chunkflow.parallel.data_parallel.apply_fsdp` (FSDP2 over "dp") or
   :func:`~chunkflow.parallel.data_parallel.apply_ddp`; under TP, and for mixtures of experts,
   DDP gives way to one all-reduce of the gradients after the step (DDP's buckets cannot hold
   DTensor gradients, nor wait for an expert a replica routed no token to).

One process is the 1x1x1 layout: the model comes back as it was.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from torch import nn

from chunkflow.models.adapter import adapt
from chunkflow.parallel.data_parallel import DATA_PARALLEL, apply_ddp, apply_fsdp
from chunkflow.parallel.mesh import LocalContext, ParallelContext
from chunkflow.parallel.pipeline import split_stage
from chunkflow.parallel.tensor import SequenceShard, apply_tp, partial_grad_names
from chunkflow.parallel.vocab import apply_vocab_parallel, vocab_parallel_head_loss


@dataclass
class Parallelized:
    """What :func:`parallelize` made of a model on this rank."""

    model: nn.Module
    """This rank's stage, sharded in place (what the engine runs)."""
    wrapped: nn.Module | None = None
    """The DDP wrapper, or the FSDP2 root (``model`` itself); None without data parallelism or
    when the gradients are summed by ``all_reduce`` instead."""
    all_reduce: list[nn.Parameter] | None = None
    """Parameters whose gradients the step sums over "dp" with one all-reduce (no DDP)."""
    tp_partial: list[nn.Parameter] = field(default_factory=list)
    """Replicated parameters each TP rank holds part of the gradient of, summed over "tp"."""
    sequence_shard: SequenceShard | None = None
    """Under sequence parallelism, the rows of each chunk this rank runs."""
    loss_fn: object = None
    """A chunk's loss (``ChunkFlowEngine(loss_fn=...)``): the vocabulary-parallel one, or None
    for :func:`chunkflow.runtime.head_loss.head_loss`."""
    loss_replicated: bool = True
    """Whether every TP rank holds the chunk's whole loss (else each its rows' part)."""


def parallelize(model: nn.Module, ctx: ParallelContext | LocalContext, *,
                data_parallel: str = "ddp", sequence_parallel: bool = True,
                vocab_parallel: bool = True, mixed_precision: bool = False) -> Parallelized:
    """``model`` (chunkflow's reference model or a transformers causal LM, identical on every
    rank) as this rank's part of ``ctx``'s layout (see the module docstring).
    ``mixed_precision``: the step runs under bf16 autocast (FSDP2 gathers bf16 weights)."""
    if data_parallel not in DATA_PARALLEL:
        raise ValueError(f"data_parallel={data_parallel!r}; valid: {', '.join(DATA_PARALLEL)}")
    if ctx.pp_enabled:
        model = split_stage(model, ctx.stage, ctx.pp)
    # every rank raises (a stage alone would leave the others waiting for it)
    if ctx.all_max(int(not any(p.requires_grad for p in model.parameters()))):
        where = "a pipeline stage holds" if ctx.pp_enabled else "the model has"
        raise ValueError(f"{where} no trainable parameter (e.g. LoRA adapters only in layers "
                         f"of other stages); valid: --lora.target_modules or "
                         f"--lora.modules_to_save that reach every stage's layers, or fewer "
                         f"stages (--parallel.pp)")
    out = Parallelized(model)
    partial = []
    if ctx.tp_enabled:
        apply_tp(model, ctx, sequence_parallel=sequence_parallel)
        if vocab_parallel:
            apply_vocab_parallel(model, ctx, sequence_parallel=sequence_parallel)
            out.loss_fn = functools.partial(vocab_parallel_head_loss, ctx=ctx,
                                            sequence_parallel=sequence_parallel)
        partial = partial_grad_names(model, sequence_parallel=sequence_parallel)
        if sequence_parallel:
            out.sequence_shard = SequenceShard(ctx.tp_rank, ctx.tp, vocab_parallel)
        out.loss_replicated = vocab_parallel or not sequence_parallel
    if ctx.dp_enabled and data_parallel == "fsdp":
        out.wrapped = apply_fsdp(model, ctx, mixed_precision=mixed_precision)
    elif ctx.dp_enabled and not ctx.tp_enabled and not _experts(model):
        out.wrapped = apply_ddp(model, ctx)
    elif ctx.dp_enabled:
        out.all_reduce = [p for p in model.parameters() if p.requires_grad]
    out.tp_partial = [model.get_parameter(name) for name in partial]  # FSDP2 replaced them
    return out


def _experts(model: nn.Module) -> bool:
    return adapt(model, what="data parallelism", valid="one process").experts
