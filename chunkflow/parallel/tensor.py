"""Tensor parallelism of chunkflow's reference model over the layout's "tp" mesh dimension.

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


def apply_tp(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Shard ``model`` (a stage of chunkflow's reference model) over ``ctx``'s "tp" group."""
    if not hasattr(model, "hidden_states"):
        raise ValueError(f"tensor parallelism runs chunkflow's reference model, got "
                         f"{type(model).__name__}; valid: --model.implementation=reference "
                         f"(Llama/Qwen2 checkpoints), or --parallel.tp=1")
    check_tp(model.config, ctx.tp)
    mesh = ctx.mesh["tp"]
    for layer in model.model.layers.values():
        parallelize_module(layer, mesh, {name: style() for name, style in LAYER_PLAN.items()})
    return model
