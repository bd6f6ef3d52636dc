"""The prepared device check (``make gpu-check``): one script, a few minutes on one H100/H200.

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # on the GPU machine (its own torch)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke    # the same code paths on CPU, tiny

1. the ``gpu``-marked tests (real ``varlen_attn`` and the tiled math kernel against references);
2. a bf16 (autocast) training step of a Qwen2.5-0.5B-shaped model: chunkflow's loss and gradient
   norm against plain unchunked training of the same batch (within bf16 tolerance);
3. chunkflow's peak memory at chunk 8K for longest sequences of 32K and 128K (flat: at most 1.15x);
4. tokens/s and MFU of chunkflow against plain unchunked training of the same model with
   ``varlen_attn`` (the ideal: one packed chunk, nothing recomputed) and against Hugging Face
   transformers on ``DataCollatorWithFlattening`` batches (SDPA).

Tensor parallelism is not part of it: one GPU cannot hold two NCCL ranks. Its CUDA-specific
piece, attention over a sequence-parallel chunk's padding rows, is among the ``gpu`` tests.

It prints one table and saves it, with the GPU's name, torch's version and the date, as
``benchmarks/results/gpu_check-<gpu>-<date>.{md,json}``. A configuration that runs out of memory
is reported as such, not as a failure of the check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunkflow import ChunkFlowEngine  # noqa: E402
from chunkflow.models import Transformer, get_preset  # noqa: E402
from chunkflow.plan.cost import ModelShape, forward_flops  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def lengths_for(max_len: int, num_short: int, *, seed: int) -> list[int]:
    """One sequence of ``max_len`` tokens and ``num_short`` long-tailed short ones."""
    from chunkflow.plan.lengths import sample_lengths
    import random

    return [max_len, *sample_lengths(random.Random(seed), num_short, max_len=max(64, max_len // 8))]


def make_batch(lengths, vocab: int, device, *, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 5] = -100  # a prompt
        batch.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return batch


def model_flops(shape: ModelShape, lengths) -> float:
    """3 x the forward FLOPs of every sequence, nothing recomputed (MFU's numerator)."""
    return sum(3 * sum(forward_flops(shape, [n])) for n in lengths)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device, result=None) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return (result.peak_memory_bytes if result is not None else 0) / 2**30


def tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def memory(gib: float) -> str:
    return f"{gib:.1f} GiB peak" if gib >= 1 else f"{gib * 1024:.1f} MiB peak"


def grad_norm(model) -> float:
    return math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in model.parameters()
                         if p.grad is not None))


def run_gpu_tests(smoke: bool) -> str:
    if smoke:
        return "skipped (--smoke)"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    tail = (out.stdout.strip().splitlines() or ["(no output: failed)"])[-1]
    print(out.stdout[-3000:], out.stderr[-2000:], sep="\n")
    return tail if out.returncode == 0 else f"FAILED: {tail}"


def step(engine, batch, device):
    """One chunkflow step under bf16 autocast: (loss, seconds, peak GiB)."""
    peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        result = engine.forward_backward(batch)
    sync(device)
    return float(result.loss), time.perf_counter() - t0, peak(device, result)


