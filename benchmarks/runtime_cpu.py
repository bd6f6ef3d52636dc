"""CPU measurements of the runtime's hot path (issue 14), each in fresh processes.

    python benchmarks/runtime_cpu.py step --repeats 4 [--baseline-tree DIR]
    python benchmarks/runtime_cpu.py loss
    python benchmarks/runtime_cpu.py checkpointing
    python benchmarks/runtime_cpu.py blocks
    python benchmarks/runtime_cpu.py recompute --repeats 4 [--max-len 32768]

* ``step``: chunkflow (chunk 2048, K=1) against the ideal (packed, nothing recomputed) at 32K on
  ``chunkflow bench``'s model and batches, through its worker; configurations alternate A B A B
  (and, with ``--baseline-tree``, the same two from another checkout, e.g. the commit before a
  change), since single runs here vary by 10-15%.
* ``loss``: peak RSS rise of one loss step (forward + backward of the output head and the
  cross-entropy) at vocabulary 152064, hidden 896, chunk 8192, float32: full logits against the
  fused linear cross-entropy.
* ``checkpointing``: peak RSS rise of a chunkflow step at chunk 8192 with and without
  ``activation_checkpointing`` (8-layer Qwen2.5-0.5B-shaped layers, vocabulary 32768).
* ``blocks``: step time of the CPU flash kernel with prefix blocks of 1, 2 and 4 chunks.
* ``recompute`` (issue 15): chunkflow (chunk 2048, K=1) with full and with selective recompute,
  the ideal and Megatron-style packing with full recompute, on ``chunkflow bench``'s model and
  32K batch, alternating A B C D over the repeats: step times, and the time of chunkflow's
  recompute (``R``/``r``) and state-forward (``S``/``s``) actions through the engine's action
  hook; next to the cost model's prediction (``chunkflow.plan.auto``, CPU profile).

Results are printed and saved as ``benchmarks/results/runtime_cpu-<what>-<date>.{md,json}``.
Every process runs with glibc's mmap threshold fixed at 1 MiB, as the bench worker does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _run(code_or_args: list[str], tree: Path = ROOT) -> dict:
    env = {**os.environ, **ENV, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True,
                         env=env, cwd=tree)
    if out.returncode != 0:
        raise SystemExit(f"{code_or_args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step(args) -> tuple[str, dict]:
    specs = {
        "chunkflow (2048, K=1)": {"method": "chunkflow", "chunk_size": 2048, "k": 1},
        "ideal": {"method": "packed", "recompute": False},
    }
    if args.only:
        specs = {name: spec for name, spec in specs.items() if name.startswith(args.only)}
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        for tree_name, tree in trees.items():
            for name, method in specs.items():
                spec = {"method": method, "model": "cpu", "max_len": args.max_len,
                        "num_sequences": 16, "steps": 1, "seed": 0}
                result = _run(["-m", "chunkflow.bench.worker", json.dumps(spec)], tree)
                seconds = result["steps"][0]["seconds"]
                times.setdefault((tree_name, name), []).append(seconds)
                print(f"round {r + 1}: {tree_name}, {name}: {seconds:.2f} s", flush=True)
    rows = [f"| tree | method at {args.max_len // 1024}K | mean step (s) | runs (s) | "
            f"speed vs the ideal | this tree / baseline, per round |",
            "|---|---|---|---|---|---|"]
    for tree_name in trees:
        ideal = times.get((tree_name, "ideal"))
        for name in specs:
            t = times[(tree_name, name)]
            runs = ", ".join(f"{x:.1f}" for x in t)
            vs_ideal = f"{statistics.mean(ideal) / statistics.mean(t):.3f}x" if ideal else ""
            pairs = ""
            if tree_name == "this tree" and "baseline" in trees:
                ratios = [a / b for a, b in zip(t, times[("baseline", name)])]
                pairs = (f"{statistics.mean(ratios):.3f} (min {min(ratios):.3f}, max "
                         f"{max(ratios):.3f})")
            rows.append(f"| {tree_name} | {name} | {statistics.mean(t):.2f} | {runs} | "
                        f"{vs_ideal} | {pairs} |")
    return "\n".join(rows), {f"{a} / {b}": v for (a, b), v in times.items()}


_LOSS = """
import json, torch
from chunkflow.runtime.head_loss import head_loss
from chunkflow.bench.worker import PeakMemory
torch.manual_seed(0)
n, e, v = 8192, 896, 152064
head = torch.nn.Linear(e, v, bias=False)
hidden = torch.randn(n, e, requires_grad=True)
targets = torch.randint(0, v, (n,))
weights = torch.full((n,), 1.0 / n)
budget = {budget}
meter = PeakMemory(torch.device("cpu"))
meter.reset()
import time
t0 = time.perf_counter()
loss = head_loss(hidden, head, targets, weights, logits_budget=budget)
loss.backward()
print(json.dumps({{"peak_bytes": meter.peak(), "seconds": time.perf_counter() - t0,
                  "loss": float(loss)}}))
