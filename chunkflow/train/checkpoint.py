"""Checkpoints: one directory per saved step, written atomically, loaded without pickled code.

Layout of ``<run_dir>/step-00000100/``:

* ``model.safetensors``  the weights (shared tensors such as tied embeddings stored once);
* ``config.json``        the model configuration in Hugging Face format, so the directory also
                          loads with ``AutoModelForCausalLM.from_pretrained``;
* ``optimizer.pt``       the optimizer's state dict: tensors and numbers only, so it loads with
                          ``torch.load(weights_only=True)``;
* ``rng.pt``             torch CPU (and CUDA) generator states, also tensors only;
* ``trainer_state.json`` step, data position, data counters, Python RNG state, run counters.

Invariants: a directory named ``step-*`` is always complete, because it is written under a
temporary name and renamed in one ``os.rename``; a SIGKILL at any moment leaves at most a
``.step-*.tmp-*`` directory behind, which the next run removes. Older checkpoints are deleted
only after the new one is in place, and the newest is never deleted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

_NAME = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".step-"
FILES = ("model.safetensors", "config.json", "optimizer.pt", "rng.pt", "trainer_state.json")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete temporary directories a killed run left behind; return what was removed."""
    stale = [p for p in run_dir.glob(f"{_TMP_PREFIX}*") if p.is_dir()] if run_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def save_checkpoint(run_dir: Path, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``."""
    final = run_dir / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}.tmp-", dir=run_dir))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _complete(tmp, final, model=model, trainer_state=dict(trainer_state, step=step),
              keep_last=keep_last)
    return final


def _complete(tmp: Path, final: Path, *, model: torch.nn.Module, trainer_state: dict[str, Any],
              keep_last: int) -> None:
    """Add config, RNG and trainer state to ``tmp``, publish it as ``final``, prune old ones."""
    try:
        (tmp / "config.json").write_text(_hf_config_json(model))
        torch.save(_rng_states(), tmp / "rng.pt")
        state = dict(trainer_state, python_rng=_encode_py_rng(random.getstate()))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(final.parent, final, keep_last)


def _publish(tmp: Path, final: Path) -> None:
    """Make the complete temporary directory ``tmp`` the checkpoint ``final``, durably."""
    for f in tmp.iterdir():  # durable before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # never replace a saved checkpoint; the trainer never asks to
        raise ValueError(f"checkpoint {str(final)!r} already exists; it is left as it is")
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _prune(run_dir: Path, final: Path, keep_last: int) -> None:
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            # Renamed first, so a kill during the deletion leaves a temporary directory (removed
            # at the next start), never an incomplete step-* directory.
            doomed = run_dir / f"{_TMP_PREFIX}{old.name[len('step-'):]}.deleted"
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(path: Path, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore weights (and optimizer and RNG states) from ``path``; return the trainer state."""
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a directory; checkpoints are the "
                         f"step-* directories inside a run's output_dir")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is incomplete or not a chunkflow "
                         f"checkpoint: missing {', '.join(missing)}")
    layout = json.loads((path / "trainer_state.json").read_text()).get("layout")
    if layout is not None:
        raise ValueError(f"checkpoint {str(path)!r} was saved by a distributed run "
                         f"({_describe_layout(layout)}); valid: resume it on that layout")
    device = next(model.parameters()).device
    try:
        missing_keys, unexpected = load_model(model, str(path / "model.safetensors"),
                                              strict=False, device=str(device))
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: {e}") from None
    if missing_keys or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match the model: missing "
                         f"{sorted(missing_keys)}, unexpected {sorted(unexpected)}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device,
                                             weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
    state = json.loads((path / "trainer_state.json").read_text())
    if optimizer is not None:
        random.setstate(_decode_py_rng(state["python_rng"]))
    return state


