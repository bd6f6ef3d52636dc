"""A run's metrics: ``metrics.jsonl`` (one JSON object per optimizer step), TensorBoard scalars,
and the lines the progress bar prints.

A step's record holds its loss, learning rate, gradient norm, token and chunk counts, memory,
speed and data counters; a step that evaluated also holds ``eval_loss``, ``eval_ppl`` and
``eval_tokens``. An evaluation that ends a run after its last step was logged is a record of its
own with that step number (readers merge records of the same step).
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
                 set_aside: bool = False):
        """``set_aside``: the run replaces a history with checkpoints past ``resume_step``
        (a resume from an older step): its later lines go to ``superseded/``, not away."""
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

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def format_step(record: dict[str, Any], total: int) -> str:
    """The progress line of a step."""
    line = (f"step {record['step']:>{len(str(total))}}/{total}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  grad {record['grad_norm']:.2f}  "
            f"tokens {record['tokens']:6d}  chunks {record['chunks']:3d}  "
            f"packing {record['packing_efficiency']:.1%}  "
            f"peak {record['peak_memory_bytes'] / 2**20:6.1f} MiB  "
            f"{record['tokens_per_s']:7.0f} tok/s")
    if len(record.get("dp_chunks", ())) > 1:  # data parallel
        line += f"  dp imbalance {record['dp_imbalance']:.2f}"
    if "eval_loss" in record:
        line += "  " + format_eval(record)
    return line


def format_eval(record: dict[str, Any]) -> str:
    return (f"eval loss {record['eval_loss']:.4f} (ppl {record['eval_ppl']:.2f}, "
            f"{record['eval_tokens']} tokens)")