"""


def loss(args) -> tuple[str, dict]:
    results = {}
    for name, budget in (("full logits", 1 << 62), ("fused (256 MiB blocks)", 256 << 20)):
        results[name] = _run(["-c", _LOSS.format(budget=budget)])
        print(name, results[name], flush=True)
    plain = results["full logits"]["peak_bytes"]
    rows = ["| loss step (8192 x 896 -> 152064, float32) | peak RSS rise (MiB) | vs full | "
            "seconds | loss |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / plain:.3f} "
                    f"| {r['seconds']:.1f} | {r['loss']:.6f} |")
    return "\n".join(rows), results


_STEP = """
import json, torch
from chunkflow import ChunkFlowEngine
from chunkflow.bench.worker import PeakMemory
from chunkflow.models import ModelConfig, Transformer
from chunkflow.runtime.attention.cpu_flash import CPUFlashKernel
torch.manual_seed(0)
config = ModelConfig(vocab_size=32768, hidden_size=896, intermediate_size=4864,
                     num_hidden_layers={layers}, num_attention_heads=14, num_key_value_heads=2)
model = Transformer(config)
engine = ChunkFlowEngine(model, chunk_size={chunk}, k=1,
                         attention_backend=CPUFlashKernel(prefix_block={block}),
                         activation_checkpointing={ckpt})
batch = [torch.randint(0, 32768, ({length},))]
engine.forward_backward([torch.randint(0, 32768, (256,))])  # warm-up, gradients allocated
meter = PeakMemory(torch.device("cpu"))
meter.reset()
import time
t0 = time.perf_counter()
result = engine.forward_backward(batch)
print(json.dumps({{"peak_bytes": meter.peak(), "seconds": time.perf_counter() - t0,
                  "meter_bytes": result.peak_memory_bytes, "loss": float(result.loss)}}))
