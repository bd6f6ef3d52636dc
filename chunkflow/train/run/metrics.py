"""A run's metrics: ``metrics.jsonl`` (one JSON object per optimizer step), TensorBoard scalars,
and the lines the progress bar prints.

A step's record holds its loss, learning rate, gradient norm, token and chunk counts, memory,
speed, the time the loop waited for the step's global batch (reading, tokenizing, grouping:
``data_wait_s``, and its share of the step, ``data_wait_share``) and data counters; a step that
evaluated also holds ``eval_loss``, ``eval_ppl`` and ``eval_tokens``. An evaluation that ends a
run after its last step was logged is a record of its own with that step number (readers merge
records of the same step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl (one line per step) and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool,
                 set_aside: bool = False, wandb=None, config: dict | None = None):
        """``set_aside``: the run replaces a history with checkpoints past ``resume_step``
        (a resume from an older step): its later lines go to ``superseded/``, not away.
        ``wandb``: the run's ``[log]`` section when it logs to Weights & Biases
        (:func:`_wandb_run`), ``config`` the configuration it records."""
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            # A killed run may have logged steps after its last checkpoint; they will be redone.
            # A SIGKILL during a write can also leave a partial last line: drop it too.
            kept, later = [], []
            for line in self.path.read_text().splitlines():
                try:
                    (kept if json.loads(line)["step"] <= resume_step else later).append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            if set_aside and later:
                aside = run_dir / "superseded" / f"metrics-after-step-{resume_step}.jsonl"
                aside.parent.mkdir(exist_ok=True)
                with open(aside, "a") as f:
                    f.write("".join(line + "\n" for line in later))
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)  # a kill now keeps either the old or the new history
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"--log.tensorboard=true needs the tensorboard package "
                                 f"(pip install tensorboard): {e}") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = _wandb_run(wandb, run_dir, config) if wandb is not None else None

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {key: value for key, value in record.items() if key != "step"
                   and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


WANDB_ID_FILE = "wandb-run-id"


def _wandb_run(log, run_dir: Path, config: dict | None):
    """A Weights & Biases run (``wandb.init``) for the run directory: its id is kept in
    ``RUN/wandb-run-id``, so a resumed chunkflow run continues the same W&B run
    (``resume="allow"``); files go under ``RUN/wandb``; ``mode`` offline works without a
    network. (W&B drops a step it has seen, so the steps a resume redoes keep their first
    values there; metrics.jsonl has the redone ones.)"""
    try:
        import wandb
    except ImportError as e:
        raise ValueError(f"--log.wandb=true needs the wandb package (pip install wandb): "
                         f"{e}") from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if not run_id:
        run_id = wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
    (run_dir / "wandb").mkdir(exist_ok=True)
    options = {} if log.wandb_mode == "auto" else {"mode": log.wandb_mode}
    return wandb.init(project=log.wandb_project, name=log.wandb_name or run_dir.name,
                      id=run_id, resume="allow", dir=str(run_dir), config=config, **options)


def format_step(record: dict[str, Any], total: int) -> str:
    """The progress line of a step."""
    line = (f"step {record['step']:>{len(str(total))}}/{total}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  grad {record['grad_norm']:.2f}  "
            f"tokens {record['tokens']:6d}  chunks {record['chunks']:3d}  "
            f"packing {record['packing_efficiency']:.1%}  "
            f"peak {record['peak_memory_bytes'] / 2**20:6.1f} MiB  "
            f"{record['tokens_per_s']:7.0f} tok/s")
    if "data_wait_share" in record:  # the share of the step spent waiting for its batch
        line += f"  data {record['data_wait_share']:4.0%}"
    if len(record.get("dp_chunks", ())) > 1:  # data parallel
        line += f"  dp imbalance {record['dp_imbalance']:.2f}"
    if "eval_loss" in record:
        line += "  " + format_eval(record)
    return line


def format_eval(record: dict[str, Any]) -> str:
    return (f"eval loss {record['eval_loss']:.4f} (ppl {record['eval_ppl']:.2f}, "
            f"{record['eval_tokens']} tokens)")