# -- distributed runs ---------------------------------------------------------------------------
# One directory, as above, written by several ranks: the first replica of each pipeline stage
# writes its stage's weights (a shard of a Hugging Face checkpoint: model-0000s-of-0000p.safetensors
# plus model.safetensors.index.json when pp > 1) and its optimizer state; rank 0 writes the rest
# and publishes the directory. ``ctx`` is a chunkflow.parallel.ParallelContext.


def _describe_layout(layout: dict[str, Any]) -> str:
    return (f"dp={layout['dp']} x pp={layout['pp']}, data_parallel="
            f"{layout['data_parallel']}")


def stage_files(stage: int, num_stages: int) -> tuple[str, str]:
    """(weights, optimizer) file names of one pipeline stage."""
    if num_stages == 1:
        return "model.safetensors", "optimizer.pt"
    part = f"{stage + 1:05d}-of-{num_stages:05d}"
    return f"model-{part}.safetensors", f"optimizer-{part}.pt"


def save_distributed_checkpoint(run_dir: Path, *, step: int, ctx, layout: dict[str, Any],
                                model: torch.nn.Module, model_state: dict[str, torch.Tensor],
                                optim_state: dict, trainer_state: dict[str, Any],
                                keep_last: int) -> Path:
    """Collective: every rank calls it with its stage's full state (see above)."""
    from safetensors.torch import save_file

    final = run_dir / checkpoint_name(step)
    tmp = None
    if ctx.rank == 0:
        tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}.tmp-", dir=run_dir)
    tmp = Path(ctx.broadcast_object(tmp))
    if ctx.dp_rank == 0:
        weights, optim = stage_files(ctx.stage, ctx.pp)
        save_file(model_state, str(tmp / weights), metadata={"format": "pt"})
        torch.save(optim_state, tmp / optim)
    ctx.barrier()
    if ctx.rank == 0:
        if ctx.pp > 1:
            _write_index(tmp, ctx.pp)
        _complete(tmp, final, model=model, keep_last=keep_last,
                  trainer_state=dict(trainer_state, step=step, layout=layout))
    ctx.barrier()
    return final


def _write_index(tmp: Path, num_stages: int) -> None:
    """model.safetensors.index.json, so the stage shards load as one Hugging Face model."""
    from safetensors import safe_open

    weight_map = {}
    for stage in range(num_stages):
        name = stage_files(stage, num_stages)[0]
        with safe_open(str(tmp / name), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), name))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_distributed_checkpoint(path: Path, *, ctx, layout: dict[str, Any]
                                ) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """This rank's stage weights and optimizer state, and the trainer state; restores RNGs."""
    from safetensors.torch import load_file

    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"checkpoint {str(path)!r} is incomplete or not a chunkflow checkpoint: "
                         f"missing trainer_state.json")
    state = json.loads((path / "trainer_state.json").read_text())
    saved = state.get("layout") or {"dp": 1, "pp": 1, "data_parallel": "none (one process)"}
    if saved != layout:
        raise ValueError(f"checkpoint {str(path)!r} was saved with {_describe_layout(saved)}; "
                         f"this run is {_describe_layout(layout)}; valid: resume on the layout "
                         f"that saved it")
    weights, optim = stage_files(ctx.stage, ctx.pp)
    missing = [f for f in (weights, optim, "rng.pt") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: missing {', '.join(missing)}")
    model_state = load_file(str(path / weights))
    optim_state = torch.load(path / optim, weights_only=True)
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    random.setstate(_decode_py_rng(state["python_rng"]))
    return model_state, optim_state, state


def _hf_config_json(model: torch.nn.Module) -> str:
    """config.json in Hugging Face's format, so a checkpoint directory is also a model directory
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    from chunkflow.models.config import ModelConfig
    from chunkflow.models.hf_checkpoint import config_to_hf

    config = model.config
    if isinstance(config, ModelConfig):  # the reference model; else a transformers config

        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return json.dumps(config_to_hf(config, dtype=dtype), indent=2)
    return config.to_json_string()


def _encode_py_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_py_rng(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
