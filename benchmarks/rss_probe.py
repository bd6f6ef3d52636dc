"""Rise of process peak RSS during one training step, measured in a fresh process.

    python benchmarks/rss_probe.py {chunkflow|full} SEQ_LEN [--chunk-size 2048] [--k 1]

Prints one JSON line: {"mode", "seq_len", "rss_rise_bytes", "peak_memory_bytes", "step_seconds"}.
The RSS rise is that of the first step; ``step_seconds`` is the fastest of ``--repeats`` steps
(single steps on a shared machine are noisy).
``peak_memory_bytes`` is chunkflow's CPU meter (bytes saved for backward + KV state), applied to
plain training too, so the two modes are counted the same way. The model is
float32, 4 layers, hidden 256 (the issue's reference shape), 8 query heads and ``--kv-heads`` key/value
heads (default 2, GQA as in the Qwen2.5 family). Linux only: the peak (VmHWM) is reset
through /proc/self/clear_refs after a warm-up step, so the rise excludes one-off allocations
(parameter gradients, thread pools).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from chunkflow import ChunkFlowEngine
from chunkflow.models import ModelConfig, Transformer
from chunkflow.runtime.memory import MemoryMeter



def model_config(kv_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=kv_heads)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(mode: str, seq_len: int, *, chunk_size: int, k: int, kv_heads: int,
            repeats: int = 1) -> dict:
    torch.manual_seed(0)
    config = model_config(kv_heads)
    model = Transformer(config)
    engine = ChunkFlowEngine(model, chunk_size=chunk_size, k=k)

    def step(n: int):
        ids = torch.randint(0, config.vocab_size, (n,))
        if mode == "chunkflow":
            return engine.forward_backward([ids]).peak_memory_bytes
        meter = MemoryMeter()
        meter.reset(exclude=list(model.parameters()))
        with meter.hooks():
            logits = model(ids[None])[0]
            loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
        del logits
        loss.backward()
        return meter.peak

    step(64)  # warm-up: allocates .grad tensors and thread-local buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    peak = step(seq_len)
    seconds = time.perf_counter() - start
    rise = (_status_kib("VmHWM") - before) * 1024
    for _ in range(repeats - 1):
        start = time.perf_counter()
        step(seq_len)
        seconds = min(seconds, time.perf_counter() - start)
    return {"mode": mode, "seq_len": seq_len, "rss_rise_bytes": rise, "peak_memory_bytes": peak,
            "step_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["chunkflow", "full"])
    parser.add_argument("seq_len", type=int)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="steps timed (fastest wins)")
    args = parser.parse_args()
    print(json.dumps(measure(args.mode, args.seq_len, chunk_size=args.chunk_size, k=args.k,
                             kv_heads=args.kv_heads, repeats=args.repeats)))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
