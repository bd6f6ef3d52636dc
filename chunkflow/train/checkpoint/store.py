"""Checkpoints: one directory per saved step, written atomically, verified before use, loaded
without pickled code.

Layout of ``<run_dir>/step-00000100/`` (what the model files are is :mod:`chunkflow.train.checkpoint.export`'s
business: ``model.safetensors`` + ``config.json``, or a LoRA adapter, plus the tokenizer and
``generation_config.json``, so the directory is a Hugging Face model directory too):

* ``optimizer/``        the optimizer state, a ``torch.distributed.checkpoint`` directory with
                          one file per rank, keyed by parameter name, resharded for whatever
                          layout resumes it (tensors load ``weights_only``; the ``.metadata``
                          pickle is checked to hold only checkpoint records first);
* ``rng.pt``             torch CPU (and CUDA) generator states, also tensors only;
* ``trainer_state.json`` step, data position, data counters, Python RNG state, run counters;
* ``manifest.json``      every other file's size and SHA-256, written last.

Invariants:

- A directory named ``step-*`` is always complete: it is written under a temporary name and
  renamed in one ``os.rename``; a SIGKILL at any moment leaves at most a ``.step-*.tmp-*``
  directory behind, which the next run removes.
- A checkpoint is used only after :func:`checkpoint_problem` found every file of its manifest
  with the recorded size and checksum (a truncated or corrupted one is named and skipped).
- A run never loses a saved checkpoint: older ones are deleted only beyond ``keep_last``, after
  the new one is in place, and checkpoints newer than the step a run resumed from are moved to
  ``superseded/`` (never deleted, never overwritten) before the run saves over their steps.
- No space left on the device is one :class:`CheckpointSpaceError` naming the directory and the
  bytes needed; the partial checkpoint is removed and the older ones are untouched.
- Files get the usual permissions (0666 and 0777 less the umask), not mkdtemp's private 0700.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from chunkflow.plan.units import format_bytes
from chunkflow.train import CheckpointSpaceError

_NAME = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".step-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
SUPERSEDED = "superseded"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories in ``run_dir`` (complete by construction), oldest first."""
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


# -- verification ----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of ``names`` under ``root`` (default: every file)."""
    if names is None:
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return {n: {"bytes": (root / n).stat().st_size, "sha256": _sha256(root / n)} for n in names}


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``path/trainer_state.json``; a CheckpointError-style ValueError names the file."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {str(path)!r} is incomplete or not a chunkflow checkpoint: "
                         f"missing {TRAINER_STATE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable ({type(e).__name__}: {e}); the checkpoint is "
                         f"corrupt") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{file}: not a chunkflow trainer state (no integer 'step')")
    return state


