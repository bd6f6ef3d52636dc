"""Tensor parallelism of chunkflow's reference model, and of transformers Llama/Qwen2/Qwen3/Mistral
models, over the layout's "tp" mesh dimension, with sequence parallelism.

Megatron's split, written with ``torch.distributed.tensor.parallel``: in every decoder layer the
query/key/value and the MLP's gate/up projections are column-wise parallel (each rank computes
its own heads and its slice of the MLP width), o_proj and down_proj row-wise.

Sequence parallelism (the default, ``sequence_parallel=True``; Korthikanti et al. 2022): outside
those matmuls everything runs on ``1 / tp`` of the chunk's rows. Each rank's embedding output is
its own rows of the chunk, and its norms, residual stream, output head and loss run on them
(the vocabulary-parallel head, :mod:`chunkflow.parallel.vocab`, gathers them); the attention and
MLP modules all-gather their input along the sequence (``PrepareModuleInput``: Shard(1) ->
Replicate) and the row-wise projections reduce-scatter their output back to rows (Shard(1)),
the same traffic as the two all-reduces per layer without it. So the per-token activations that
tensor parallelism alone replicates (hidden states, norms, logits and their gradients) shrink by
tp too. The engine pads a chunk to a multiple of tp (:class:`SequenceShard`, the engine's
:class:`~chunkflow.runtime.chunk_call.ChunkRows` hook); attention leaves the padding rows out,
and they have no target.

Without it, the norms (and, without the vocabulary-parallel split, the embedding, head and
loss) are replicated: each rank runs them on the same full hidden states.

What this means for chunkflow's state: attention sees the rank's own ``H / tp`` query heads and
``G / tp`` key/value heads over the whole chunk, so each rank keeps the chain KV state (and its
gradients) of its own key/value heads only, ``1 / tp`` of the single-process state. ``tp`` must
divide the query heads, the key/value heads and the MLP width; a degree that does not divide the
key/value heads is refused rather than replicating heads (replication would keep ``tp / G``
copies of the state).

Gradients: the sharded parameters hold their shard's gradient (DTensors over the "tp"
dimension). The replicated ones that a rank applies to part of the work hold a partial sum,
which the step sums over the group once, after its last backward (``DataParallelSync.finish``):
:func:`partial_grad_names` names them: Qwen3's per-head q/k norms (a rank normalises its own
heads), and under sequence parallelism every replicated parameter (a rank's rows). Without
sequence parallelism the column-wise layers' input gradient is all-reduced in backward, so the
other replicated parameters get the full gradient on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from chunkflow.models.adapter import ModelAdapter, adapt
from chunkflow.parallel.mesh import ParallelContext
from chunkflow.runtime.chunk_call import ChunkRows
from chunkflow.runtime.loss import IGNORE_INDEX

LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel,
    "self_attn.k_proj": ColwiseParallel,
    "self_attn.v_proj": ColwiseParallel,
    "self_attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}


def layer_plan(*, sequence_parallel: bool, attention_kwargs: bool) -> dict:
    """The ``parallelize_module`` plan of one decoder layer. With sequence parallelism the layer's
    input and output are its rows of the chunk (Shard(1)): attention and the MLP gather their
    input whole (a DTensor, so that the projections' input gradients, partial sums, are
    reduce-scattered back to rows), and o_proj/down_proj reduce-scatter their output."""
    plan = {name: style() for name, style in LAYER_PLAN.items()}
    if not sequence_parallel:
        return plan
    rows, whole = Shard(1), Replicate()
    plan["self_attn.o_proj"] = RowwiseParallel(output_layouts=rows)
    plan["mlp.down_proj"] = RowwiseParallel(output_layouts=rows)
    # transformers' layers call attention with hidden_states=...; chunkflow's with (x, cos, sin,
    # attention) (ModelAdapter.attention_kwargs); both call the MLP with the hidden states alone.
    plan["self_attn"] = (
        PrepareModuleInput(input_kwarg_layouts={"hidden_states": rows},
                           desired_input_kwarg_layouts={"hidden_states": whole})
        if attention_kwargs else
        PrepareModuleInput(input_layouts=(rows, None, None, None),
                           desired_input_layouts=(whole, None, None, None)))
    plan["mlp"] = PrepareModuleInput(input_layouts=(rows,), desired_input_layouts=(whole,))
    return plan


def check_tp(config, tp: int) -> None:
    """Refuse a degree that does not split the model's heads and MLP evenly, with the reason."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % tp:
            why = (" (each rank keeps the KV state of its own key/value heads; replicating "
                   "heads would keep several copies of the state)"
                   if name == "num_key_value_heads" else "")
            raise ValueError(f"--parallel.tp={tp} does not divide the model's {name}={value}"
                             f"{why}; valid: a tp that divides {name}")


