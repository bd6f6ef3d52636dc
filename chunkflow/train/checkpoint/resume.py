"""Where a run lives, and what resuming it may change.

``prepare_run_dir`` picks the run directory (a dated default), cleans what a killed run left
behind and finds the checkpoint to continue: with ``--resume`` the newest checkpoint that
verifies (a truncated or corrupt newer one is skipped with a warning that names it), with
``--checkpoint.resume_from`` the one given, which may be an older step of the same run. It
creates nothing for a start that is refused, and :meth:`RunDir.remove_if_unused` removes a
directory this start created when the run fails before its first step.

The run holds its directory's lock (:mod:`chunkflow.train.run.lock`) from here to its end: a second
run on the directory is refused before it touches anything. ``--resume=auto`` resumes when the
directory holds a checkpoint and starts the run otherwise (one command for a job that may be
requeued).

``check_resumed_config`` refuses a resume that would be a different run (model, data, seed,
layout, adapters) and lists the settings that did change.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from chunkflow.train.checkpoint.store import (
    checkpoint_problem,
    list_checkpoints,
    read_trainer_state,
    remove_partial_checkpoints,
    verify_checkpoint,
)
from chunkflow.train.config import PATH_FIELDS, TrainConfig, absolute_path_option
from chunkflow.train.run.lock import RunLock


@dataclass
class RunDir:
    path: Path
    resume_from: Path | None
    created: bool
    """This start made the directory (so a failed start may remove it again)."""
    warnings: list[str] = field(default_factory=list)
    newer: bool = False
    """Checkpoints past the one resumed from exist: this run replaces their history."""
    lock: RunLock | None = None
    """The directory's lock, held by rank 0 until the run ends (:meth:`release`)."""
    notes: list[str] = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def remove_if_unused(self) -> None:
        """After a failed start: remove the directory if this start created it and no step was
        logged or saved in it."""
        metrics = self.path / "metrics.jsonl"
        if (self.created and self.path.is_dir() and not list_checkpoints(self.path)
                and not (metrics.is_file() and metrics.read_text().strip())):
            shutil.rmtree(self.path, ignore_errors=True)