def checkpoint_problem(path: Path, *, hashes: bool = True,
                       files: list[str] | None = None) -> str | None:
    """Why ``path`` cannot be resumed from (missing, truncated or corrupt files), or None.

    Every file in ``manifest.json`` (or only ``files`` of it) must have its recorded size and,
    with ``hashes``, its SHA-256. Checkpoints from before manifests existed get the structural
    checks only."""
    if not path.is_dir():
        return f"{path} is not a directory"
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())["files"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            return f"{manifest}: unreadable ({type(e).__name__}: {e})"
        for name, want in sorted(recorded.items()):
            if files is not None and name not in files:
                continue
            file = path / name
            if not file.is_file():
                return f"{file} is missing"
            size = file.stat().st_size
            if size != want["bytes"]:
                return f"{file} has {size} bytes, the manifest says {want['bytes']} (truncated?)"
            if hashes and _sha256(file) != want["sha256"]:
                return f"{file} does not match its SHA-256 in {MANIFEST} (corrupted)"
    elif not any(path.glob("*.safetensors")):
        return f"{path} holds no weights (*.safetensors) and no {MANIFEST}"
    try:
        read_trainer_state(path)
    except ValueError as e:
        return str(e)
    return None


def verify_checkpoint(path: Path, *, hashes: bool = True) -> dict[str, Any]:
    """Raise ValueError naming the problem unless ``path`` is complete; return its trainer state."""
    problem = checkpoint_problem(path, hashes=hashes)
    if problem is not None:
        raise ValueError(f"checkpoint {str(path)!r} cannot be used: {problem}; valid: a complete "
                         f"step-* directory of a chunkflow run")
    return read_trainer_state(path)


# -- saving ------------------------------------------------------------------------------------


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_files(tmp: Path) -> None:
    """Usual permissions (mkdtemp makes 0700), then every file durable before the rename."""
    mask = _umask()
    for p in [tmp, *tmp.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


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


def write_run_state(tmp: Path, trainer_state: dict[str, Any],
                    entries: dict[str, dict[str, Any]] | None = None) -> None:
    """RNG states and trainer state, then the manifest of everything in ``tmp`` (``entries``:
    files already checksummed by the ranks that wrote them)."""
    torch.save(_rng_states(), tmp / "rng.pt")
    state = dict(trainer_state, python_rng=_encode_py_rng(random.getstate()))
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    entries = dict(entries or {})
    rest = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                  if p.is_file() and p.relative_to(tmp).as_posix() not in entries)
    entries.update(file_entries(tmp, rest))
    (tmp / MANIFEST).write_text(json.dumps({"format": 1, "files": dict(sorted(entries.items()))},
                                           indent=1))


def set_aside_newer(run_dir: Path, step: int) -> list[Path]:
    """Move checkpoints at ``step`` or later (a history this run is replacing, e.g. after a
    resume from an older step or past a corrupt newest one) into ``superseded/``; never
    deletes. Returns their new paths."""
    moved = []
    for s, path in list_checkpoints(run_dir):
        if s < step:
            continue
        target_dir = run_dir / SUPERSEDED
        target_dir.mkdir(exist_ok=True)
        target, n = target_dir / path.name, 1
        while target.exists():
            target, n = target_dir / f"{path.name}.{n}", n + 1
        os.rename(path, target)
        moved.append(target)
    return moved


def _publish(tmp: Path, final: Path) -> list[str]:
    """Make the complete temporary directory ``tmp`` the checkpoint ``final``, durably; newer
    checkpoints of a replaced history are set aside first (only once ``tmp`` is complete).
    Returns a note per checkpoint set aside."""
    _finish_files(tmp)
    moved = set_aside_newer(final.parent, int(final.name[len("step-"):]))
    if final.exists():  # never replace a saved checkpoint (set_aside_newer moved any away)
        raise ValueError(f"checkpoint {str(final)!r} already exists; it is left as it is")
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    return [f"moved {m.name} (a later step of the history this run replaces) to {m}; it is "
            f"kept, not deleted" for m in moved]


def _prune(run_dir: Path, final: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints; a note for one that cannot be."""
    notes = []
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        if old == final:
            continue
        # Renamed first, so a kill during the deletion leaves a temporary directory (removed
        # at the next start), never an incomplete step-* directory.
        doomed = run_dir / f"{_TMP_PREFIX}{old.name[len('step-'):]}.deleted"
        try:
            os.rename(old, doomed)
        except OSError as e:
            notes.append(f"could not delete the old checkpoint {old} ({e}); it is left as it is")
            continue
        shutil.rmtree(doomed, ignore_errors=True)
    return notes


def is_disk_full(e: BaseException, run_dir: Path | None = None, needed_bytes: int = 0) -> bool:
    """Whether a failed write ran out of space: an ENOSPC/EDQUOT in the exception's chain; or,
    when the chain holds no OS error at all (torch.save and safetensors report a full disk as a
    bare RuntimeError), less free space in ``run_dir`` than the checkpoint needs."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e.errno in _DISK_FULL  # any other OS error (permissions, ...) is itself
        e = e.__cause__ or e.__context__
    return (run_dir is not None and run_dir.is_dir()
            and shutil.disk_usage(run_dir).free < needed_bytes)


def space_error(run_dir: Path, step: int, needed_bytes: int, *, keep_last: int | None = None
                ) -> CheckpointSpaceError:
    """The one-line report of a checkpoint that did not fit on the device. Lowering
    ``keep_last`` is advised only where older checkpoints are kept beside the newest."""
    free = shutil.disk_usage(run_dir).free if run_dir.is_dir() else 0
    older = list_checkpoints(run_dir)
    kept = (f"the newest saved checkpoint, {older[-1][1].name}, is intact" if older
            else "no checkpoint had been saved yet")
    fewer = (", lower --checkpoint.keep_last" if keep_last is None or (
        keep_last > 1 and len(older) > 1) else "")
    return CheckpointSpaceError(
        f"no space left on the device for checkpoint {checkpoint_name(step)} in "
        f"{run_dir.resolve()}: it needs about {format_bytes(needed_bytes)} and "
        f"{format_bytes(free)} are free. The partial checkpoint was removed and {kept}; free "
        f"space (or raise --checkpoint.interval{fewer}), then continue "
        f"with: chunkflow train --train.output_dir {run_dir.resolve()} --resume")



def restore_torch_rng(path: Path) -> None:
    """Restore the torch RNG states (CPU, and CUDA where there is one) saved in ``path``."""
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def restore_python_rng(state: dict[str, Any]) -> None:
    random.setstate(_decode_py_rng(state["python_rng"]))


# -- every layout ------------------------------------------------------------------------------
# One directory, as above, written by every rank of a layout (one process is the 1x1x1 layout):
# each rank writes its shards of the optimizer state into ``optimizer/`` (torch.distributed.
# checkpoint, see chunkflow.parallel.checkpoint); the first replica's first tensor-parallel rank of
# each pipeline stage writes the stage's full weights (a shard of a Hugging Face checkpoint:
# model-0000s-of-0000p.safetensors plus model.safetensors.index.json when pp > 1); every rank
# checksums what it wrote; rank 0 writes the rest and publishes the directory. ``ctx`` is a
# chunkflow.parallel.ParallelContext (or its one-process stand-in, LocalContext).


def describe_layout(layout: dict[str, Any]) -> str:
    text = f"dp={layout['dp']} x pp={layout['pp']} x tp={layout.get('tp', 1)}"
    return text + (f", data_parallel={layout['data_parallel']}" if layout["dp"] > 1 else "")


def stage_weights_file(stage: int, num_stages: int) -> str:
    """The weights file of one pipeline stage."""
    if num_stages == 1:
        return "model.safetensors"
    return f"model-{stage + 1:05d}-of-{num_stages:05d}.safetensors"


def save_distributed_checkpoint(run_dir: Path, *, step: int, ctx,
                                write_shard: Callable[[Path], list[str]] | None,
                                write_main: Callable[[Path], None], trainer_state: dict[str, Any],
                                keep_last: int, needed_bytes: int) -> tuple[Path, list[str]]:
    """Collective. ``write_shard(tmp)`` (None on ranks that write nothing) writes this rank's
    files and returns their names; rank 0 then runs ``write_main(tmp)`` and publishes. A failure
    on any rank (a full disk included) is raised on every rank, and the partial directory is
    removed. Returns the checkpoint and notes for the user: newer checkpoints set aside (see
    :func:`set_aside_newer`), an old one that could not be deleted."""
    final = run_dir / checkpoint_name(step)

    def attempt(fn) -> tuple[Any, str | None, bool]:
        try:
            return fn(), None, False
        except Exception as e:  # reported on every rank below
            return (None, f"rank {ctx.rank}: {type(e).__name__}: {e}",
                    is_disk_full(e, run_dir, needed_bytes))

    def fail(errors: list[tuple[str, bool]], tmp: Path | None):
        if ctx.rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        ctx.barrier()
        if any(full for _, full in errors):
            raise space_error(run_dir, step, needed_bytes, keep_last=keep_last)
        raise RuntimeError(f"checkpoint {checkpoint_name(step)} was not saved: "
                           + "; ".join(e for e, _ in errors))

    made = attempt(lambda: tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}.tmp-",
                                            dir=run_dir)) if ctx.rank == 0 else None
    tmp, error, full = ctx.broadcast_object(made)
    if error:
        fail([(error, full)], None)
    tmp = Path(tmp)
    entries, error, full = attempt(lambda: file_entries(tmp, write_shard(tmp))
                                   if write_shard is not None else {})
    outcomes = ctx.all_gather_object((entries, error, full))
    notes: list[str] = []
    if ctx.rank == 0 and not any(e for _, e, _ in outcomes):
        merged = {k: v for entries, _, _ in outcomes for k, v in (entries or {}).items()}

        def main():
            write_main(tmp)
            write_run_state(tmp, dict(trainer_state, step=step), merged)
            notes.extend(_publish(tmp, final))

        _, error, full = attempt(main)
        outcomes.append((None, error, full))
    outcomes = ctx.broadcast_object(outcomes if ctx.rank == 0 else None)
    errors = [(e, f) for _, e, f in outcomes if e]
    if errors:
        fail(errors, tmp)
    if ctx.rank == 0:
        notes += _prune(run_dir, final, keep_last)
    return final, notes


