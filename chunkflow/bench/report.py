"""The benchmark's outputs: machine description, markdown tables and PNG plots.

Each measurement (a worker's JSON) is summarised once by :func:`summarise`; the tables and plots
only format those numbers.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from pathlib import Path

MiB = 2**20


def machine() -> dict:
    """Where and when the figures were measured."""
    import torch
    import transformers

    info = {"date": _dt.date.today().isoformat(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": _cpu_model(),
            "cpu_threads": torch.get_num_threads(), "logical_cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_slug(info: dict, device: str) -> str:
    """A file-name-safe name of the hardware: the GPU on cuda, else CPU model and threads."""
    if device == "cuda":
        name = info.get("gpu", "cuda")
    else:
        name = re.sub(r"\((R|TM)\)|\bCPU\b|@.*$|\b\d+-Core Processor\b", "", info["cpu"])
        name = f"{name} {info['cpu_threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def summarise(result: dict, *, peak_flops: float | None = None) -> dict:
    """One measurement's figures: throughput, step time, memory, work and MFU."""
    if "error" in result:
        return {"label": result["label"], "error": result["error"]}
    steps = result["steps"]
    seconds = sum(s["seconds"] for s in steps)
    model_flops = sum(s["model_flops"] for s in steps)
    row = {"label": result["label"], "step_seconds": seconds / len(steps),
           "tokens_per_second": sum(s["tokens"] for s in steps) / seconds,
           "supervised_per_second": sum(s["supervised_tokens"] for s in steps) / seconds,
           "peak_mib": result["peak_bytes"] / MiB,
           "work": sum(s["executed_flops"] for s in steps) / model_flops,
           "loss": steps[0]["loss"],
           "sampled": any(s["micro_batches_run"] < s["micro_batches"] for s in steps),
           "mfu": model_flops / seconds / peak_flops if peak_flops else None}
    return row


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def method_table(rows: list[dict], chunkflow: dict) -> list[str]:
    """Markdown rows of one maximum length, with each method against chunkflow."""
    mfu = any(r.get("mfu") is not None for r in rows)
    head = ("| method | step (s) | tokens/s | supervised tokens/s | peak memory (MiB) "
            "| work / model FLOPs | chunkflow speed-up | memory vs chunkflow | loss |"
            + (" MFU |" if mfu else ""))
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    ok = "error" not in chunkflow
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * (columns - 2))
            continue
        sampled = "*" if r["sampled"] else ""
        loss = "" if r["loss"] is None else f"{r['loss']:.6f}"
        lines.append(
            f"| {r['label']} | {r['step_seconds']:.2f}{sampled} | {r['tokens_per_second']:.0f} "
            f"| {r['supervised_per_second']:.0f} | {r['peak_mib']:.0f} | {r['work']:.2f} "
            f"| {_ratio(chunkflow['tokens_per_second'], r['tokens_per_second']) if ok else ''} "
            f"| {_ratio(r['peak_mib'], chunkflow['peak_mib']) if ok else ''} | {loss} |"
            + (f" {100 * r['mfu']:.1f}% |" if mfu and r.get("mfu") is not None else
               (" |" if mfu else "")))
    return lines


def memory_summary(rows: list[dict], max_len: int) -> list[str]:
    """One sentence: is chunkflow's (the first row's) peak the lowest at ``max_len``?"""
    chunkflow, others = rows[0], [r for r in rows[1:] if "error" not in r]
    if "error" in chunkflow or not others:
        return []
    nearest = min(others, key=lambda r: r["peak_mib"])
    verdict = ("the lowest" if chunkflow["peak_mib"] < nearest["peak_mib"]
               else "not the lowest")
    return ["", f"At the longest maximum length, {max_len}, chunkflow's peak memory "
                f"({chunkflow['peak_mib']:.0f} MiB) is {verdict} of all methods, every one of "
                f"which trains every token; the nearest is {nearest['label']} at "
                f"{nearest['peak_mib']:.0f} MiB "
                f"({_ratio(nearest['peak_mib'], chunkflow['peak_mib'])} chunkflow's)."]


def budget_table(choices: dict[str, dict | None], budget_mib: float) -> list[str]:
    """Each method's fastest configuration within the budget, against chunkflow's."""
    lines = ["| method | fastest configuration within the budget | tokens/s | peak memory (MiB) "
             "| chunkflow speed-up |", "|---|---|---|---|---|"]
    base = choices.get("chunkflow")
    for method, r in choices.items():
        if r is None:
            lines.append(f"| {method} | none fits {budget_mib:.0f} MiB (out of memory) | | | |")
            continue
        speedup = _ratio(base["tokens_per_second"], r["tokens_per_second"]) if base else ""
        lines.append(f"| {method} | {r['label']} | {r['tokens_per_second']:.0f} "
                     f"| {r['peak_mib']:.0f} | {speedup} |")
    return lines


def plot(path: Path, lengths: list[int], series: dict[str, list[dict | None]],
         budget_series: dict[str, list[dict | None]] | None, budget_mib: float | None,
         title: str) -> None:
    """Throughput and peak memory against the maximum length (and throughput within budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if budget_series else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))

    def draw(ax, data, key, ylabel):
        for label, rows in data.items():
            points = [(n, r[key]) for n, r in zip(lengths, rows) if r and "error" not in r]
            if points:
                ax.plot(*zip(*points), "o-", label=label,
                        linewidth=2.5 if label.startswith("chunkflow") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.set_xlabel("maximum sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    draw(axes[0], series, "tokens_per_second", "tokens/s")
    axes[0].set_title("throughput")
    draw(axes[1], series, "peak_mib", "peak memory of a step (MiB)")
    axes[1].set_yscale("log")
    axes[1].set_title("peak memory")
    if budget_mib:
        axes[1].axhline(budget_mib, color="k", linestyle="--", linewidth=1,
                        label=f"budget {budget_mib:.0f} MiB")
    axes[1].legend(fontsize=7)
    if budget_series:
        draw(axes[2], budget_series, "tokens_per_second", "tokens/s")
        axes[2].set_title(f"fastest within {budget_mib:.0f} MiB")
        axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
