"""The host's share of a chunk: chunkflow's time per chunk against plain transformers training of
the same micro-batch, on a model small enough that the host's work (Python, hooks, tensor
bookkeeping) is a visible part of each chunk.

A 4-layer, hidden-64 transformers Qwen2 (float32, CPU). Two workloads, each timed as whole steps
(median of ``--repeats`` after a warm-up, the two methods alternating):

* standalone: 64 sequences of 128 tokens. chunkflow runs them as 64 standalone chunks of 128
  (one ``forward_backward``); plain training runs 64 micro-batches ``model(ids, labels=ids)``
  and ``loss.backward()``;
* chains: 8 sequences of 1024 tokens. chunkflow runs them as 8 chains of 8 chunks of 128 with
  ``k=8`` (every chunk keeps its graph: no recompute, the same FLOPs as plain training); plain
  training runs 8 micro-batches of 1024 tokens, counted as 8 chunks each.

Wall time per chunk compares the whole work; a chain's chunks do the same FLOPs as plain
training's long micro-batch in eight smaller pieces, which on this CPU alone costs more. The host
columns take the kernels out: a step's time outside torch's operators (``torch.profiler``), per
chunkflow chunk and per plain micro-batch, which is what a launch-bound GPU waits for.

Prints and saves ``results/host_overhead-<date>.{md,json}``; ``--profile`` adds the functions
where chunkflow's standalone step spends its time (cProfile, cumulative).

    python benchmarks/host_overhead.py [--repeats 5] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, save  # noqa: E402

from chunkflow import ChunkFlowEngine  # noqa: E402

CHUNK = 128
NO_METER = "no CPU meter (as on CUDA)"
WORKLOADS = {"standalone": (64, 128, 1), "chains": (8, 1024, 8)}
"""name -> (sequences, tokens each, k)."""


def build_model() -> torch.nn.Module:
    config = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, attention_dropout=0.0)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).float().train()


def chunkflow_step(engine: ChunkFlowEngine, batch: list[torch.Tensor]):
    return lambda: engine.forward_backward(batch)


def plain_step(model: torch.nn.Module, batch: list[torch.Tensor]):
    def run():
        for ids in batch:
            out = model(ids[None], labels=ids[None])
            out.loss.backward()
    return run


def time_pair(steps: dict, repeats: int, model: torch.nn.Module) -> dict[str, list[float]]:
    """Seconds of each step function, alternating, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_idx in range(repeats + 1):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step()
            if round_idx:
                times[name].append(time.perf_counter() - t0)
    return times


def host_seconds(step, model: torch.nn.Module) -> float:
    """Seconds of one step spent outside torch's operators: the step's wall time under
    ``torch.profiler`` less the time inside its outermost ``aten::`` ops (forward, and the
    backward's, which autograd calls). What a GPU's host does between kernel launches."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model.zero_grad(set_to_none=True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0

    def outermost(event) -> bool:
        parent = event.cpu_parent
        return parent is None or not parent.name.startswith("aten::")

    inside = sum(e.cpu_time_total for e in prof.events()
                 if e.name.startswith("aten::") and outermost(e)) / 1e6
    return wall - inside


def profile(step, model: torch.nn.Module, top: int = 15) -> str:
    model.zero_grad(set_to_none=True)
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    model = build_model()
    rows, payload = [], {"machine": machine(), "chunk_size": CHUNK, "workloads": {}}
    profiles = {}
    for name, (num_seqs, seq_len, k) in WORKLOADS.items():
        torch.manual_seed(1)
        batch = [torch.randint(0, 512, (seq_len,)) for _ in range(num_seqs)]
        engine = ChunkFlowEngine(model, chunk_size=CHUNK, k=k, attention_backend="auto")
        # The same engine as it runs on CUDA, where it reads the allocator's peak and installs
        # no saved-tensor hooks: the CPU memory meter's hooks off.
        as_on_cuda = ChunkFlowEngine(model, chunk_size=CHUNK, k=k, attention_backend="auto")
        as_on_cuda.meter.hooks = contextlib.nullcontext
        num_chunks = num_seqs * seq_len // CHUNK
        steps = {"chunkflow": chunkflow_step(engine, batch),
                 NO_METER: chunkflow_step(as_on_cuda, batch), "plain": plain_step(model, batch)}
        times = time_pair(steps, args.repeats, model)
        med = {m: statistics.median(t) for m, t in times.items()}
        per_chunk = {m: 1e3 * med[m] / num_chunks for m in med}
        # host time outside torch's operators: chunkflow per chunk, plain per micro-batch
        host = {m: statistics.median(host_seconds(steps[m], model) for _ in range(3))
                for m in steps}
        host_unit = {m: 1e3 * host[m] / (num_seqs if m == "plain" else num_chunks)
                     for m in steps}
        entry = {"sequences": num_seqs, "seq_len": seq_len, "k": k, "chunks": num_chunks,
                 "seconds": times, "ms_per_chunk": per_chunk, "host_ms": host_unit}
        for method in ("chunkflow", NO_METER):
            ratio = med[method] / med["plain"]
            ratios = sorted(c / p for c, p in zip(times[method], times["plain"]))
            host_ratio = host_unit[method] / host_unit["plain"]
            entry[method] = {"ratio": ratio, "host_ratio": host_ratio}
            label = name if method == "chunkflow" else f"{name}, {NO_METER}"
            rows.append(f"| {label} | {num_seqs} x {seq_len} | {num_chunks} | {k} | "
                        f"{per_chunk[method]:.2f} | {per_chunk['plain']:.2f} | {ratio:.2f}x | "
                        f"{ratios[0]:.2f}-{ratios[-1]:.2f} | {host_unit[method]:.2f} | "
                        f"{host_unit['plain']:.2f} | {host_ratio:.2f}x |")
            print(rows[-1], flush=True)
        payload["workloads"][name] = entry
        if args.profile and name == "standalone":
            profiles[name] = profile(steps["chunkflow"], model)
    md = (f"# Host overhead per chunk ({payload['machine']['date']})\n\n"
          f"Machine: {payload['machine']}\n\n"
          f"4-layer hidden-64 transformers Qwen2, float32, chunks of {CHUNK} tokens; median of "
          f"{args.repeats} whole steps after a warm-up, the methods alternating. Plain: "
          f"`model(ids, labels=ids).loss.backward()` per micro-batch.\n\n"
          "Host columns: one step's time outside torch's operators (wall time under "
          "torch.profiler less the outermost aten ops; median of 3 profiled steps), per "
          "chunkflow chunk and per plain micro-batch (a chain's sequence is one micro-batch of "
          "plain training and eight chunks of chunkflow's).\n\n"
          "| workload | sequences | chunks | K | chunkflow ms/chunk | plain ms/chunk | "
          "chunkflow / plain | range of pairs | host ms per chunk | host ms per plain "
          "micro-batch | host: chunk / micro-batch |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n"
          + "\n".join(rows) + "\n")
    for name, text in profiles.items():
        md += f"\n## Where chunkflow's {name} step spends its time (cProfile, cumulative)\n\n"
        md += "```\n" + text.strip() + "\n```\n"
    print(md)
    save("host_overhead", payload, md)


if __name__ == "__main__":
    main()
