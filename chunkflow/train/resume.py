"""Where a run lives, and what resuming it may change.

``prepare_run_dir`` picks the run directory (a dated default), cleans what a killed run left
behind and finds the checkpoint to continue; ``check_resumed_config`` refuses a resume that would
be a different run (model, data, seed, layout) and lists the settings that did change.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from chunkflow.train.checkpoint import list_checkpoints, remove_partial_checkpoints
from chunkflow.train.config import TrainConfig


def prepare_run_dir(config: TrainConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from, if any."""
    output_dir = config.train.output_dir
    if output_dir is None:
        if config.checkpoint.resume:
            raise ValueError("--resume needs --train.output_dir: the run directory to continue")
        output_dir = f"runs/train-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        config.train.output_dir = output_dir
    run_dir = Path(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(run_dir)
    existing = list_checkpoints(run_dir)
    if config.checkpoint.resume_from is not None:
        path = Path(config.checkpoint.resume_from)
        if config.checkpoint.resume:
            raise ValueError(f"both --resume and --checkpoint.resume_from={str(path)!r}; valid: "
                             f"one of them")
        if existing and path.resolve() != existing[-1][1].resolve():
            raise ValueError(f"--checkpoint.resume_from={str(path)!r} into {str(run_dir)!r}, "
                             f"which holds checkpoints of another history (newest "
                             f"{existing[-1][1].name}); valid: a new --train.output_dir, or "
                             f"--resume to continue the newest one there")
        return run_dir, path
    if config.checkpoint.resume:
        if not existing:
            raise ValueError(f"--resume: no checkpoint (step-* directory) in {str(run_dir)!r}")
        return run_dir, existing[-1][1]
    if existing:
        raise ValueError(f"{str(run_dir)!r} already holds checkpoints ({existing[-1][1].name}); "
                         f"pass --resume to continue that run, or choose another "
                         f"--train.output_dir")
    return run_dir, None


# Settings a resumed run may change; any other change would make it a different run (model,
# data stream, seed) and is refused. skip_invalid may change: the stream position counts skipped
# records either way, so a run stopped by a bad record can go on past it.
RESUMABLE_CHANGES = ("chunking.", "optim.", "train.steps", "train.output_dir", "train.device",
                      "train.deterministic", "train.autocast", "log.", "checkpoint.",
                      "data.skip_invalid", "parallel.timeout_s")


def check_resumed_config(saved: dict, cfg: TrainConfig, path: Path, *,
                          verbose: bool = True) -> None:
    now = cfg.to_dict()
    changes = [(f"{section}.{key}", value, now[section][key])
               for section, fields in saved.items() for key, value in fields.items()
               if now.get(section, {}).get(key, value) != value]
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