"""


def checkpointing(args) -> tuple[str, dict]:
    results = {}
    for ckpt in (False, True):
        results[str(ckpt)] = _run(["-c", _STEP.format(layers=8, chunk=8192, block=None,
                                                      ckpt=ckpt, length=16384)])
        print(ckpt, results[str(ckpt)], flush=True)
    off = results["False"]["peak_bytes"]
    rows = ["| chunk 8192, K=1, one 16K sequence, 8 layers (hidden 896) | peak RSS rise (MiB) | "
            "vs off | seconds | loss |", "|---|---|---|---|---|"]
    for ckpt, r in results.items():
        name = "activation checkpointing" if ckpt == "True" else "off"
        rows.append(f"| {name} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / off:.3f} | "
                    f"{r['seconds']:.1f} | {r['loss']:.6f} |")
    return "\n".join(rows), results


def blocks(args) -> tuple[str, dict]:
    results: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for mult in (1, 2, 4):
            out = _run(["-c", _STEP.format(layers=2, chunk=2048, block=2048 * mult, ckpt=False,
                                           length=16384)])
            results.setdefault(str(mult), []).append(out["seconds"])
            print(f"round {r + 1}: prefix blocks of {mult} chunk(s): {out['seconds']:.2f} s",
                  flush=True)
    base = statistics.mean(results["1"])
    rows = ["| prefix block (one 16K sequence, chunk 2048, K=1, 2 layers hidden 896) | "
            "mean step (s) | runs | vs 1 chunk |", "|---|---|---|---|"]
    for mult, t in results.items():
        rows.append(f"| {mult} chunk(s) | {statistics.mean(t):.2f} | "
                    f"{', '.join(f'{x:.2f}' for x in t)} | {base / statistics.mean(t):.3f}x |")
    return "\n".join(rows), results


def recompute(args) -> tuple[str, dict]:
    from chunkflow.bench.workload import batch_lengths, get_model_config
    from chunkflow.plan import build_chunks
    from chunkflow.plan.auto import Settings, step_seconds
    from chunkflow.plan.cost import CPU_PROFILE, CostModel, ModelShape

    n = args.max_len
    specs = {
        "chunkflow (2048, K=1), full recompute": {"method": "chunkflow", "chunk_size": 2048,
                                                  "k": 1},
        "chunkflow (2048, K=1), selective": {"method": "chunkflow", "chunk_size": 2048, "k": 1,
                                             "selective": True},
        "ideal: packed, no recompute": {"method": "packed", "recompute": False},
        "Megatron packed, full recompute": {"method": "packed", "recompute": True},
    }
    results: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for name, method in specs.items():
            spec = {"method": method, "model": "cpu", "max_len": n, "num_sequences": 16,
                    "steps": 1, "seed": 0, "time_actions": True}
            out = _run(["-m", "chunkflow.bench.worker", json.dumps(spec)])
            results.setdefault(name, []).append(out)
            print(f"round {r + 1}: {name}: {out['steps'][0]['seconds']:.2f} s "
                  f"{out.get('action_seconds', '')}", flush=True)

    def mean(name, key=None):
        runs = results[name]
        if key is None:
            return statistics.mean(x["steps"][0]["seconds"] for x in runs)
        return statistics.mean(sum(v for k, v in x["action_seconds"].items() if k in key)
                               for x in runs)

    lengths = batch_lengths(n, 16, seed=0)
    cost = CostModel(ModelShape.from_config(get_model_config("cpu")), CPU_PROFILE,
                     activation_bytes=4)
    predicted = {
        "chunkflow (2048, K=1), full recompute": step_seconds(
            cost, build_chunks(lengths, chunk_size=2048), Settings(2048, 1)),
        "chunkflow (2048, K=1), selective": step_seconds(
            cost, build_chunks(lengths, chunk_size=2048), Settings(2048, 1, "selective")),
        "ideal: packed, no recompute": step_seconds(cost, build_chunks(lengths, chunk_size=n),
                                                    Settings(n, 1)),
    }
    ideal, packed = mean("ideal: packed, no recompute"), mean("Megatron packed, full recompute")
    rows = [f"| {n // 1024}K, bench model, {args.repeats} alternating runs | mean step (s) | "
            f"runs (s) | vs ideal | vs packed + full recompute | model: vs ideal |",
            "|---|---|---|---|---|---|"]
    for name in specs:
        t = mean(name)
        runs = ", ".join(f"{x['steps'][0]['seconds']:.1f}" for x in results[name])
        model = (f"{predicted['ideal: packed, no recompute'] / predicted[name]:.3f}x"
                 if name in predicted else "")
        rows.append(f"| {name} | {t:.2f} | {runs} | {ideal / t:.3f}x | {packed / t:.3f}x | "
                    f"{model} |")
    full, sel = "chunkflow (2048, K=1), full recompute", "chunkflow (2048, K=1), selective"
    rows += ["", "| chunkflow's actions, mean per step (s) | full | selective | selective / "
             "full |", "|---|---|---|---|"]
    for label, key_full, key_sel in (("recompute (R vs r)", "R", "r"),
                                     ("state forward (S vs s)", "S", "s"),
                                     ("forward F", "F", "F"), ("backward B", "B", "B")):
        a, b = mean(full, key_full), mean(sel, key_sel)
        rows.append(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    return "\n".join(rows), results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("step", "loss", "checkpointing", "blocks", "recompute"))
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--baseline-tree", help="another checkout to measure beside this one")
    parser.add_argument("--max-len", type=int, default=32768,
                        help="step, recompute: longest sequence")
    parser.add_argument("--only", help="step: only the methods whose name starts so")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    table, raw = {"step": step, "loss": loss, "checkpointing": checkpointing,
                  "blocks": blocks, "recompute": recompute}[args.what](args)
    date = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    import torch

    text = (f"# runtime_cpu {args.what}: {machine}, torch {torch.__version__}, {date}\n\n"
            f"`python benchmarks/runtime_cpu.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n")
    print(text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sized = args.what in ("step", "recompute")
    stem = f"runtime_cpu-{args.what}{'-' + str(args.max_len) if sized else ''}-{date}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "date": date,
                                                  "results": raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
