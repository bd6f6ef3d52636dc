"""``chunkflow bench``: every method over a sweep of maximum lengths, side by side in one run.

For each maximum length the sweep measures (one fresh process each, :mod:`chunkflow.bench.worker`):

* the table's rows: chunkflow at (``--chunk-size``, ``--k``); Megatron-style padding to the max
  length (mbs 1); Megatron-style packing with full recompute; HF flattened batches with and
  without gradient checkpointing; the ideal (packed, no recompute);
* with ``--memory-budget``, each method's other configurations, to pick its fastest that fits
  (the paper took Megatron-LM's best non-out-of-memory configuration the same way); chunkflow's
  are the auto-tuner's best three within the budget (what ``--chunking.auto`` would pick). A
  configuration that only adds recompute to one that fits is skipped: it cannot be faster.

Then it writes ``bench-<hardware>-<date>.json`` (every raw measurement), ``.md`` and ``.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from chunkflow.bench import report
from chunkflow.bench.options import BUDGET_METHODS, BenchOptions, MethodConfig

def table_rows(o: BenchOptions) -> list[tuple[str, MethodConfig]]:
    """The main table: each method the issue names, at its usual configuration."""
    hf = o.hf_micro_batch
    return [("chunkflow", MethodConfig("chunkflow", chunk_size=o.chunk_size, k=o.k)),
            ("Megatron padded", MethodConfig("pad")),
            ("Megatron packed", MethodConfig("packed", recompute=True)),
            ("HF flattened", MethodConfig("hf", micro_batch=hf)),
            ("HF flattened", MethodConfig("hf", micro_batch=hf, recompute=True)),
            ("ideal", MethodConfig("packed"))]


AUTO_CANDIDATES = 3
"""chunkflow's configurations measured for the budget table: the auto-tuner's best ones."""


def auto_candidates(o: BenchOptions, max_len: int) -> list[MethodConfig]:
    """chunkflow's fastest ``AUTO_CANDIDATES`` settings within the budget, as
    ``--chunking.auto`` (:func:`chunkflow.plan.auto.choose_settings`) ranks them for this model,
    dtype and the sweep's batches at ``max_len``. The bench measures step memory above the
    static part, so the tuner gets the budget plus weights, gradients and AdamW state (float32).
    Offload is not benchmarked. None fits: an empty list."""
    from chunkflow.bench.workload import batch_lengths, get_model_config
    from chunkflow.plan.auto import choose_settings
    from chunkflow.models.families import model_shape
    from chunkflow.plan.cost import CPU_PROFILE, GPU_PROFILES

    shape = model_shape(get_model_config(o.model))
    batches = [batch_lengths(max_len, o.num_sequences, seed=o.seed + i)
               for i in range(o.steps_at(max_len))]
    try:
        choices = choose_settings(
            shape, batches, memory_budget=o.memory_budget + 16 * shape.num_params,
            profile=CPU_PROFILE if o.device == "cpu" else GPU_PROFILES["h100-80gb"],
            param_bytes=4, activation_bytes=2 if o.dtype == "bfloat16" else 4,
            max_length=max_len)
    except ValueError:
        return []
    return [MethodConfig("chunkflow", chunk_size=c.settings.chunk_size, k=c.settings.k,
                         selective=c.settings.recompute == "selective",
                         recompute=c.settings.activation_checkpointing)
            for c in choices[:AUTO_CANDIDATES]]


def budget_candidates(o: BenchOptions, max_len: int) -> dict[str, list[MethodConfig]]:
    """Each method's configurations for the budget table, faster-first within a method
    (chunkflow's from the auto-tuner)."""
    return {"chunkflow": auto_candidates(o, max_len),
            "Megatron padded": [MethodConfig("pad"), MethodConfig("pad", recompute=True)],
            "Megatron packed": [MethodConfig("packed"), MethodConfig("packed", recompute=True)],
            "HF flattened": [MethodConfig("hf", micro_batch=o.hf_micro_batch, recompute=r)
                             for r in (False, True)],
            "ideal": [MethodConfig("packed")]}


# glibc serves allocations of at least this many bytes with their own mmap and returns them to
# the system on free. Its default threshold adapts upwards (to 32 MiB) as large tensors are freed,
# after which freed activations stay in the heap and the resident set reports the allocator's
# history rather than the live tensors: the same configuration then peaks 40% higher after other
# micro-batches ran. A fixed threshold makes the CPU peak comparable across methods.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "chunkflow.bench.worker", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **_MALLOC_ENV})
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
    error = lines[-1]
    if proc.returncode == -9:
        error = "killed (SIGKILL: out of host memory?)"
    elif "OutOfMemoryError" in proc.stderr:
        error = "out of memory"
    return {"spec": spec, "label": MethodConfig(**spec["method"]).label, "error": error[:200]}


def _peak_flops(o: BenchOptions, info: dict) -> float | None:
    """bf16 dense peak of a known GPU, for MFU; None on CPU."""
    if o.device != "cuda":
        return None
    from chunkflow.plan.cost import GPU_PROFILES

    name = info.get("gpu", "").lower()
    for key, profile in GPU_PROFILES.items():
        if key.split("-")[0] in name:
            return profile.peak_flops
    return None


def run(o: BenchOptions, *, log=print, worker=_run_worker) -> Path:
    """Measure, then write the JSON, markdown and PNG; return the markdown's path.

    ``worker(spec) -> result``: measures one configuration (default: in a fresh process).
    """
    info = report.machine()
    if o.device == "cuda" and "gpu" not in info:
        raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu")
    peak_flops = _peak_flops(o, info)
    results: dict[tuple[int, MethodConfig], dict] = {}  # raw, for the JSON
    summaries: dict[tuple[int, MethodConfig], dict] = {}
    budget_mib = o.memory_budget / report.MiB if o.memory_budget else None
    start = time.perf_counter()

    def measure(max_len: int, config: MethodConfig) -> dict:
        key = (max_len, config)
        if key not in results:
            spec = {"method": asdict(config), "model": o.model, "max_len": max_len,
                    "num_sequences": o.num_sequences, "steps": o.steps_at(max_len),
                    "seed": o.seed, "device": o.device, "dtype": o.dtype,
                    "max_micro_batches": o.pad_micro_batches}
            results[key] = worker(spec)
            summaries[key] = s = report.summarise(results[key], peak_flops=peak_flops)
            figures = (f"failed: {s['error']}" if "error" in s else
                       f"{s['tokens_per_second']:8.0f} tok/s, step {s['step_seconds']:7.2f} s, "
                       f"peak {s['peak_mib']:7.0f} MiB, work {s['work']:.2f}")
            log(f"[{time.perf_counter() - start:6.0f} s] max {max_len:6d}  "
                f"{s['label']:44s} {figures}")
        return summaries[key]

    tables, choices = {}, {}
    for max_len in o.lengths:
        tables[max_len] = [measure(max_len, c) for _, c in table_rows(o)]
        if budget_mib is None:
            continue
        choices[max_len] = {}
        for method, candidates in budget_candidates(o, max_len).items():
            fitting: dict[MethodConfig, dict] = {}
            for c in candidates:
                if c.recompute and MethodConfig(**{**asdict(c), "recompute": False}) in fitting:
                    continue  # recompute on top of a configuration that fits is only slower
                r = measure(max_len, c)
                if "error" not in r and r["peak_mib"] <= budget_mib:
                    fitting[c] = r
            choices[max_len][method] = max(fitting.values(), default=None,
                                           key=lambda r: r["tokens_per_second"])
    elapsed = time.perf_counter() - start
    return _write(o, info, results, tables, choices, budget_mib, elapsed, log)


def _write(o, info, results, tables, choices, budget_mib, elapsed, log) -> Path:
    out = Path(o.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{report.hardware_slug(info, o.device)}-{info['date']}"
    command = command_line(o)
    where = (f"{info.get('gpu', '')} " if o.device == "cuda" else "") + (
        f"{info['cpu']}, {info['cpu_threads']} threads; torch {info['torch']}, "
        f"transformers {info['transformers']}; {info['platform']}")
    md = [f"# chunkflow vs baselines, {info['date']}", "",
          f"`{command}` ({elapsed / 60:.1f} min). Machine: {where}.", "",
          f"Model `{o.model}` ({o.dtype}), global batches of {o.num_sequences} sequences: one of "
          f"the maximum length, the rest LMSys-like. Measured steps per configuration after a "
          f"warm-up step: "
          + ", ".join(f"{o.steps_at(n)} at {n}" for n in o.lengths)
          + " (each on a new global batch; throughput is their total tokens over their total "
          f"time), every configuration in its own process. Peak memory: the step's high-water "
          f"mark above weights, gradients and optimizer state ("
          f"{'max_memory_allocated' if o.device == 'cuda' else 'resident set, VmHWM'}). "
          f"Work: FLOPs computed (padding, recompute, masked attention pairs included) over "
          f"the model FLOPs of the real tokens. *: padded micro-batches all have one shape; "
          f"{o.pad_micro_batches} per step ran and the step time counts the rest at their "
          f"mean."]
    md += ["", "Where the differences come from: padding computes every sequence at the maximum "
           "length; full recompute and gradient checkpointing run each layer's forward twice; "
           "transformers with SDPA on a flattened row builds a dense T x T mask and computes all "
           "T^2 query/key pairs; chunkflow recomputes the forward of a chain's first N-K chunks "
           "and keeps one chunk's activations plus the chain's keys/values; the ideal does "
           "exactly the model FLOPs but holds every activation of its longest micro-batch."]
    md += report.memory_summary(tables[max(o.lengths)], max(o.lengths))
    for max_len in o.lengths:
        rows = tables[max_len]
        md += ["", f"## maximum length {max_len}", ""] + report.method_table(rows, rows[0])
    if budget_mib is not None:
        md += ["", f"## within a memory budget of {budget_mib:.0f} MiB", "",
               "Each method's fastest measured configuration whose peak fits; the others it "
               "tried are in the JSON."]
        for max_len in o.lengths:
            md += ["", f"### maximum length {max_len}", ""]
            md += report.budget_table(choices[max_len], budget_mib)
    text = "\n".join(md) + "\n"
    stem.with_suffix(".md").write_text(text)
    raw = [{"max_len": n, **r} for (n, _), r in results.items()]
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "command": command, "options": asdict(o), "elapsed_s": elapsed,
         "measurements": raw}, indent=1) + "\n")
    labels = [c.label for _, c in table_rows(o)]
    series = {label: [tables[n][i] for n in o.lengths] for i, label in enumerate(labels)}
    budget_series = ({f: [choices[n][f] for n in o.lengths] for f in BUDGET_METHODS}
                     if budget_mib is not None else None)
    report.plot(stem.with_suffix(".png"), list(o.lengths), series, budget_series, budget_mib,
                f"{command}  ({info['date']}, {where.split(';')[0]})")
    log(text)
    log(f"saved {stem}.md, .json and .png")
    return stem.with_suffix(".md")


def command_line(o: BenchOptions) -> str:
    """The ``chunkflow bench`` command that reproduces ``o``'s table."""
    defaults, parts = BenchOptions(), ["chunkflow bench"]
    for name, value in asdict(o).items():
        if value != getattr(defaults, name) and name != "output_dir":
            if name == "lengths":
                value = ",".join(str(n) for n in value)
            elif name == "memory_budget":
                value = "none" if value is None else f"{value / report.MiB:.0f}MiB"
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)
