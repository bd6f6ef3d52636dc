"""The layouts users run, by ``chunkflow plan --dry-run`` (the real step on fake tensors), with
the analytic planner's figure beside each (issue 24, section 3).

    python benchmarks/dry_run_cases.py [--cases 1,2,3,4,5] [--analytic-only]

Each case is one ``chunkflow plan --dry-run`` command (printed, and in the table) on the
published Qwen2.5 config.json files in ``benchmarks/configs/``; nothing is downloaded. The
analytic figure is ``chunkflow.plan.cost``'s layout model (``plan --auto``'s) for the
multi-GPU layouts and ``chunkflow.plan.memory``'s step estimate (``chunkflow plan``'s and
``--chunking.auto``'s) for one GPU; "analytic / dry run" is their ratio. ``--analytic-only``
recomputes the analytic columns of the day's saved rows without running the dry runs again.
Saves ``results/dry_run_cases-<date>.md``/``.json``.
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
                analytic=dict(tp=1, pp=1, dp=8, chunk=c, checkpointing=ckpt),
                sweep=("1", ckpt))
           for ckpt in (False, True) for c in (32768, 16384, 8192, 4096, 2048, 1024)]
    return {
        "1": one,
        "2": [dict(title=f"7B LoRA r16, 128K, 1 x H100, {dtype} base weights"
                         f"{', activation checkpointing' if ckpt else ''}",
                   flags=[m7, "--lora.rank=16", "--lengths=131072", "--chunking.chunk_size=8192",
                          f"--model.dtype={dtype}",
                          f"--chunking.activation_checkpointing={str(ckpt).lower()}"],
                   analytic="one GPU")
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
                   analytic="one GPU")
              for dtype, ckpt in (("float32", False), ("bfloat16", True))],
    }


def analytic(run: dict, flags: list[str]) -> tuple[float, float]:
    """(peak bytes per GPU, step seconds) by the analytic models: the layout model for several
    GPUs, the step estimate (``chunkflow plan``'s, with bf16 autocast as on CUDA) for one."""
    from chunkflow.cli import build_parser
    from chunkflow.plan import build_chunks
    from chunkflow.plan.auto import Settings, step_seconds
    from chunkflow.plan.cost import CostModel, get_gpu
    from chunkflow.plan.lengths import parse_lengths
    from chunkflow.plan.memory import estimate_peak_memory, state_extra_rows
    from chunkflow.sim.tune import predict_chunkflow
    from chunkflow.train.arguments import config_from_args
    from chunkflow.train.build import configured_shape, trainable_params

    spec = run["analytic"]
    args, unknown = build_parser().parse_known_args(["plan", *flags])
    cfg = config_from_args(args, unknown)
    lengths = parse_lengths(args.lengths)
    shape, c = configured_shape(cfg), cfg.chunking
    if spec == "one GPU":
        param_bytes = {"float32": 4, "bfloat16": 2}[cfg.param_dtype()]
        plan = build_chunks(lengths, chunk_size=c.chunk_size,
                            pack_chain_tails=c.pack_chain_tails)
        est = estimate_peak_memory(
            shape, plan, k=c.k, param_bytes=param_bytes, activation_bytes=2,
            recompute=c.recompute, offload=c.offload,
            activation_checkpointing=c.activation_checkpointing,
            state_extra_rows=state_extra_rows(c.attention_backend, "cuda", 2, c.chunk_size),
            trainable_params=trainable_params(cfg))
        cost = CostModel(shape, get_gpu("h100-80gb"))
        settings = Settings(c.chunk_size, c.k, c.recompute, c.activation_checkpointing,
                            c.offload)
        return est.total, step_seconds(cost, plan, settings)
    cost = CostModel(shape, get_gpu("h100-80gb"), tp=spec["tp"], pp=spec["pp"], dp=spec["dp"],
                     gathered_inputs=True,
                     recompute="full" if spec.get("checkpointing") else "none")
    pred = predict_chunkflow(cost, lengths, chunk_size=spec["chunk"], k=c.k)
    return pred.peak_memory_bytes, pred.iteration_seconds


def seconds(s) -> str:
    return "-" if s is None else f"{s:.2f} s"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def main(argv=None) -> int:
    from chunkflow.cli import main as chunkflow

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1,2,3,4,5")
    parser.add_argument("--analytic-only", action="store_true",
                        help="recompute the analytic columns of the day's saved rows")
    args = parser.parse_args(argv)
    if args.analytic_only:
        return analytic_only()
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


def analytic_only() -> int:
    """The day's saved dry runs with their analytic columns computed again (the analytic
    models changed; the dry runs did not)."""
    payload = json.loads((RESULTS / f"dry_run_cases-{machine()['date']}.json").read_text())
    runs = {(case, run["title"]): run for case, rs in cases().items() for run in rs}
    for row in payload["runs"]:
        row["analytic_peak"], row["analytic_step_s"] = analytic(
            runs[row["case"], row["title"]], runs[row["case"], row["title"]]["flags"])
    write([{k: v for k, v in r.items() if k != "result"} for r in payload["runs"]], payload)
    return 0


def ratio(a, b) -> str:
    return "-" if a is None else f"{a / b:.2f}"


def write(rows: list[dict], payload: dict) -> None:
    rows = sorted(rows, key=lambda r: r["case"])
    lines = [f"# Dry runs of the layouts users run ({payload['machine']['date']})", "",
             f"machine: {payload['machine']}", "",
             "| case | fits | peak / GPU | host pinned | step (roofline) | MFU | analytic peak "
             "| analytic / dry run | analytic step | dry run took |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']}. {r['title']} | {'yes' if r['fits'] else 'NO'} | "
                     f"{gib(r['peak'])} | {gib(r['host'])} | {r['step_s']:.2f} s | "
                     f"{r['mfu']:.0%} | {gib(r['analytic_peak'])} | "
                     f"{ratio(r['analytic_peak'], r['peak'])} | "
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