def verify_distributed_checkpoint(path: Path, *, ctx, hashes: bool = True) -> dict[str, Any]:
    """Collective: every rank checks its share of the manifest's files (sizes, and with
    ``hashes`` checksums, in parallel; rank 0 chose the checkpoint by sizes); the trainer state.
    Restores the RNGs."""
    state = read_trainer_state(path)
    manifest = path / MANIFEST
    names = sorted(json.loads(manifest.read_text())["files"]) if manifest.is_file() else []
    mine = names[ctx.rank::ctx.world_size]
    problem = (checkpoint_problem(path, files=mine, hashes=hashes)
               if mine or ctx.rank == 0 else None)
    problems = [p for p in ctx.all_gather_object(problem) if p]
    if problems:
        raise ValueError(f"checkpoint {str(path)!r} cannot be used: {'; '.join(problems)}")
    restore_torch_rng(path)
    restore_python_rng(state)
    return state


def write_stage_index(tmp: Path, num_stages: int) -> None:
    """model.safetensors.index.json, so the stage shards load as one Hugging Face model."""
    from safetensors import safe_open

    weight_map = {}
    for stage in range(num_stages):
        name = stage_weights_file(stage, num_stages)
        with safe_open(str(tmp / name), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), name))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _encode_py_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_py_rng(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
