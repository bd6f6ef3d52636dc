"""How much the chunk order matters in state-aware 1F1B (time proportional to tokens).

    python benchmarks/pipeline_order.py [--batches 5] [--stages 4] [--chunk-size 4096] [--k 2]

For LMSys-like global batches (64 sequences up to 32K tokens), simulates the named candidate
orders of ``chunkflow.sim.search`` and prints their makespans; saves the table.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from chunkflow.plan import ActionKind, build_chunks, one_f_one_b  # noqa: E402
from chunkflow.sim import simulate  # noqa: E402
from chunkflow.sim.search import best_order  # noqa: E402
from chunkflow.train.data.synthetic import sample_lengths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--k", type=int, default=2)
    args = parser.parse_args()
    rows, payload = [], []
    for b in range(args.batches):
        lengths = sample_lengths(random.Random(b), 64, max_len=32768)
        plan = build_chunks(lengths, chunk_size=args.chunk_size)

        def duration(stage, a, sizes=[c.num_tokens for c in plan.chunks]):
            return sizes[a.chunk_id] * (2 if a.kind is ActionKind.BACKWARD else 1)

        plain = simulate(one_f_one_b(len(lengths), args.stages),
                         duration=lambda s, a: lengths[a.chunk_id] *
                         (2 if a.kind is ActionKind.BACKWARD else 1)).makespan
        name, _, spans = best_order(plan, args.stages, k=args.k, duration=duration)
        rows.append(f"| {b} | {plan.num_chunks} | {len(plan.chains)} | {plain} | "
                    f"{spans['plan']} | {spans['standalone first']} | {spans[name]} ({name}) | "
                    f"{spans['standalone first'] / spans[name]:.3f} |")
        payload.append({"batch": b, "plain_1f1b": plain, "makespans": spans, "best": name})
    md = ("# Chunk order in state-aware 1F1B\n\n"
          f"`python benchmarks/pipeline_order.py --batches {args.batches} --stages {args.stages} "
          f"--chunk-size {args.chunk_size} --k {args.k}`: makespan in token units (forward 1, "
          f"backward 2 per token), 64 LMSys-like sequences up to 32K per batch.\n\n"
          "| batch | chunks | chains | plain 1F1B (one sequence each) | chains first | "
          "standalone first (paper) | best found | paper order / best |\n"
          "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + f"\n\nMachine: {machine()}\n")
    print(md)
    save("pipeline_order", {"machine": machine(), "args": vars(args), "batches": payload}, md)


if __name__ == "__main__":
    main()