def prepare_run_dir(config: TrainConfig, *, hashes: bool = True) -> RunDir:
    """The run directory and the checkpoint to resume from, if any (see the module docstring).

    ``hashes=False`` checks checkpoint sizes only (a distributed run checksums each rank's files
    on that rank, in parallel, when it loads them)."""
    output_dir = config.train.output_dir
    if output_dir is None:
        if config.checkpoint.resume:
            raise ValueError("--resume needs --train.output_dir: the run directory to continue")
        output_dir = str(Path(f"runs/train-{datetime.datetime.now():%Y%m%d-%H%M%S}").absolute())
        config.train.output_dir = output_dir
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--train.output_dir={output_dir!r} is a file; valid: a directory")
    lock = RunLock(run_dir).acquire() if run_dir.is_dir() else None
    try:
        run = _prepare(config, run_dir, hashes=hashes, lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if lock is not None and lock.warning:
        run.warnings.insert(0, lock.warning)
    return run


def _prepare(config: TrainConfig, run_dir: Path, *, hashes: bool,
             lock: RunLock | None) -> RunDir:
    output_dir = str(run_dir)
    existing = list_checkpoints(run_dir)
    resume, notes = config.checkpoint.resume, []
    if resume == "auto":
        resume = bool(existing) and config.checkpoint.resume_from is None
        notes.append(f"--resume=auto: {'resuming' if resume else 'starting'} ("
                     + (f"{existing[-1][1].name} is the newest checkpoint in {output_dir}"
                        if existing else f"no checkpoint in {output_dir}") + ")")
    resume_from, warnings, newer = None, [], []
    if config.checkpoint.resume_from is not None:
        resume_from = Path(config.checkpoint.resume_from)
        if resume:
            raise ValueError(f"both --resume and --checkpoint.resume_from={str(resume_from)!r}; "
                             f"valid: one of them")
        verify_checkpoint(resume_from, hashes=hashes)
        # (A checkpoint this run set aside in superseded/ is another history: it continues
        # in a new output directory.)
        same_run = resume_from.resolve().parent == run_dir.resolve()
        if existing and not same_run:
            raise ValueError(f"--checkpoint.resume_from={str(resume_from)!r} into "
                             f"{str(run_dir)!r}, which holds checkpoints of another history "
                             f"(newest {existing[-1][1].name}); valid: a new --train.output_dir, "
                             f"a checkpoint of this run, or --resume to continue the newest one")
        step = read_trainer_state(resume_from)["step"]
        newer = [p.name for s, p in existing if s > step]
        if newer:
            warnings.append(f"resuming {run_dir} from its step {step}: the newer checkpoints "
                            f"{', '.join(newer)} will be moved to {run_dir / 'superseded'} (not "
                            f"deleted) when this run saves over their steps")
    elif resume:
        if not existing:
            raise ValueError(f"--resume: no checkpoint (step-* directory) in {str(run_dir)!r}")
        skipped = []
        for _, path in reversed(existing):
            problem = checkpoint_problem(path, hashes=hashes)
            if problem is None:
                resume_from = path
                break
            skipped.append((path.name, problem))
        if resume_from is None:
            raise ValueError(f"--resume: no usable checkpoint in {str(run_dir)!r}: "
                             + "; ".join(f"{name}: {why}" for name, why in skipped))
        newer = [name for name, _ in skipped]
        if skipped:
            warnings.append("skipping checkpoint(s) that do not verify: "
                            + "; ".join(f"{name} ({why})" for name, why in skipped)
                            + f"; resuming from {resume_from.name} instead (the skipped ones are "
                              f"moved to {run_dir / 'superseded'} when this run saves over "
                              f"their steps)")
    elif existing:
        raise ValueError(f"{str(run_dir)!r} already holds checkpoints ({existing[-1][1].name}); "
                         f"pass --resume to continue that run (--resume=auto: whether or not "
                         f"it has one), or choose another --train.output_dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--train.output_dir={output_dir!r}: cannot create it ({e.strerror}"
                         f"{': ' + e.filename if e.filename and e.filename != output_dir else ''}"
                         f"); valid: a directory this user can write") from None
    run = RunDir(run_dir, resume_from, created, warnings, newer=bool(newer), notes=notes)
    if lock is None:  # the directory is new: lock it before anything is written in it
        try:
            lock = RunLock(run_dir).acquire()
        except BaseException:
            run.remove_if_unused()
            raise
    run.lock = lock
    remove_partial_checkpoints(run_dir)
    return run


# Settings a resumed run may change; any other change would make it a different run (model,
# adapters, data stream, seed) and is refused. skip_invalid may change: the stream position
# counts skipped records either way, so a run stopped by a bad record can go on past it. The
# layout (parallel.*) may change: checkpoints are resharded on load (chunkflow.train.checkpoint.io).
RESUMABLE_CHANGES = ("chunking.", "optim.", "train.steps", "train.epochs", "train.output_dir",
                     "train.device", "train.deterministic", "train.autocast",
                     "train.max_empty_batches", "log.", "checkpoint.", "eval.",
                     "lora.merge_on_save", "data.skip_invalid", "data.prefetch", "parallel.")


def check_resumed_config(saved: dict, cfg: TrainConfig, path: Path, *,
                         verbose: bool = True) -> None:
    now = cfg.to_dict()
    # Checkpoints from before paths were stored absolute: read theirs from here.
    saved = {section: {key: absolute_path_option(f"{section}.{key}", value)
                       if f"{section}.{key}" in PATH_FIELDS else value
                       for key, value in fields.items()} for section, fields in saved.items()}
    # Fields a checkpoint predates held their defaults then: a change from those is a change.
    defaults = TrainConfig().to_dict()
    changes = []
    for section, fields in now.items():
        for key, value in fields.items():
            old = saved.get(section, {}).get(key, defaults[section][key])
            if old != value:
                changes.append((f"{section}.{key}", old, value))
    refused = [c for c in changes if not c[0].startswith(RESUMABLE_CHANGES)]
    if refused:
        raise ValueError(
            f"cannot resume {str(path)!r} with a different model, data or seed: "
            + ", ".join(f"--{n}={new!r} (the checkpoint has {old!r})" for n, old, new in refused)
            + "; valid: the checkpoint's values, or a new run")
    shown = [c for c in changes if not c[0].startswith(("checkpoint.", "train.output_dir"))]
    if shown and verbose:
        print("note: resuming with changed settings: "
              + ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in shown))
