"""The trainer's one path to its checkpoints: :class:`CheckpointIO` saves and restores a run's
model and optimizer on every layout, one process (:class:`chunkflow.parallel.LocalContext`,
1x1x1) included, so a checkpoint resumes on another layout (DP=2 -> TP=2, PP=2 -> one process).

What goes where in a checkpoint directory:

* ``model.safetensors`` (or one file per pipeline stage and ``model.safetensors.index.json``):
  the weights in the model's dtype, by parameter name; LoRA runs save their adapter instead, one
  file for all stages (:mod:`chunkflow.train.lora`);
* ``master_weights/``: the weights as held, where training holds them wider than it saves them
  (float32 masters of a bfloat16 model); a resumed run loads these;
* ``optimizer/``: the optimizer state, every rank's shards, resharded on load;
* RNG and trainer state, the manifest, atomic publication: :mod:`.store`.

The collective state-dict work is :mod:`chunkflow.parallel.checkpoint`'s. Checkpoints from before
``optimizer/`` (``optimizer.pt``, ``optimizer-0000s-of-0000p.pt``) still resume, on the layout
that wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chunkflow.parallel.checkpoint import (
    MASTER_DIR,
    OPTIMIZER_DIR,
    full_weights,
    gather_stages,
    load_master_weights,
    load_optimizer,
    load_weights,
    read_weights,
    save_master_weights,
    save_optimizer,
    weight_names,
)
from chunkflow.train.checkpoint.store import (
    describe_layout,
    save_distributed_checkpoint,
    stage_weights_file,
    verify_distributed_checkpoint,
    write_stage_index,
)
from chunkflow.train.checkpoint.export import ModelFiles

ONE_PROCESS = {"dp": 1, "pp": 1, "tp": 1, "data_parallel": "none"}
"""The layout of checkpoints that record none (one process)."""


def layout_of(ctx, data_parallel: str) -> dict[str, Any]:
    """What a checkpoint records of the layout that wrote it."""
    return {"dp": ctx.dp, "pp": ctx.pp, "tp": ctx.tp,
            "data_parallel": data_parallel if ctx.dp_enabled else "none"}


class CheckpointIO:
    """Writes and restores this rank's part of a run's checkpoints (collective calls)."""

    def __init__(self, ctx, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 files: ModelFiles, *, layout: dict[str, Any]):
        """``module``: what holds this rank's parameters under their whole-model names (the
        model, or its DDP/FSDP wrapper)."""
        self.ctx, self.module, self.optimizer, self.files = ctx, module, optimizer, files
        self.layout = layout
        self.tied = bool(getattr(files.model.config, "tie_word_embeddings", False))

    def save(self, run_dir: Path, *, step: int, state: dict[str, Any], merged: bool,
             keep_last: int, needed_bytes: int) -> tuple[Path, list[str]]:
        ctx, files = self.ctx, self.files
        one = ctx.world_size == 1
        # Collective over each stage's tensor-parallel and FSDP groups, so on every rank.
        model_state = None if one or files.lora else files.cast(
            full_weights(self.module, tied=self.tied))
        writer = ctx.dp_rank == 0 and ctx.tp_rank == 0  # one copy of each stage's weights
        adapter = None
        if files.lora and ctx.pp_enabled and writer:  # the stages' adapters, on the first stage
            from chunkflow.train.lora import adapter_state

            parts = gather_stages(adapter_state(files.model), ctx)
            adapter = None if parts is None else {k: v for p in parts for k, v in p.items()}

        def write_shard(tmp: Path) -> list[str]:
            # First the collective part: a failure there is raised on every rank at once.
            names = save_optimizer(self.module, self.optimizer, tmp / OPTIMIZER_DIR,
                                   rank=ctx.rank)
            if files.masters:
                names += save_master_weights(self.module, tmp / MASTER_DIR, rank=ctx.rank)
            if one or not writer:
                return names
            if files.lora:
                from chunkflow.train.lora import save_adapter

                if not ctx.pp_enabled:
                    return names + save_adapter(files.model, tmp)
                # one adapter file for the whole model (PEFT loads it), and each stage's shard
                # of the merged model
                if ctx.stage == 0:
                    names += save_adapter(files.model, tmp, state=adapter)
                if merged:
                    names += files.write_merged_stage(tmp, ctx.stage, ctx.pp)
                return names
            from safetensors.torch import save_file

            weights = stage_weights_file(ctx.stage, ctx.pp)
            save_file(model_state, str(tmp / weights), metadata={"format": "pt"})
            return names + [weights]

        def write_main(tmp: Path) -> None:
            if one:  # the model's own Hugging Face export (shared tensors once)
                files.write(tmp, merged=merged)
                return
            if ctx.pp_enabled and not files.lora:
                write_stage_index(tmp, ctx.pp)
            files.write_extras(tmp, merged=merged, num_stages=ctx.pp)

        return save_distributed_checkpoint(
            run_dir, step=step, ctx=ctx, write_shard=write_shard, write_main=write_main,
            trainer_state=dict(state, layout=self.layout), keep_last=keep_last,
            needed_bytes=needed_bytes)

    def load(self, path: Path, *, log=print) -> dict[str, Any]:
        """Restore weights (or adapter), optimizer and RNG states from ``path``, whatever layout
        saved it; returns its trainer state."""
        ctx = self.ctx
        # One process: prepare_run_dir checksummed it already.
        state = verify_distributed_checkpoint(path, ctx=ctx, hashes=ctx.world_size > 1)
        saved = state.get("layout") or ONE_PROCESS
        saved = dict(saved, tp=saved.get("tp", 1))
        optimizer_dir = path / OPTIMIZER_DIR
        if not optimizer_dir.is_dir() and saved != self.layout:
            raise ValueError(f"checkpoint {str(path)!r} was saved with {describe_layout(saved)} "
                             f"by a chunkflow from before resharded checkpoints; this run is "
                             f"{describe_layout(self.layout)}; valid: resume it on the layout "
                             f"that saved it")
        if self.files.lora:
            self.files.load(path, stage=ctx.pp_enabled)
        elif self.files.masters and (path / MASTER_DIR).is_dir():
            load_master_weights(self.module, path / MASTER_DIR)
        else:
            names = weight_names(self.module)
            load_weights(self.module, read_weights(path, names, tied=self.tied))
        if optimizer_dir.is_dir():
            load_optimizer(self.module, self.optimizer, optimizer_dir)
        else:
            self._load_legacy_optimizer(path)
        if saved != self.layout:
            log(f"note: resuming {path.name}, saved with {describe_layout(saved)}, on "
                f"{describe_layout(self.layout)}: weights and optimizer state resharded")
        return state

    def _load_legacy_optimizer(self, path: Path) -> None:
        """``optimizer.pt`` (one process: by position; a stage: by name, full tensors)."""
        ctx = self.ctx
        name = ("optimizer.pt" if not ctx.pp_enabled else
                f"optimizer-{ctx.stage + 1:05d}-of-{ctx.pp:05d}.pt")
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {str(path)!r} is incomplete: no {OPTIMIZER_DIR}/ and "
                             f"no {name}")
        saved = torch.load(file, map_location=ctx.device if ctx.world_size == 1 else "cpu",
                           weights_only=True)
        if ctx.world_size == 1:
            self.optimizer.load_state_dict(saved)
        else:
            from chunkflow.parallel.checkpoint import load_full_optimizer

            load_full_optimizer(self.module, self.optimizer, saved)
