"""Checkpoint state of one pipeline stage under data parallelism, and the collectives around it.

Whatever wraps the stage (nothing, DDP, FSDP2), the state goes through
``torch.distributed.checkpoint.state_dict`` as *full* tensors keyed by the whole model's
parameter names: the same names a single process uses, so each stage's weights are a shard of
one Hugging Face checkpoint, and the optimizer state is keyed by name, not by position.
Gathering the full state is collective over the data-parallel group; the replica with
``dp_rank == 0`` writes it (see :mod:`chunkflow.train.checkpoint`).
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from chunkflow.parallel.engine import ParallelEngine

_FULL = StateDictOptions(full_state_dict=True)


def _module(engine: ParallelEngine) -> torch.nn.Module:
    return engine.wrapped if engine.wrapped is not None else engine.model


def stage_state(engine: ParallelEngine, optimizer: torch.optim.Optimizer, *, weights: bool = True
                ) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Full model and optimizer state of this rank's stage (collective over its replicas).
    ``weights=False``: the optimizer state only (LoRA runs save their adapter themselves)."""
    module = _module(engine)
    model_state = None
    if weights:
        model_state = {k: v.detach().cpu().contiguous()
                       for k, v in get_model_state_dict(module, options=_FULL).items()}
        if engine.model.config.tie_word_embeddings:
            model_state.pop("lm_head.weight", None)  # stored once, as Hugging Face does
    optim_state = get_optimizer_state_dict(module, optimizer, options=_FULL)
    return model_state, optim_state


def load_stage_state(engine: ParallelEngine, optimizer: torch.optim.Optimizer,
                     model_state: dict[str, torch.Tensor] | None, optim_state: dict | None
                     ) -> None:
    """Inverse of :func:`stage_state` (every rank passes the full state it read)."""
    module = _module(engine)
    if model_state is None:
        if optim_state is not None:
            set_optimizer_state_dict(module, optimizer, optim_state, options=_FULL)
        return
    expected = set(get_model_state_dict(module, options=_FULL))
    if engine.model.config.tie_word_embeddings and "lm_head.weight" in expected:
        model_state = dict(model_state, **{"lm_head.weight": model_state.get(
            "model.embed_tokens.weight")})
    missing, unexpected = expected - set(model_state), set(model_state) - expected
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not match this stage's model: missing "
                         f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    set_model_state_dict(module, model_state, options=_FULL)
    if optim_state is not None:
        set_optimizer_state_dict(module, optimizer, optim_state, options=_FULL)