def plain_loss(model, batch) -> torch.Tensor:
    """Unchunked training's token-mean loss: each sequence whole through the model (its own
    causal SDPA), labels shifted, -100 ignored."""
    total, count = 0.0, 0
    for item in batch:
        logits = model(item["input_ids"][None])[0]
        targets = item["labels"][1:]
        total = total + torch.nn.functional.cross_entropy(
            logits[:-1].float(), targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    return total / count


def plain_step(model, batch, device):
    peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = plain_loss(model, batch)
        loss.backward()
    sync(device)
    return float(loss), time.perf_counter() - t0, peak(device)


def hf_step(model, batch, device, micro_batch: int):
    """transformers' way: DataCollatorWithFlattening micro-batches, summed token-mean loss."""
    import transformers

    from chunkflow.models.hf_checkpoint import config_to_hf

    fields = config_to_hf(model.config, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(fields.pop("model_type"), **fields, use_cache=False),
        attn_implementation="sdpa").to(device)
    hf.load_state_dict(model.state_dict())
    hf.train()
    collator = transformers.DataCollatorWithFlattening(return_position_ids=True)
    num_items = sum(int((b["labels"][1:] != -100).sum()) for b in batch)
    peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(batch), micro_batch):
        inputs = collator([{"input_ids": b["input_ids"].tolist(), "labels": b["labels"].tolist()}
                           for b in batch[s:s + micro_batch]], return_tensors="pt")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = hf(**{k: v.to(device) for k, v in inputs.items()}, num_items_in_batch=num_items)
        out.loss.backward()
    sync(device)
    seconds = time.perf_counter() - t0
    del hf
    return seconds, peak(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny, on CPU: the code paths only")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not smoke:
        print("no CUDA device: run with --smoke for the CPU code-path check")
        return 2
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU {platform.machine()}")
    config = get_preset("qwen2.5-0.5b")
    chunk = 8192
    lengths_long = (32768, 131072)
    if smoke:
        config = config.replace(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                head_dim=16)
        chunk, lengths_long = 64, (256, 1024)
    shape = ModelShape.from_config(config)
    rows, notes = [], []
    print(f"device check on {gpu}, torch {torch.__version__}", flush=True)
    date = datetime.date.today().isoformat()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check-{'smoke' if smoke else gpu.replace(' ', '_')}-{date}"

    def save() -> str:
        """The table so far (rewritten after every row: a run cut short keeps what it had)."""
        header = (f"# Device check: {gpu}, torch {torch.__version__}, {date}\n\n"
                  f"Qwen2.5-0.5B shape ({config.num_hidden_layers} layers, hidden "
                  f"{config.hidden_size}, vocab {config.vocab_size}), bf16 autocast, chunk "
                  f"{chunk}, 15 long-tailed short sequences beside the longest.\n\n")
        table = "| check | result | | | |\n|---|---|---|---|---|\n" + "\n".join(
            "| " + " | ".join(r) + " |" for r in rows)
        text = header + table + ("\n\n" + "\n".join(f"* {n}" for n in notes)
                                 if notes else "") + "\n"
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(
            {"device": gpu, "torch": torch.__version__, "date": date, "rows": rows}, indent=1))
        return text

    def finish(code: int) -> int:
        print(save())
        print(f"saved {out / stem}.md")
        return code

    tests = run_gpu_tests(smoke)
    rows.append(("gpu tests", tests, "", "", ""))
    save()

    torch.manual_seed(0)
    model = Transformer(config).to(device)
    kernel = "auto"
    if device.type == "cuda":
        # varlen by name: if it cannot run, say so and stop, rather than time the slow math
        # fallback at 128K for an hour
        from chunkflow.runtime.attention import get_kernel
        from chunkflow.runtime.attention.select import self_check

        try:
            kernel = get_kernel("varlen", device, torch.bfloat16)
            failure = self_check(kernel, device, torch.bfloat16)
        except ValueError as e:
            failure = str(e)
        rows.append(("varlen self-check", "ok" if failure is None else f"FAILED: {failure}",
                     "", "", ""))
        save()
        if failure is not None:
            return finish(1)
    # 2. one bf16 step against plain training
    batch = make_batch(lengths_for(lengths_long[0] // 2, 15, seed=1), config.vocab_size, device)
    engine = ChunkFlowEngine(model, chunk_size=chunk, k=1, attention_backend=kernel)
    loss_c, _, _ = step(engine, batch, device)
    norm_c = grad_norm(model)
    model.zero_grad(set_to_none=True)
    loss_p, _, _ = plain_step(model, batch, device)
    norm_p = grad_norm(model)
    model.zero_grad(set_to_none=True)
    ok = abs(loss_c - loss_p) <= 1e-2 * abs(loss_p) and abs(norm_c - norm_p) <= 3e-2 * norm_p
    rows.append(("bf16 step vs plain", "ok" if ok else "MISMATCH",
                 f"loss {loss_c:.4f} vs {loss_p:.4f}", f"grad norm {norm_c:.3f} vs {norm_p:.3f}",
                 ""))
    save()

    # 3. peak memory vs longest sequence, 4. throughput against the ideal and HF
    peaks = {}
    for max_len in lengths_long:
        lens = lengths_for(max_len, 15, seed=2)
        batch = make_batch(lens, config.vocab_size, device, seed=3)
        flops = model_flops(shape, lens)
        for name, chunk_size, k in (("chunkflow", chunk, 1), ("chunkflow", chunk, 2),
                                    ("ideal (one packed varlen chunk)", sum(lens), 1)):
            if name.startswith("ideal") and max_len != lengths_long[0]:
                continue  # unchunked at the longest length does not fit
            engine = ChunkFlowEngine(model, chunk_size=chunk_size, k=k, attention_backend=kernel)
            try:
                step(engine, batch, device)  # warm-up (and the self-check, on the first)
                model.zero_grad(set_to_none=True)
                _, seconds, gib = step(engine, batch, device)
            except torch.cuda.OutOfMemoryError:
                rows.append((f"{name} {tokens(max_len)}", "out of memory", "", "", ""))
                continue
            finally:
                model.zero_grad(set_to_none=True)
            if name == "chunkflow" and k == 1:
                peaks[max_len] = gib
            label = f"{name} {tokens(max_len)}" + (f" chunk {tokens(chunk_size)} K={k}"
                                                    if name == "chunkflow" else "")
            mfu = flops / seconds / PEAK_BF16[next(g for g in PEAK_BF16 if g in gpu)] \
                if any(g in gpu for g in PEAK_BF16) else float("nan")
            rows.append((label, f"{sum(lens) / seconds:,.0f} tok/s", memory(gib),
                         f"MFU {mfu:.1%}" if mfu == mfu else "MFU n/a", f"{seconds:.2f} s"))
            save()
        if max_len == lengths_long[0]:
            try:
                seconds, gib = hf_step(model, batch, device, micro_batch=4)
                rows.append((f"HF flattened (mbs 4, SDPA, no flash-attn) {tokens(max_len)}",
                             f"{sum(lens) / seconds:,.0f} tok/s", memory(gib), "",
                             f"{seconds:.2f} s"))
            except torch.cuda.OutOfMemoryError:
                rows.append((f"HF flattened {tokens(max_len)}", "out of memory", "", "", ""))
            model.zero_grad(set_to_none=True)
    if len(peaks) == 2:
        ratio = peaks[lengths_long[1]] / peaks[lengths_long[0]]
        verdict = ("not judged (--smoke: the KV state dominates tiny models)" if smoke
                   else "ok" if ratio <= 1.15 else "NOT FLAT")
        rows.append((f"peak memory {tokens(lengths_long[1])} / {tokens(lengths_long[0])}",
                     verdict, f"{ratio:.2f}x (bound 1.15x)", "", ""))
        notes.append("peak: torch.cuda.max_memory_allocated (CPU smoke: the step meter)")

    # 5. recompute modes and offload at the longest length (issue 15): step time, peak, the
    # recompute actions' time (through the engine's action hook), bytes copied to the host
    lens = lengths_for(lengths_long[1], 15, seed=2)
    batch = make_batch(lens, config.vocab_size, device, seed=3)
    for recompute, offload in (("full", "none"), ("selective", "none"), ("full", "state"),
                               ("selective", "all")):
        engine = ChunkFlowEngine(model, chunk_size=chunk, k=1, attention_backend=kernel,
                                 recompute=recompute, offload=offload)
        recomputing = {"seconds": 0.0, "start": 0.0}

        def time_recompute(action, phase, acc=recomputing):
            if action.kind.value != "R":
                return
            sync(device)
            if phase == "start":
                acc["start"] = time.perf_counter()
            else:
                acc["seconds"] += time.perf_counter() - acc["start"]

        handle = engine.register_action_hook(time_recompute)
        try:
            step(engine, batch, device)  # warm-up
            model.zero_grad(set_to_none=True)
            recomputing["seconds"] = 0.0
            _, seconds, gib = step(engine, batch, device)
        except torch.cuda.OutOfMemoryError:
            rows.append((f"K=1 {recompute}, offload {offload} {tokens(lengths_long[1])}",
                         "out of memory", "", "", ""))
            continue
        finally:
            handle.remove()
            model.zero_grad(set_to_none=True)
        moved = (f"{engine.copier(device).bytes_to_host / 2**30:.2f} GiB to host"
                 if offload != "none" else "")
        rows.append((f"K=1 {recompute} recompute, offload {offload} {tokens(lengths_long[1])}",
                     f"{sum(lens) / seconds:,.0f} tok/s", memory(gib),
                     f"R actions {recomputing['seconds']:.2f} s of {seconds:.2f} s", moved))
        save()
    notes.append("R actions: the recomputes' time with a device sync around each; selective "
                 "ones skip the attention kernel")

    failed = any(r[1] in ("MISMATCH", "NOT FLAT") or r[1].startswith("FAILED") for r in rows)
    return finish(1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
