"""A run's training curves as one PNG: loss (and held-out loss), learning rate and gradient
norm, throughput, peak memory (the process's max RSS on an axis of its own) and the
data-parallel balance against the step, with a line where each pass over the data begins and
the layout in the title.

Reads ``<run_dir>/metrics.jsonl``, which the trainer appends one JSON object per optimizer step
to (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``peak_memory_bytes``, and
``eval_loss`` on evaluated steps). A resumed run redoes the steps logged after its last
checkpoint, so a step may appear twice: the last occurrence wins, as it is the one the run's
weights descend from; a record without a ``loss`` (an evaluation logged after the run's last
step) is merged into its step's record instead. Points are drawn in step order; the step axis
has whole-number ticks.

matplotlib is imported inside :func:`write_report`, and the figure is drawn on an Agg canvas of
its own (no pyplot, no global backend switch), so importing this module costs nothing and it
works without a display or in a process that uses matplotlib otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

# (metrics key, panel title, y-axis label, scale applied to the value, line label)
_PANELS = (
    ("loss", "Loss", "loss", 1.0, "loss"),
    ("lr", "Learning rate and gradient norm", "learning rate", 1.0, "learning rate"),
    ("tokens_per_s", "Throughput", "tokens / s", 1.0, "throughput"),
    ("peak_memory_bytes", "Peak memory", "MiB", 1 / 2**20, "peak memory"),
    ("dp_imbalance", "Data-parallel balance", "max / mean replica cost", 1.0, "imbalance"),
)


def _layout(run_dir: Path, records: list[dict[str, Any]]) -> str:
    """``dp x pp x tp`` of the run (its config.toml and logged replicas), or ""."""
    dp = max((len(r["dp_chunks"]) for r in records if isinstance(r.get("dp_chunks"), list)),
             default=None)
    try:
        import tomllib

        parallel = tomllib.loads((run_dir / "config.toml").read_text()).get("parallel", {})
    except (OSError, ValueError):
        parallel = {}
    if dp is None and not parallel:
        return ""
    return (f"; layout dp={dp or 1} x pp={parallel.get('pp', 1)} x tp={parallel.get('tp', 1)}"
            + (f" ({parallel['data_parallel']})" if (dp or 1) > 1 and "data_parallel" in
               parallel else ""))


def _epoch_starts(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(step, pass number) where a new pass over the data begins (``epoch`` is the passes
    made so far, logged for file data)."""
    starts, last = [], None
    for record in records:
        epoch = record.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
            continue
        whole = int(epoch)
        if last is not None and whole > last:
            starts.append((record["step"], whole + 1))
        last = whole
    return starts


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl``, one per step (last occurrence), by step.

    Raises ValueError for a missing run directory or file, an empty file, or a line that is not
    a JSON object with an integer ``step`` (naming the file and line number). Blank lines are
    skipped.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist (or is not a "
                         f"directory); pass the output_dir of a training run")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: {run_dir} has no metrics; a training run writes "
                         f"one line per step there")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each "
                                 f"line must be one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"{where}: 'step' must be an integer, got {step!r}")
            if "loss" not in record and step in by_step:  # an evaluation of a logged step
                by_step[step] = {**by_step[step], **record}
                continue
            by_step.pop(step, None)  # re-insert: the last occurrence wins
            by_step[step] = record
    if not by_step:
        raise ValueError(f"{path} is empty: the run logged no steps yet")
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict[str, Any]], key: str, scale: float,
            path: Path) -> tuple[list[int], list[float]]:
    """Steps and scaled values of ``key``; records without it (or with null) are left out."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: step {record['step']}: {key!r} must be a number, got "
                             f"{value!r}")
        steps.append(record["step"])
        values.append(value * scale)
    return steps, values


def write_report(run_dir: str | Path, *, output: Path | None = None) -> Path:
    """Draw loss, tokens/s and peak memory (MiB) against step to a PNG; return its path.

    ``output`` defaults to ``<run_dir>/report.png`` and must end in ``.png``.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    output = run_dir / "report.png" if output is None else Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"output={str(output)!r}: the report is a PNG; use a .png file name")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 13), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    metrics_path = run_dir / METRICS_FILE
    # Markers make a short run (a handful of steps) readable; long runs are plain lines.
    marker = "o" if len(records) <= 50 else None
    for ax, (key, title, ylabel, scale, label) in zip(axes, _PANELS):
        steps, values = _series(records, key, scale, metrics_path)
        if steps:
            ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=label)
        else:
            ax.text(0.5, 0.5, f"no '{key}' in {METRICS_FILE}", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    steps, evals = _series(records, "eval_loss", 1.0, metrics_path)
    if steps:
        axes[0].plot(steps, evals, marker="s", markersize=4, linewidth=1.2, label="eval loss")
        axes[0].legend(loc="best", fontsize=8)
    steps, norms = _series(records, "grad_norm", 1.0, metrics_path)
    if steps:
        twin = axes[1].twinx()
        twin.plot(steps, norms, color="tab:orange", marker=marker, markersize=3, linewidth=1.0,
                  label="gradient norm")
        twin.set_ylabel("gradient norm (before clipping)")
        handles = axes[1].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        axes[1].legend(handles=handles, loc="best", fontsize=8)
    # On CPU the meter counts what the step holds; the process's max RSS (weights, optimizer,
    # allocator) is logged beside it and shown for comparison when present.
    # Its own axis: RSS (weights, optimizer, allocator) dwarfs the step's memory and would
    # flatten it.
    memory = axes[-2]
    steps, rss = _series(records, "max_rss_bytes", 1 / 2**20, metrics_path)
    if steps:
        twin = memory.twinx()
        twin.plot(steps, rss, color="tab:gray", linestyle="--", linewidth=1.0,
                  label="process max RSS")
        twin.set_ylabel("process max RSS (MiB)")
        handles = memory.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        memory.legend(handles=handles, loc="best", fontsize=8)
    for step, epoch in _epoch_starts(records):
        for ax in axes:
            ax.axvline(step, color="tab:green", linestyle=":", linewidth=1.0)
        axes[0].annotate(f"epoch {epoch}", (step, 1), xycoords=("data", "axes fraction"),
                         xytext=(2, -10), textcoords="offset points", fontsize=7,
                         color="tab:green")
    axes[-1].set_xlabel("step")

    name = run_dir.resolve().name or str(run_dir)
    first, last = records[0]["step"], records[-1]["step"]
    fig.suptitle(f"{name}: {len(records)} steps ({first}..{last}){_layout(run_dir, records)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png")
    return output
