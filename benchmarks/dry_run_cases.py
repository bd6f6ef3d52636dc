"""The layouts users run, by ``chunkflow plan --dry-run`` (the real step on fake tensors), with
the analytic planner's figure beside each (issue 24, section 3).

    python benchmarks/dry_run_cases.py [--cases 1,2,3,4,5]

Each case is one ``chunkflow plan --dry-run`` command (printed, and in the table) on the
published Qwen2.5 config.json files in ``benchmarks/configs/``; nothing is downloaded. The
analytic figure is ``chunkflow.plan.cost``'s layout model (``plan --auto``'s) for full
fine-tunes without activation checkpointing; neither analytic model prices LoRA (frozen weights,
adapters' activations) or FSDP2's gathered weights with activation checkpointing, so those
rows have none. Saves ``results/dry_run_cases-<date>.md``/``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from common import RESULTS, machine, save  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
BATCH_32K = "32768,2000x63"  # a 32K sequence and 63 of 2K: 158K tokens per global batch
BATCH_32K_SMALL = "32768,2000x15"  # 62K tokens: one replica holds them all (TP x PP, DP 1)


def model(name: str) -> str:
    path = CONFIGS / name
    if path.is_relative_to(Path.cwd()):  # the README's commands run from the repository root
        path = path.relative_to(Path.cwd())
    return f"--model.path={path}"


def cases() -> dict[str, list[dict]]:
    """case id -> its dry runs (title, flags)."""
    m7, m32, m72 = model("qwen2.5-7b"), model("qwen2.5-32b"), model("qwen2.5-72b")
    fsdp8 = ["--gpus=8", "--parallel.data_parallel=fsdp", m7, f"--lengths={BATCH_32K}"]
    one = [dict(title=f"7B full, 32K, 8 x H100, FSDP2, chunk {c}"
                      f"{', activation checkpointing' if ckpt else ''}",
                flags=[*fsdp8, f"--chunking.chunk_size={c}",
                       f"--chunking.activation_checkpointing={str(ckpt).lower()}"],
                analytic=dict(tp=1, pp=1, dp=8, chunk=c) if not ckpt else None,
                sweep=("1", ckpt))
           for ckpt in (False, True) for c in (32768, 16384, 8192, 4096, 2048, 1024)]
    return {
        "1": one,
        "2": [dict(title=f"7B LoRA r16, 128K, 1 x H100, {dtype} base weights"
                         f"{', activation checkpointing' if ckpt else ''}",
                   flags=[m7, "--lora.rank=16", "--lengths=131072", "--chunking.chunk_size=8192",
                          f"--model.dtype={dtype}",
                          f"--chunking.activation_checkpointing={str(ckpt).lower()}"],
                   analytic=None)
              for dtype, ckpt in (("float32", False), ("bfloat16", False), ("bfloat16", True))],
        "3": [dict(title="32B full, 32K, 8 x H100, TP 4 x PP 2 (plan --auto's pick)",
                   flags=[m32, "--gpus=8", "--parallel.tp=4", "--parallel.pp=2",
                          "--chunking.chunk_size=2048", f"--lengths={BATCH_32K_SMALL}"],
                   analytic=dict(tp=4, pp=2, dp=1, chunk=2048))],
        "4": [dict(title="72B full, 32K, 32 x H100, TP 8 x PP 4",
                   flags=[m72, "--gpus=32", "--parallel.tp=8", "--parallel.pp=4",
                          "--chunking.chunk_size=4096", f"--lengths={BATCH_32K_SMALL}"],
                   analytic=dict(tp=8, pp=4, dp=1, chunk=4096))],
        "5": [dict(title=f"7B LoRA r16, one 1M-token sequence, 1 x H100, KV state offloaded, "
                         f"{dtype} base weights{', activation checkpointing' if ckpt else ''}",
                   flags=[m7, "--lora.rank=16", "--lengths=1048576", "--chunking.chunk_size=8192",
                          "--chunking.offload=state", f"--model.dtype={dtype}",
                          f"--chunking.activation_checkpointing={str(ckpt).lower()}"],
                   analytic=None)
              for dtype, ckpt in (("float32", False), ("bfloat16", True))],
    }


def analytic(run: dict, flags: list[str]) -> tuple[float | None, float | None]:
    """(peak bytes per GPU, step seconds) by the analytic models, or None where they do not
    model the case."""
    from chunkflow.cli import build_parser
    from chunkflow.plan.cost import CostModel, get_gpu
    from chunkflow.plan.lengths import parse_lengths
    from chunkflow.sim.tune import predict_chunkflow
    from chunkflow.train.arguments import config_from_args
    from chunkflow.train.build import model_shape

    spec = run["analytic"]
    if spec is None:
        return None, None
    args, unknown = build_parser().parse_known_args(["plan", *flags])
    cfg = config_from_args(args, unknown)
    lengths = parse_lengths(args.lengths)
    shape = model_shape(cfg)
    cost = CostModel(shape, get_gpu("h100-80gb"), tp=spec["tp"], pp=spec["pp"], dp=spec["dp"],
                     gathered_inputs=True)
    pred = predict_chunkflow(cost, lengths, chunk_size=spec["chunk"], k=cfg.chunking.k)
    return pred.peak_memory_bytes, pred.iteration_seconds


def seconds(s) -> str:
    return "-" if s is None else f"{s:.2f} s"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def main(argv=None) -> int:
    from chunkflow.cli import main as chunkflow

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1,2,3,4,5")
    args = parser.parse_args(argv)
    wanted = args.cases.split(",")
    payload = {"machine": machine(), "runs": []}
    earlier = RESULTS / f"dry_run_cases-{payload['machine']['date']}.json"
    if earlier.exists():  # the day's rows of the cases not run again now
        payload["runs"] = [r for r in json.loads(earlier.read_text())["runs"]
                           if r["case"] not in wanted]
    rows = [{k: v for k, v in r.items() if k != "result"} for r in payload["runs"]]
    fitted: dict = {}
    for case in wanted:
        for run in cases()[case]:
            sweep = run.get("sweep")
            if sweep and sweep in fitted:
                continue  # a larger chunk already fits with this setting
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "dry.json"
                command = ["plan", "--dry-run", *run["flags"], "--json", str(out)]
                print("chunkflow " + shlex.join(command[:-2]), flush=True)
                t0 = time.perf_counter()
                if chunkflow(command) != 0:
                    raise SystemExit(f"case {case} failed")
                wall = time.perf_counter() - t0
                result = json.loads(out.read_text())
            peak, step = analytic(run, run["flags"])
            if sweep and result["fits"]:
                fitted[sweep] = run
            row = dict(case=case, title=run["title"],
                       command="chunkflow " + shlex.join(command[:-2]), fits=result["fits"],
                       peak=result["peak_device_bytes"], host=result["host_pinned_bytes"],
                       step_s=result["predicted_step_s"], mfu=result["mfu"],
                       analytic_peak=peak, analytic_step_s=step, wall_s=wall,
                       breakdown=max(result["ranks"], key=lambda r: r["peak_device_bytes"])
                       ["breakdown"])
            rows.append(row)
            payload["runs"].append({**row, "result": result})
            write(rows, payload)
    return 0


def write(rows: list[dict], payload: dict) -> None:
    rows = sorted(rows, key=lambda r: r["case"])
    lines = [f"# Dry runs of the layouts users run ({payload['machine']['date']})", "",
             f"machine: {payload['machine']}", "",
             "| case | fits | peak / GPU | host pinned | step (roofline) | MFU | analytic peak "
             "| analytic step | dry run took |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']}. {r['title']} | {'yes' if r['fits'] else 'NO'} | "
                     f"{gib(r['peak'])} | {gib(r['host'])} | {r['step_s']:.2f} s | "
                     f"{r['mfu']:.0%} | {gib(r['analytic_peak'])} | "
                     f"{seconds(r['analytic_step_s'])} | "
                     f"{r['wall_s']:.0f} s |")
    lines += ["", "Commands:", ""] + [f"{r['case']}. `{r['command']}`" for r in rows]
    lines += ["", "Breakdown at the largest rank's peak (GiB):", ""]
    for r in rows:
        lines.append(f"{r['case']}. {r['title']}: " + ", ".join(
            f"{k} {v / 2**30:.1f}" for k, v in r["breakdown"].items()))
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    save("dry_run_cases", payload, markdown)


if __name__ == "__main__":
    sys.exit(main())