def tp_adapter(model: nn.Module) -> ModelAdapter:
    """``model``'s adapter, refused where tensor parallelism does not apply: chunkflow's
    reference model (a stage of it) or a transformers causal LM of a family whose projections
    have the names of :data:`LAYER_PLAN`."""
    adapter = adapt(model, what="tensor parallelism", valid="--parallel.tp=1")
    adapter.check_tp()
    return adapter


PER_HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
"""Qwen3's RMSNorm over each head's query/key: replicated weights that a rank applies to its own
heads only, so each rank's gradient is a partial sum over its heads."""


def partial_grad_names(model: nn.Module, *, sequence_parallel: bool) -> list[str]:
    """Names of the replicated parameters of a tensor-parallel ``model`` (after
    :func:`apply_tp`) whose gradient each rank holds only a part of: the step sums them over the
    "tp" group once, after its last backward. Names, since FSDP2 replaces parameters after."""
    if sequence_parallel:  # every rank runs them on its own rows
        return [name for name, p in model.named_parameters()
                if p.requires_grad and not hasattr(p, "device_mesh")]
    prefix = {id(layer): name for name, layer in model.named_modules()}
    out = []
    for layer in tp_adapter(model).decoder_layers():
        for name in PER_HEAD_NORMS:
            try:
                module = layer.get_submodule(name)
            except AttributeError:  # a family without per-head norms
                continue
            out.extend(f"{prefix[id(layer)]}.{name}.{n}" for n, p in module.named_parameters()
                       if p.requires_grad)
    return out


def apply_tp(model: nn.Module, ctx: ParallelContext, *, sequence_parallel: bool = True
             ) -> nn.Module:
    """Shard ``model`` (a stage of chunkflow's reference model, or a transformers causal LM)
    over ``ctx``'s "tp" group, from outside: the model code is unchanged (transformers'
    attention infers its local head count from the projection's output, ``view(..., -1,
    head_dim)``). With ``sequence_parallel`` the engine must run it on each rank's rows
    (``ChunkFlowEngine(sequence_shard=...)``)."""
    adapter = tp_adapter(model)
    check_tp(model.config, ctx.tp)
    for layer in adapter.decoder_layers():
        parallelize_module(layer, ctx.mesh["tp"], layer_plan(
            sequence_parallel=sequence_parallel, attention_kwargs=adapter.attention_kwargs))
    return model


@dataclass(frozen=True)
class SequenceShard(ChunkRows):
    """Rows ``[rank * rows(L), (rank + 1) * rows(L))`` of a chunk of ``L`` tokens padded to
    ``size * rows(L)``: this rank's part of the residual stream under sequence parallelism."""

    rank: int
    size: int
    vocab_parallel: bool = False
    """The embedding and head are split by vocabulary over the group: the embedding takes the
    whole chunk's ids (it reduce-scatters its output to rows) and the loss the whole chunk's
    targets (it gathers the rows first)."""

    def rows(self, num_tokens: int) -> int:
        """Rows each rank holds of a chunk of ``num_tokens`` tokens (the last may be padding)."""
        return -(-num_tokens // self.size)

    def local(self, t: torch.Tensor, fill) -> torch.Tensor:
        """This rank's rows of ``t`` (L, ...) (dim 0), padded with ``fill`` past the end."""
        rows = self.rows(t.shape[0])
        return self.padded(t, fill)[self.rank * rows:(self.rank + 1) * rows]

    def padded(self, t: torch.Tensor, fill) -> torch.Tensor:
        """``t`` (L, ...) padded with ``fill`` to the ``size * rows(L)`` rows of the gathered
        chunk."""
        pad = self.rows(t.shape[0]) * self.size - t.shape[0]
        return t if not pad else torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])

    # ---- the ChunkRows hook: what the engine asks -------------------------------------------

    def input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the ids, padded; a vocabulary-parallel embedding takes all of
        the padded rows (it hands back this rank's)."""
        return self.padded(ids, 0) if self.vocab_parallel else self.local(ids, 0)

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The whole padded chunk's: attention runs over all of it."""
        return self.padded(positions, 0)

    def loss_rows(self, targets: torch.Tensor, weights: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole chunk's (vocabulary parallel: the loss gathers the rows first), else this
        rank's rows: a part of the chunk's loss."""
        if self.vocab_parallel:
            return self.padded(targets, IGNORE_INDEX), self.padded(weights, 0)
        return self.local(targets, IGNORE_INDEX), self.local(weights, 0)
