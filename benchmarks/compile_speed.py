"""Compiled decoder layers against eager ones: step time on ``chunkflow bench``'s 32K global batch.

``chunkflow bench``'s CPU model (reference Llama-style, 2 layers, hidden 128, float32) and its
global batches (16 sequences, one of 32K tokens, the rest LMSys-like), chunks of 2048, K=1. Two
engines on two copies of the same weights: eager, and ``compile=True``. The compiled one first
runs warm-up steps (its compile time, reported on its own: the first step's time less the median
eager step); then the two alternate, one step each on the same global batch, a new batch (other
lengths, other chains) every round. The compiled graphs are counted after the warm-up and at the
end: a count that grows is a recompile.

Prints and saves ``results/compile_speed-<max len>k-<date>.{md,json}``.

    python benchmarks/compile_speed.py [--repeats 6] [--warmup 2] [--max-len 32768]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from chunkflow import ChunkFlowEngine  # noqa: E402
from chunkflow.bench.workload import get_model_config, global_batch  # noqa: E402
from chunkflow.models import Transformer  # noqa: E402
from chunkflow.runtime import compiled  # noqa: E402


def step(engine: ChunkFlowEngine, model: torch.nn.Module, batch) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = float(engine.forward_backward(batch).loss)
    return time.perf_counter() - t0, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=2048)
    args = parser.parse_args()

    config = get_model_config("cpu")
    torch.manual_seed(0)
    eager_model = Transformer(config).float().train()
    compiled_model = copy.deepcopy(eager_model)
    options = dict(chunk_size=args.chunk_size, k=1)
    eager = ChunkFlowEngine(eager_model, **options)
    comp = ChunkFlowEngine(compiled_model, **options, compile=True)

    def batch(seed):
        return global_batch(args.max_len, 16, seed=seed, vocab_size=config.vocab_size)

    first = []
    for seed in range(args.warmup):  # the compiled engine's warm-up
        first.append(step(comp, compiled_model, batch(seed))[0])
    warm_graphs = compiled.COUNTER.graphs
    times = {"eager": [], "compiled": []}
    worst = 0.0
    for r in range(args.repeats):
        b = batch(100 + r)
        te, le = step(eager, eager_model, b)
        tc, lc = step(comp, compiled_model, b)
        times["eager"].append(te)
        times["compiled"].append(tc)
        worst = max(worst, abs(le - lc) / abs(le))
        print(f"round {r}: eager {te:.2f} s, compiled {tc:.2f} s", flush=True)
    end_graphs = compiled.COUNTER.graphs
    med = {m: statistics.median(t) for m, t in times.items()}
    ratios = sorted(e / c for e, c in zip(times["eager"], times["compiled"]))
    compile_s = first[0] - med["eager"]
    payload = {"machine": machine(), "model": "bench cpu", "max_len": args.max_len,
               "chunk_size": args.chunk_size, "seconds": times, "warmup_seconds": first,
               "compile_seconds": compile_s, "graphs_after_warmup": warm_graphs,
               "graphs_at_end": end_graphs, "speedup": med["eager"] / med["compiled"],
               "loss_rel_diff": worst}
    md = (f"# Compiled decoder layers against eager ({payload['machine']['date']})\n\n"
          f"Machine: {payload['machine']}\n\n"
          f"`chunkflow bench`'s CPU model (2 layers, hidden 128, float32) on its "
          f"{args.max_len // 1024}K global batches (16 sequences), chunks of {args.chunk_size}, "
          f"K=1; median of {args.repeats} steps, eager and compiled alternating on the same "
          f"batch, a new batch each round.\n\n"
          "| | eager | compiled |\n|---|---|---|\n"
          f"| step time (median) | {med['eager']:.2f} s | {med['compiled']:.2f} s |\n"
          f"| speed-up (median; range of pairs) | | {payload['speedup']:.2f}x "
          f"({ratios[0]:.2f}-{ratios[-1]:.2f}) |\n"
          f"| warm-up steps | | {', '.join(f'{t:.1f} s' for t in first)} |\n"
          f"| compile time (first step less an eager step) | | {compile_s:.1f} s |\n"
          f"| graphs compiled after warm-up / at the end | | {warm_graphs} / {end_graphs} |\n"
          f"| largest relative loss difference | | {worst:.1e} |\n")
    print(md)
    save(f"compile_speed-{args.max_len // 1024}k", payload, md)


if __name__ == "__main__":
    main()
