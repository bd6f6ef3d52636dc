"""Measure one method configuration at one maximum length, in this (fresh) process.

    python -m chunkflow.bench.worker '{"method": {...}, "max_len": 4096, ...}'

prints one JSON line. The sweep starts one process per configuration so that each one's peak
memory is its own: on CPU the high-water mark of the resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` after a warm-up step), on CUDA ``max_memory_allocated``; either is
reported above the memory held after the warm-up (weights, gradients, AdamW state, libraries),
which is the same for every method.

A step is forward + backward of a global batch (every micro-batch), then ``AdamW.step()``. Padded
micro-batches all have the same shape, so with ``max_micro_batches`` only that many run and the
step time counts each of the rest at their mean time (the padded baseline at 32K would otherwise
take most of the benchmark's time budget).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from chunkflow.bench.methods import MethodConfig, build_runner
from chunkflow.bench.workload import count_tokens, get_model_config, global_batch, model_flops
from chunkflow.models import Transformer
from chunkflow.models.families import model_shape

_WARMUP_SEED = 1_000_000  # the warm-up batch is never one of the measured ones
_WARMUP_MAX_LEN = 4096


class PeakMemory:
    """High-water mark of this process's memory since :meth:`reset`, in bytes above the reset."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("measuring CPU peak memory needs Linux (/proc/self/clear_refs); "
                               "run the benchmark on Linux or on a CUDA device")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the kernel resets VmHWM to the current RSS
            self.base = _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _status_bytes("VmHWM") - self.base


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(spec: dict) -> dict:
    """Warm up, then time ``spec["steps"]`` training steps; return the figures."""
    config = MethodConfig(**spec["method"])
    model_config = get_model_config(spec["model"])
    shape = model_shape(model_config)
    device = torch.device(spec.get("device", "cpu"))
    bf16 = spec.get("dtype", "float32") == "bfloat16"
    torch.manual_seed(0)
    runner = build_runner(config, Transformer(model_config).to(device), shape,
                          time_actions=spec.get("time_actions", False))
    optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-5)
    max_micro = spec.get("max_micro_batches") if config.method == "pad" else None
    meter = PeakMemory(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step(batch):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            stats = runner.step(batch, max_micro_batches=max_micro)
        sync()
        mid = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        sync()
        return stats, mid - start, time.perf_counter() - mid

    # Allocates gradients and optimizer state, starts thread pools and brings the first steps'
    # slowness (a third slower at 4K on CPU) out of the measurement; capped to stay cheap.
    train_step(global_batch(min(_WARMUP_MAX_LEN, spec["max_len"]), spec["num_sequences"],
                            seed=_WARMUP_SEED, vocab_size=model_config.vocab_size))
    meter.reset()
    if hasattr(runner, "action_seconds"):
        runner.action_seconds.clear()  # the warm-up's do not count
    steps = []
    for i in range(spec["steps"]):
        batch = global_batch(spec["max_len"], spec["num_sequences"], seed=spec["seed"] + i,
                             vocab_size=model_config.vocab_size)
        stats, fb_seconds, opt_seconds = train_step(batch)
        tokens, supervised = count_tokens(batch)
        steps.append({
            "seconds": fb_seconds * stats.micro_batches / stats.micro_batches_run + opt_seconds,
            "forward_backward_seconds": fb_seconds, "optimizer_seconds": opt_seconds,
            "loss": stats.loss if stats.micro_batches_run == stats.micro_batches else None,
            "micro_batches_run": stats.micro_batches_run, "micro_batches": stats.micro_batches,
            "tokens": tokens, "supervised_tokens": supervised,
            "model_flops": model_flops(shape, [len(ex["input_ids"]) for ex in batch]),
            "executed_flops": stats.executed_flops})
    out = {"spec": spec, "label": config.label, "peak_bytes": meter.peak(),
           "base_bytes": meter.base, "steps": steps}
    if getattr(runner, "action_seconds", None):  # per action kind, measured steps only
        out["action_seconds"] = runner.action_seconds
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m chunkflow.bench.worker SPEC_JSON")
    print(json.dumps(measure(json.loads(argv[0]))))


if __name__ == "__main__":
    main()
