"""Measured pipeline bubble of a pipeline step on CPU gloo ranks vs the simulator.

    python benchmarks/pipeline_bubble.py [--stages 2] [--steps 3] [--k 2] [--chunk-size 512]
                                         [--schedule 1f1b|zb-h1|zb-h2]

Runs ``--stages`` processes (one thread each; this machine has few cores, so one rank per core)
training a small reference model with ``chunkflow.parallel`` on LMSys-like global batches. Every
rank times each action it computes (F/S/R/B, or I/W under a zero-bubble schedule; waits
for its inputs excluded). Per step:

* measured bubble = 1 - (sum of the stages' compute time) / (stages x wall-clock makespan);
* the simulator's bubble for the same action lists (``chunkflow.sim.simulate``), with
  (a) each action's measured duration, and (b) durations from the cost model's FLOPs at one
  rate fitted to the step (seconds per FLOP).

(a) isolates what the schedule structure predicts from what running it adds (P2P transfers,
Python between actions, waiting on the OS); (b) adds the cost model's error on this hardware.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from common import free_port, machine, save  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from chunkflow.models import ModelConfig, Transformer  # noqa: E402
from chunkflow.parallel import ParallelEngine, init_distributed, stage_layer_ranges  # noqa: E402
from chunkflow.plan import ActionKind, build_chunks  # noqa: E402
from chunkflow.plan.zero_bubble import pipeline_schedule  # noqa: E402
from chunkflow.plan.cost import chunk_segments, forward_flops  # noqa: E402
from chunkflow.sim import simulate  # noqa: E402
from chunkflow.train.data.synthetic import sample_lengths  # noqa: E402

CONFIG = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0)


def batch_of(step: int, args) -> list[dict]:
    lengths = sample_lengths(random.Random(step), args.sequences, max_len=args.max_len)
    g = torch.Generator().manual_seed(step)
    return [{"input_ids": torch.randint(0, CONFIG.vocab_size, (n,), generator=g)}
            for n in lengths]


def rank_main(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    ctx = init_distributed(pp=world, device=torch.device("cpu"))
    torch.manual_seed(0)
    engine = ParallelEngine(Transformer(CONFIG), ctx, chunk_size=args.chunk_size, k=args.k,
                            schedule=args.schedule)
    events: list[tuple[tuple[str, int], float, float]] = []
    started = {}

    def record(action, phase):  # the engine's action hook: start once the input is here
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            events.append(((action.kind.value, action.chunk_id), started["t"],
                           time.perf_counter()))

    engine.engine.register_action_hook(record)
    steps = []
    for step in range(args.steps + 1):  # step 0 warms up
        batch = batch_of(step, args)
        events.clear()
        dist.barrier()
        t0 = time.perf_counter()
        engine.forward_backward(batch)
        t1 = time.perf_counter()
        gathered = [None] * world
        dist.all_gather_object(gathered, {"t0": t0, "t1": t1, "events": list(events)})
        steps.append(gathered)
    if rank == 0:
        out.put(steps[1:])
    dist.destroy_process_group()


def analyse(step: int, ranks: list[dict], args) -> dict:
    p = len(ranks)
    lengths = [len(x["input_ids"]) for x in batch_of(step, args)]
    plan = build_chunks(lengths, chunk_size=args.chunk_size)
    stages = pipeline_schedule(plan, p, k=args.k, schedule=args.schedule)  # the runtime's
    start = min(r["t0"] for r in ranks)
    makespan = max(e[2] for r in ranks for e in r["events"]) - start
    measured = {(s, kind, c): t1 - t0 for s, r in enumerate(ranks)
                for (kind, c), t0, t1 in r["events"]}
    busy = [sum(t1 - t0 for _, t0, t1 in r["events"]) for r in ranks]
    bubble = 1 - sum(busy) / (p * makespan)
    by_actions = simulate(stages, duration=lambda s, a: measured[(s, a.kind.value, a.chunk_id)])

    # Cost model: forward FLOPs of the stage's layers (+ head on the last); B = 2x matmul +
    # 2.5x attention (W = 1x matmul, I = the rest), one rate fitted so the total equals the
    # measured compute.
    layers = [len(r) for r in stage_layer_ranges(CONFIG.num_hidden_layers, p)]
    from chunkflow.models.families import model_shape

    shape = model_shape(CONFIG)

    def flops(s, a):
        lens, prefix = chunk_segments(plan.chunks[a.chunk_id])
        f = forward_flops(shape, lens, prefix_len=prefix, num_layers=layers[s], head=s == p - 1)
        mm = f.layers_matmul + f.head_matmul
        return {ActionKind.BACKWARD: 2 * mm + 2.5 * f.attention,
                ActionKind.INPUT_BACKWARD: mm + 2.5 * f.attention,
                ActionKind.WEIGHT_BACKWARD: mm}.get(a.kind, mm + f.attention)

    total_flops = sum(flops(s, a) for s, acts in enumerate(stages) for a in acts)
    rate = sum(busy) / total_flops
    by_cost = simulate(stages, duration=lambda s, a: flops(s, a) * rate)
    return {"step": step, "chunks": plan.num_chunks, "chains": len(plan.chains),
            "longest_chain": plan.longest_chain, "measured_makespan_s": makespan,
            "measured_busy_s": busy, "measured_bubble": bubble,
            "sim_measured_durations_makespan_s": by_actions.makespan,
            "sim_measured_durations_bubble": by_actions.bubble_ratio,
            "sim_cost_model_makespan_s": by_cost.makespan,
            "sim_cost_model_bubble": by_cost.bubble_ratio,
            "cost_model_busy_s": by_cost.busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--schedule", choices=("1f1b", "zb-h1", "zb-h2"), default="1f1b")
    args = parser.parse_args()
    port = free_port()
    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    procs = [context.Process(target=rank_main, args=(r, args.stages, port, args, out))
             for r in range(args.stages)]
    for proc in procs:
        proc.start()
    steps = out.get()
    for proc in procs:
        proc.join()
    rows = [analyse(i + 1, ranks, args) for i, ranks in enumerate(steps)]
    lines = [f"# Pipeline bubble, measured vs simulated ({args.stages} stages, "
             f"{args.schedule}, CPU gloo, k={args.k}, chunk {args.chunk_size})", "",
             f"{args.sequences} LMSys-like sequences up to {args.max_len} tokens per step; "
             f"model {CONFIG.num_hidden_layers} layers, hidden {CONFIG.hidden_size}, one thread "
             f"per rank.", "",
             "| step | chunks (chains) | makespan measured | bubble measured | sim, measured "
             "durations: makespan / bubble | run minus sim | sim, cost model: makespan / bubble "
             "| compute per stage: measured / cost model |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['chunks']} ({r['chains']}) | {r['measured_makespan_s']:.2f} s | "
            f"{r['measured_bubble']:.1%} | {r['sim_measured_durations_makespan_s']:.2f} s / "
            f"{r['sim_measured_durations_bubble']:.1%} | "
            f"{(r['measured_makespan_s'] - r['sim_measured_durations_makespan_s']) * 1e3:.0f} ms "
            f"| {r['sim_cost_model_makespan_s']:.2f} s / {r['sim_cost_model_bubble']:.1%} | "
            + "/".join(f"{x:.2f}" for x in r["measured_busy_s"]) + " s / "
            + "/".join(f"{x:.2f}" for x in r["cost_model_busy_s"]) + " s |")
    mean = {k: statistics.mean(r[k] for r in rows) for k in
            ("measured_bubble", "sim_measured_durations_bubble", "sim_cost_model_bubble")}
    lines += ["", f"Mean bubble: measured {mean['measured_bubble']:.1%}, simulated with measured "
                  f"durations {mean['sim_measured_durations_bubble']:.1%}, simulated with the "
                  f"cost model {mean['sim_cost_model_bubble']:.1%}.",
              "", f"Reproduce: `python benchmarks/pipeline_bubble.py --stages {args.stages} "
                  f"--steps {args.steps} --k {args.k} --chunk-size {args.chunk_size} "
                  f"--schedule {args.schedule}`", ""]
    markdown = "\n".join(lines)
    print(markdown)
    name = f"pipeline_bubble-pp{args.stages}" + (
        "" if args.schedule == "1f1b" else f"-{args.schedule}")
    save(name, {"machine": machine(), "args": vars(args),
                                              "steps": rows}, markdown)


if __name__ == "__main__":
    main()
