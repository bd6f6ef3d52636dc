"""Peak memory and tokens/s against the longest sequence: chunkflow vs plain full-sequence training.

    python benchmarks/memory_vs_length.py [--lengths 2048,8192,32768] [--chunk-size 2048]

One training step on one sequence of each length, each in a fresh process (benchmarks/rss_probe.py),
for a float32 model of 4 layers, hidden 256, 8 query / 2 key-value heads. Reports the rise of peak
RSS (first step), chunkflow's CPU meter (bytes saved for backward + KV state) and tokens/s (fastest
of --repeats steps), and saves JSON,
markdown and a PNG under benchmarks/results/ with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import machine, save

PROBE = Path(__file__).with_name("rss_probe.py")


def run(mode: str, seq_len: int, chunk_size: int, k: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), mode, str(seq_len), "--chunk-size",
                          str(chunk_size), "--k", str(k), "--repeats", str(repeats)],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)
    row["tokens_per_second"] = seq_len / row["step_seconds"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per run, fastest wins")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    rows = []
    for n in lengths:
        for mode in ("chunkflow", "full"):
            row = run(mode, n, args.chunk_size, args.k, args.repeats)
            rows.append(row)
            print(f"{mode:9s} {n:6d} tokens: RSS rise {row['rss_rise_bytes'] / 2**20:7.0f} MiB, "
                  f"meter {row['peak_memory_bytes'] / 2**20:7.0f} MiB, "
                  f"{row['tokens_per_second']:7.0f} tok/s", flush=True)

    info = machine()
    lines = [f"# Peak memory vs longest sequence ({info['date']})", "",
             f"Machine: {info['platform']}, {info['device']}, torch {info['torch']}. "
             f"Model: float32, 4 layers, hidden 256, 8/2 heads. chunkflow: chunk_size="
             f"{args.chunk_size}, k={args.k}; tokens/s from the fastest of {args.repeats} steps. "
             f"Command: `python benchmarks/memory_vs_length.py --lengths {args.lengths} "
             f"--chunk-size {args.chunk_size} --k {args.k} --repeats {args.repeats}`", "",
             "| tokens | chunkflow RSS rise (MiB) | full RSS rise (MiB) | chunkflow meter (MiB) "
             "| full meter (MiB) | chunkflow tok/s | full tok/s |", "|---|---|---|---|---|---|---|"]
    by = {(r["mode"], r["seq_len"]): r for r in rows}
    for n in lengths:
        c, f = by["chunkflow", n], by["full", n]
        lines.append(f"| {n} | {c['rss_rise_bytes'] / 2**20:.0f} | {f['rss_rise_bytes'] / 2**20:.0f} "
                     f"| {c['peak_memory_bytes'] / 2**20:.0f} | {f['peak_memory_bytes'] / 2**20:.0f} "
                     f"| {c['tokens_per_second']:.0f} | {f['tokens_per_second']:.0f} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    stem = save("memory_vs_length", {"machine": info, "args": vars(args), "rows": rows}, markdown)
    _plot(rows, lengths, stem.with_suffix(".png"))


def _plot(rows, lengths, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return
    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("chunkflow", "full"):
        sel = [r for r in rows if r["mode"] == mode]
        ax_mem.plot(lengths, [r["rss_rise_bytes"] / 2**20 for r in sel], "o-", label=mode)
        ax_tps.plot(lengths, [r["tokens_per_second"] for r in sel], "o-", label=mode)
    for ax, label in ((ax_mem, "peak RSS rise (MiB)"), (ax_tps, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
