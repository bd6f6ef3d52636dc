"""Tensor parallelism of chunkflow's reference model, and of transformers Llama/Qwen2/Qwen3/Mistral
models, over the layout's "tp" mesh dimension.

Megatron's split, written with ``torch.distributed.tensor.parallel``: in every decoder layer the
query/key/value and the MLP's gate/up projections are column-wise parallel (each rank computes
its own heads and its slice of the MLP width), o_proj and down_proj row-wise (their outputs are
summed over the group). Everything else (embedding, norms, output head, loss) is replicated:
each rank runs it on the same full hidden states, so the loss, the chunk plan and the schedule
are the same on every rank of a group.

What this means for chunkflow's state: attention sees the rank's own ``H / tp`` query heads and
``G / tp`` key/value heads, so each rank keeps the chain KV state (and its gradients) of its own
key/value heads only, ``1 / tp`` of the single-process state. ``tp`` must divide the query heads,
the key/value heads and the MLP width; a degree that does not divide the key/value heads is
refused rather than replicating heads (replication would keep ``tp / G`` copies of the state).

Qwen3's per-head q/k norms are replicated, but each rank applies them to its own heads only, so
its gradient of their weights is a partial sum: :func:`partial_grad_params` names them and the
step sums them over the group once (``DataParallelSync.finish``).

Gradients: the column-wise layers' input gradient is a partial sum that the plan all-reduces in
backward, so the replicated parameters get the full gradient on every rank, identical across the
group; the sharded ones hold their shard's gradient (DTensors over the "tp" dimension).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from chunkflow.parallel.mesh import ParallelContext

LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel,
    "self_attn.k_proj": ColwiseParallel,
    "self_attn.v_proj": ColwiseParallel,
    "self_attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}


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


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of chunkflow's reference model (a stage of it) or of a transformers
    causal LM (Llama, Qwen2, Qwen3, Mistral: the same projection names)."""
    if hasattr(model, "hidden_states"):  # chunkflow's reference model
        return list(model.model.layers.values())
    from chunkflow.models.hf import is_hf_model

    if not is_hf_model(model):
        raise ValueError(f"tensor parallelism runs chunkflow's reference model or a "
                         f"transformers causal LM, got {type(model).__name__}; valid: "
                         f"--parallel.tp=1")
    if hasattr(model, "peft_config"):
        raise ValueError("tensor parallelism with LoRA is not supported (PEFT wraps the "
                         "projections the plan shards); valid: --parallel.tp=1, data "
                         "parallel (ddp) for LoRA")
    check_parallel_family(model.config, "tensor parallelism", "--parallel.tp=1")
    return list(model.get_decoder().layers)


def check_parallel_family(config, what: str, valid: str) -> None:
    """Refuse TP or PP for a transformers family whose modules chunkflow's plans do not fit."""
    from chunkflow.models.families import FAMILIES

    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is not None and not family.parallel:
        raise ValueError(f"{what} for model_type {config.model_type!r} is not supported "
                         f"({family.note}); valid: {valid}, data parallel (ddp)")


PER_HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
"""Qwen3's RMSNorm over each head's query/key: replicated weights that a rank applies to its own
heads only, so each rank's gradient is a partial sum over its heads."""


def partial_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters whose gradient each tensor-parallel rank holds only a part of (the
    per-head q/k norms): the step sums them over the "tp" group once, after its last backward."""
    out = []
    for layer in decoder_layers(model):
        for name in PER_HEAD_NORMS:
            try:
                module = layer.get_submodule(name)
            except AttributeError:  # a family without per-head norms
                continue
            out.extend(p for p in module.parameters() if p.requires_grad)
    return out


def apply_tp(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Shard ``model`` (a stage of chunkflow's reference model, or a transformers causal LM)
    over ``ctx``'s "tp" group, from outside: the model code is unchanged (transformers'
    attention infers its local head count from the projection's output, ``view(..., -1,
    head_dim)``)."""
    layers = decoder_layers(model)
    check_tp(model.config, ctx.tp)
    mesh = ctx.mesh["tp"]
    for layer in layers:
        parallelize_module(layer, mesh, {name: style() for name, style in LAYER_PLAN.items()})
    return model
