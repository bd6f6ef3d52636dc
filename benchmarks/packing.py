"""Does packing short sequences into chains' last chunks help? Chunks and efficiency, both ways.

    python benchmarks/packing.py [--batches 50] [--batch-size 256]

Global batches from the built-in LMSys-like length distribution (max 256K tokens), for several
chunk sizes; reports mean chunks per batch, packing efficiency (tokens / chunk capacity), and
how often the plan reaches the lower bound ceil(tokens / chunk_size). Stdlib only.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from common import machine, save  # noqa: E402

from chunkflow.plan import build_chunks  # noqa: E402
from chunkflow.train.data.synthetic import sample_lengths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=262144)
    args = parser.parse_args()
    rows = []
    for chunk_size in (2048, 4096, 8192, 16384, 32768):
        stats = {True: [0, 0.0, 0], False: [0, 0.0, 0]}
        for b in range(args.batches):
            lengths = sample_lengths(random.Random(b), args.batch_size, max_len=args.max_len)
            for tails in (True, False):
                plan = build_chunks(lengths, chunk_size=chunk_size, pack_chain_tails=tails)
                stats[tails][0] += plan.num_chunks
                stats[tails][1] += plan.packing_efficiency
                stats[tails][2] += plan.num_chunks == plan.lower_bound
        row = {"chunk_size": chunk_size}
        for tails, name in ((False, "plain"), (True, "tails")):
            chunks, eff, at_bound = stats[tails]
            row[f"{name}_chunks"] = chunks / args.batches
            row[f"{name}_efficiency"] = eff / args.batches
            row[f"{name}_at_lower_bound"] = at_bound / args.batches
        rows.append(row)
    info = machine()
    lines = [f"# Tail packing ({info['date']})", "",
             f"{args.batches} global batches of {args.batch_size} sequences, LMSys-like lengths "
             f"up to {args.max_len}. Command: `python benchmarks/packing.py --batches "
             f"{args.batches} --batch-size {args.batch_size} --max-len {args.max_len}`", "",
             "| chunk size | chunks (plain) | chunks (tails) | efficiency (plain) | efficiency "
             "(tails) | at lower bound (plain) | at lower bound (tails) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunk_size']} | {r['plain_chunks']:.2f} | {r['tails_chunks']:.2f} "
                     f"| {r['plain_efficiency']:.1%} | {r['tails_efficiency']:.1%} "
                     f"| {r['plain_at_lower_bound']:.0%} | {r['tails_at_lower_bound']:.0%} |")
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    save("packing", {"machine": info, "args": vars(args), "rows": rows}, markdown)


if __name__ == "__main__":
    main()
