"""The prepared device check (``make gpu-check``): one script, at most 8 minutes on one H100/H200.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--budget-s 480]  # on the GPU machine
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke           # the same code paths on CPU

A Qwen2.5-0.5B-shaped model in bf16 autocast, chunk 8K, each batch one long sequence and 15
long-tailed short ones. Sections, in order:

1. the ``gpu``-marked tests (real ``varlen_attn`` and the tiled math kernel against references);
2. the attention kernel's self-check with the model's heads (on failure the check stops rather
   than time the slow fallback at 128K);
3. a step at 16K against plain unchunked training (loss, gradient norm); also the run's warm-up;
4. peak memory at 32K and 128K (K=1), judged twice: the peak minus the chain's KV state (which
   grows with the length by design) flat within ``FLAT_BOUND``, and each peak against
   :func:`chunkflow.plan.memory.estimate_peak_memory` (``memory_range``, ``MODEL_TOLERANCE``);
5. K=2 at both lengths;
6. tokens/s and MFU at 16K: chunkflow, the ideal (one packed varlen chunk, nothing recomputed)
   and Hugging Face on ``DataCollatorWithFlattening`` batches (SDPA; the image has no
   flash-attn); 16K, not 32K, so that the unchunked baselines fit in 80 GB;
7. recompute modes and offload at 128K;
8. ``plan --dry-run``'s prediction (peak, roofline time) of the K=1 steps of 4, beside them.

Notable:

* every section is guarded: out of memory (or any error) is a row, memory is freed, and the
  script goes on; the table is rewritten after every row, so a run cut short keeps its rows;
* one warm-up for the run (section 3); after it each configuration is timed once, peaks reset
  with ``reset_peak_memory_stats`` and the allocator's cache kept (no cudaMalloc in the timing
  once the cache has grown);
* a time budget (``--budget-s``): each section is estimated from the rates measured so far and
  skipped, with a row saying so, if it would not finish in what is left;
* MFU against the exact product's dense bf16 peak (``chunkflow.plan.gpus``); an unknown GPU's MFU is
  reported unknown.

Tensor parallelism is not part of it: one GPU cannot hold two NCCL ranks. Its CUDA-specific
piece, attention over a sequence-parallel chunk's padding rows, is among the ``gpu`` tests.
Saves ``benchmarks/results/gpu_check-<gpu>-<date>.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import platform
import random
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunkflow import ChunkFlowEngine  # noqa: E402
from chunkflow.models import Transformer, get_preset  # noqa: E402
from chunkflow.plan import build_chunks  # noqa: E402
from chunkflow.plan.cost import ModelShape, forward_flops  # noqa: E402
from chunkflow.plan.lengths import sample_lengths  # noqa: E402
from chunkflow.plan.memory import estimate_peak_memory, kv_state_bytes  # noqa: E402
from chunkflow.plan.gpus import spec_for_device  # noqa: E402
from chunkflow.runtime import compiled  # noqa: E402
from chunkflow.runtime.head_loss import LOGITS_BUDGET  # noqa: E402

# ---- GPU peaks (MFU's denominator)

def peak_bf16(gpu_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, source) of exactly this product (``chunkflow.plan.gpus``, the table
    ``plan --dry-run`` prices with), or None: no guessing from a substring ("H100" is 989 TF as
    SXM5, 756 as PCIe)."""
    spec = spec_for_device(gpu_name)
    return None if spec is None else (spec.peak_bf16_flops, spec.source)


# ---- sizes and batches


@dataclass(frozen=True)
class Sizes:
    chunk_size: int
    baseline_len: int
    """Longest sequence of the step against plain training and of the ideal/HF baselines:
    unchunked, they must fit in 80 GB (the ideal at 32K is 34K tokens in one graph, 65-80 GB)."""
    memory_lens: tuple[int, int]
    """Longest sequences of the memory check (and of K=2; recompute modes at the second)."""
    num_short: int = 15


FULL = Sizes(chunk_size=8192, baseline_len=16384, memory_lens=(32768, 131072))
SMOKE = Sizes(chunk_size=64, baseline_len=128, memory_lens=(256, 1024))


def lengths_for(max_len: int, num_short: int, *, seed: int) -> list[int]:
    """One sequence of ``max_len`` tokens and ``num_short`` long-tailed short ones."""
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


# ---- the memory verdicts

ACTIVATION_BYTES = 2
"""bf16 autocast: keys/values (and the matmuls' outputs) in bf16, their gradients in float32."""
FLAT_BOUND = 1.15
"""Peak minus KV state, longest over shortest: what chunk size and K fix may grow this much
(the short sequences beside the longest grow with it; allocator rounding)."""
MODEL_TOLERANCE = 0.10
"""Measured peak within the estimate's range (all activations bf16 .. all float32: autocast
keeps the residual stream and norms in float32) widened by 10% either way."""


def chain_state_positions(lengths, chunk_size: int) -> int:
    """Positions of KV state a chain holds at its peak, largest over chains: those before its
    last chunk, as chunkflow.plan.memory counts them (0 without a chain)."""
    plan = build_chunks(lengths, chunk_size=chunk_size)
    return max((plan.chunks[c.chunk_ids[-1]].segments[0].start for c in plan.chains), default=0)


def kv_state(config, lengths, chunk_size: int) -> int:
    """Bytes of the chains' KV state (and its gradients) at the step's peak."""
    return kv_state_bytes(config, chain_state_positions(lengths, chunk_size),
                          activation_bytes=ACTIVATION_BYTES)


def fused_logits_overcount(config, num_tokens: int, chunk_size: int) -> int:
    """What estimate_peak_memory counts and the runtime does not hold: the float32
    log-probabilities of ``num_tokens`` tokens, when a chunk's logits exceed the head's
    ``LOGITS_BUDGET`` and the fused linear cross-entropy (which keeps none) takes over."""
    fused = chunk_size * config.vocab_size * 4 > LOGITS_BUDGET
    return num_tokens * 4 * config.vocab_size if fused else 0


def memory_range(config, lengths, *, chunk_size: int, k: int, static: bool) -> tuple[int, int]:
    """(low, high) estimated peak bytes: activations all bf16 .. all float32. ``static``: add
    weights and gradients (float32, no optimizer: what CUDA's allocator sees in this step;
    the low bound with autocast's bf16 weight copies);
    without it, the CPU meter's part (saved activations + KV state)."""
    plan = build_chunks(lengths, chunk_size=chunk_size)
    bounds = []
    for activation_bytes in (ACTIVATION_BYTES, 4):
        est = estimate_peak_memory(config, plan, k=k, param_bytes=4,
                                   activation_bytes=activation_bytes, optimizer="sgd")
        total = est.total if static else est.step
        bounds.append(total - fused_logits_overcount(config, est.peak_tokens, chunk_size))
    return bounds[0], bounds[1]


def flat_verdict(peaks: tuple[int, int], kv: tuple[int, int]) -> tuple[str, float]:
    """("ok" or "NOT FLAT", ratio of peak minus KV state, longest over shortest)."""
    ratio = (peaks[1] - kv[1]) / (peaks[0] - kv[0])
    return ("ok" if ratio <= FLAT_BOUND else "NOT FLAT"), ratio


def model_verdict(measured: int, low: int, high: int) -> str:
    ok = low * (1 - MODEL_TOLERANCE) <= measured <= high * (1 + MODEL_TOLERANCE)
    return "ok" if ok else "OFF MODEL"


# ---- the table, the budget, the guard

SKIPPED = "skipped: would not finish within the budget"
OUT_OF_MEMORY = "out of memory"
FAILURES = ("MISMATCH", "NOT FLAT", "OFF MODEL", "FAILED")


@dataclass
class Report:
    """The table so far, rewritten after every row (a run cut short keeps what it had)."""

    stem: Path
    title: str
    header: str
    meta: dict = field(default_factory=dict)
    """The machine and run, for the JSON file."""
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: str) -> None:
        cells = [str(c).replace("|", "/").replace("\n", " ") for c in cells]
        self.rows.append(tuple(cells + [""] * (5 - len(cells))))
        print(" | ".join(c for c in self.rows[-1] if c), flush=True)
        self.save()

    def text(self) -> str:
        table = "| check | result | | | |\n|---|---|---|---|---|\n" + "\n".join(
            "| " + " | ".join(r) + " |" for r in self.rows)
        notes = "\n\n" + "\n".join(f"* {n}" for n in self.notes) if self.notes else ""
        return f"# {self.title}\n\n{self.header}\n\n{table}{notes}\n"

    def save(self) -> None:
        self.stem.with_suffix(".md").write_text(self.text())
        self.stem.with_suffix(".json").write_text(json.dumps(
            {**self.meta, "title": self.title, "header": self.header, "rows": self.rows,
             "notes": self.notes}, indent=1))

    def failed(self) -> bool:
        return any(r[1].startswith(FAILURES) for r in self.rows)


class Budget:
    """Seconds left of the run, and the seconds per model FLOP measured so far, by kind of
    step (chunkflow, plain, ideal, hf, ...)."""

    MARGIN = 1.25

    def __init__(self, seconds: float, *, clock=time.perf_counter):
        self.seconds, self.clock, self.start = seconds, clock, clock()
        self.rates: dict[str, float] = {}

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def record(self, kind: str, flops: float, seconds: float) -> None:
        self.rates[kind] = seconds / flops

    def estimate(self, kind: str | None, flops: float | None) -> float | None:
        """Seconds a step of ``flops`` would take, with a margin: this kind's last rate, else
        the slowest kind's; None before anything was measured."""
        if kind is None or flops is None or not self.rates:
            return None
        return self.rates.get(kind, max(self.rates.values())) * flops * self.MARGIN


@dataclass
class Check:
    """One run: device, model, table and budget; ``section`` runs a guarded piece of it."""

    device: torch.device
    report: Report
    budget: Budget
    peak: tuple[float, str] | None
    model: torch.nn.Module | None = None
    measured: dict = field(default_factory=dict)
    """label -> (peak bytes, seconds, lengths, engine options) of each chunkflow row."""

    def section(self, label: str, fn, *, kind: str | None = None, flops: float | None = None):
        """``fn()``, unless it is estimated not to fit in the budget (a row says so); out of
        memory or an error becomes a row and the run goes on. Returns fn's value or None."""
        left, estimate = self.budget.left(), self.budget.estimate(kind, flops)
        if left <= 0 or (estimate is not None and estimate > left):
            guess = f"estimated {estimate:.0f} s" if estimate is not None else "not estimated"
            self.report.add(label, SKIPPED, f"{guess}, {max(left, 0):.0f} s left")
            return None
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            outcome = OUT_OF_MEMORY
        except Exception as e:  # one broken section must not cost the rest of the GPU's time
            traceback.print_exc()
            outcome = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        finally:
            if self.model is not None:
                self.model.zero_grad(set_to_none=True)
        self.report.add(label, outcome)
        free_memory(self.device)  # outside the except: its traceback no longer holds tensors
        return None

    def timing_row(self, label: str, *, num_tokens: int, seconds: float, peak: int | None,
                   flops: float, kind: str, extra: str = "") -> None:
        """A throughput row; the rate goes to the budget's estimates."""
        self.budget.record(kind, flops, seconds)
        mfu = f"MFU {flops / seconds / self.peak[0]:.1%}" if self.peak else "MFU unknown"
        self.report.add(label, f"{num_tokens / seconds:,.0f} tok/s", memory(peak),
                        f"{mfu}, {seconds:.2f} s", extra)


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= scale / 4:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 2**10:.1f} KiB"


def memory(num_bytes: int | None) -> str:
    return "peak n/a (CPU)" if num_bytes is None else f"{size(num_bytes)} peak"


def tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


# ---- steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """(fn(), seconds, peak bytes on CUDA else None). Peaks are reset, the cache is kept."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return out, seconds, (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                          else None)


def chunkflow_step(engine, batch, device):
    """One chunkflow step: (loss, seconds, peak bytes: CUDA's allocator or the CPU meter)."""
    result, seconds, peak = timed(device, lambda: engine.forward_backward(batch))
    return float(result.loss), seconds, peak if peak is not None else result.peak_memory_bytes


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
    def run():
        loss = plain_loss(model, batch)
        loss.backward()
        return loss.detach()

    loss, seconds, peak = timed(device, run)
    return float(loss), seconds, peak


def hf_step(model, batch, device, micro_batch: int):
    """transformers' way: DataCollatorWithFlattening micro-batches, summed token-mean loss.
    (seconds, peak bytes or None)."""
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

    def run():
        for s in range(0, len(batch), micro_batch):
            inputs = collator([{"input_ids": b["input_ids"].tolist(),
                                "labels": b["labels"].tolist()} for b in batch[s:s + micro_batch]],
                              return_tensors="pt")
            out = hf(**{k: v.to(device) for k, v in inputs.items()}, num_items_in_batch=num_items)
            out.loss.backward()

    try:
        _, seconds, peak = timed(device, run)
    finally:
        del hf
    return seconds, peak


def grad_norm(model) -> float:
    return math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in model.parameters()
                         if p.grad is not None))


# ---- sections


def run_gpu_tests(smoke: bool, timeout_s: float) -> str:
    if smoke:
        return "skipped (--smoke)"
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu",
                              "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    tail = (out.stdout.strip().splitlines() or ["(no output: failed)"])[-1]
    print(out.stdout[-3000:], out.stderr[-2000:], sep="\n")
    return tail if out.returncode == 0 else f"FAILED: {tail}"


def self_check_kernel(device, config):
    """The kernel by name (varlen on CUDA, cpu-flash on CPU) and what its self-check found."""
    from chunkflow.runtime.attention import get_kernel
    from chunkflow.runtime.attention.select import self_check

    heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    kernel = get_kernel("varlen" if device.type == "cuda" else "cpu-flash", device,
                        torch.bfloat16)
    return kernel, self_check(kernel, device, torch.bfloat16, heads=heads)


def bf16_vs_plain(check: Check, batch, *, chunk_size: int, kernel, flops: float) -> None:
    """chunkflow against plain training on one batch; also the run's warm-up (its rates are
    the budget's first, pessimistic, estimates)."""
    model, device = check.model, check.device
    engine = ChunkFlowEngine(model, chunk_size=chunk_size, k=1, attention_backend=kernel)
    loss_c, seconds, _ = chunkflow_step(engine, batch, device)
    check.budget.record("chunkflow", flops, seconds)
    norm_c = grad_norm(model)
    model.zero_grad(set_to_none=True)
    loss_p, seconds, _ = plain_step(model, batch, device)
    check.budget.record("plain", flops, seconds)
    norm_p = grad_norm(model)
    ok = abs(loss_c - loss_p) <= 1e-2 * abs(loss_p) and abs(norm_c - norm_p) <= 3e-2 * norm_p
    check.report.add("bf16 step vs plain", "ok" if ok else "MISMATCH",
                     f"loss {loss_c:.4f} vs {loss_p:.4f}",
                     f"grad norm {norm_c:.3f} vs {norm_p:.3f}", "")


def timed_chunkflow(check: Check, label: str, batch, *, flops: float, kind: str = "chunkflow",
                    **options) -> int:
    """One timed chunkflow step with ``options`` (ChunkFlowEngine's); a row; its peak bytes.
    With recompute/offload options, also the recomputes' time and the bytes sent to the host."""
    engine = ChunkFlowEngine(check.model, **options)
    device, acc = check.device, {"seconds": 0.0, "start": 0.0}

    def time_recompute(action, phase):
        if action.kind.value == "R":
            sync(device)
            if phase == "start":
                acc["start"] = time.perf_counter()
            else:
                acc["seconds"] += time.perf_counter() - acc["start"]

    hooked = "recompute" in options
    handle = engine.register_action_hook(time_recompute) if hooked else None
    try:
        _, seconds, peak = chunkflow_step(engine, batch, device)
    finally:
        if handle is not None:
            handle.remove()
    check.measured[label] = (peak, seconds, [len(b["input_ids"]) for b in batch], options)
    extra = ""
    if hooked:
        extra = f"R actions {acc['seconds']:.2f} s"
        if options.get("offload", "none") != "none":
            extra += f", {size(engine.copier(device).bytes_to_host)} to host"
    check.timing_row(label, num_tokens=sum(len(b["input_ids"]) for b in batch), seconds=seconds,
                     peak=peak, flops=flops, kind=kind, extra=extra)
    return peak


def dry_run_row(check: Check, label: str, config) -> None:
    """The dry run's peak and roofline time of a measured chunkflow row's step (on fake
    tensors, on this machine's CPU), beside the measurement: the first GPU run calibrates it."""
    from chunkflow.dryrun.run import predict_engine_step
    from chunkflow.plan.gpus import get_gpu_spec

    peak, seconds, lengths, options = check.measured[label]
    # the kernel CUDA runs (the smoke run's CPU kernel has no CUDA counterpart: auto's pick)
    options = {**options, "attention_backend": "varlen" if check.device.type == "cuda"
               else "auto"}
    gpu = (spec_for_device(torch.cuda.get_device_name()) if check.device.type == "cuda"
           else None) or get_gpu_spec("H100-80GB")
    t0 = time.perf_counter()
    predicted, roofline = predict_engine_step(config, lengths, gpu, **options)
    what = "device peak" if check.device.type == "cuda" else "CPU smoke: the step meter"
    check.report.add(f"dry run vs {label}", f"predicted {size(predicted)}, {roofline:.3g} s",
                     f"measured {size(peak)} ({what}), {seconds:.2f} s",
                     f"measured / predicted: peak {peak / predicted:.2f}x, time "
                     f"{seconds / roofline:.2f}x (roofline on {gpu.name})",
                     f"dry run took {time.perf_counter() - t0:.0f} s")


def memory_rows(check: Check, config, lens: dict[int, list[int]], peaks: dict[int, int], *,
                chunk_size: int) -> None:
    """The two memory verdicts from the K=1 peaks at both lengths (see the module doc)."""
    static = check.device.type == "cuda"  # CUDA's allocator sees weights and gradients
    for n, peak in peaks.items():
        low, high = memory_range(config, lens[n], chunk_size=chunk_size, k=1, static=static)
        check.report.add(f"peak vs memory model {tokens(n)}", model_verdict(peak, low, high),
                         f"measured {size(peak)}",
                         f"model {size(low)} .. {size(high)} (bf16 .. fp32 activations)",
                         f"tolerance {MODEL_TOLERANCE:.0%} either way")
    if len(peaks) < 2:
        check.report.add("peak minus KV state, flat", "not judged: a length did not run")
        return
    short, long = sorted(peaks)
    kv = (kv_state(config, lens[short], chunk_size), kv_state(config, lens[long], chunk_size))
    verdict, ratio = flat_verdict((peaks[short], peaks[long]), kv)
    check.report.add(f"peak minus KV state {tokens(long)} / {tokens(short)}", verdict,
                     f"{ratio:.2f}x (bound {FLAT_BOUND}x)",
                     f"KV state {size(kv[0])} -> {size(kv[1])}",
                     f"peak {peaks[long] / peaks[short]:.2f}x")


# ---- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny, on CPU: the code paths only")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for the whole check; sections that would not fit are skipped")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not smoke:
        print("no CUDA device: run with --smoke for the CPU code-path check")
        return 2
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU {platform.machine()}")
    config, sizes = get_preset("qwen2.5-0.5b"), FULL
    if smoke:
        # 3 layers: more than the 2 an offloaded state keeps on the device, so it moves
        config = config.replace(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                head_dim=16)
        sizes = SMOKE
    shape, chunk = ModelShape.from_config(config), sizes.chunk_size
    date = datetime.date.today().isoformat()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    peak = peak_bf16(gpu)
    report = Report(
        stem=out / f"gpu_check-{'smoke' if smoke else gpu.replace(' ', '_')}-{date}",
        title=f"Device check: {gpu}, torch {torch.__version__}, {date}",
        header=(f"Qwen2.5-0.5B shape ({config.num_hidden_layers} layers, hidden "
                f"{config.hidden_size}, vocab {config.vocab_size}), bf16 autocast, chunk "
                f"{tokens(chunk)}, {sizes.num_short} long-tailed short sequences beside the "
                f"longest; budget {args.budget_s:.0f} s."),
        meta={"device": gpu, "torch": torch.__version__, "date": date, "smoke": smoke,
              "budget_s": args.budget_s, "peak_bf16_flops": peak[0] if peak else None})
    check = Check(device=device, report=report, budget=budget, peak=peak)
    print(f"device check on {gpu}, torch {torch.__version__}", flush=True)
    report.add("MFU peak", f"{peak[0] / 1e12:.1f} TF dense bf16" if peak else "unknown",
               peak[1] if peak else f"{gpu!r} is not in chunkflow.plan.gpus: MFU not reported")

    def finish() -> int:
        report.notes += [
            "peak: torch.cuda.max_memory_allocated after reset_peak_memory_stats, cache kept "
            "(CPU smoke: the step meter, saved activations + KV state)",
            "one warm-up for the run (the bf16 comparison); every other row is one timed step",
            "R actions: the recomputes' time with a device sync around each; selective ones "
            "skip the attention kernel",
        ]
        report.save()
        print(report.text())
        print(f"saved {report.stem}.md")
        return 1 if report.failed() else 0

    # 1. the gpu tests: at most a quarter of the budget
    tests = check.section("gpu tests", lambda: run_gpu_tests(smoke, budget.left() / 4))
    if tests is not None:
        report.add("gpu tests", tests)

    # 2. the kernel by name, after its self-check
    checked = check.section("attention self-check", lambda: self_check_kernel(device, config))
    if checked is None:
        return finish()
    kernel, failure = checked
    report.add(f"{kernel.name} self-check", "ok" if failure is None else f"FAILED: {failure}")
    if failure is not None:
        return finish()
    torch.manual_seed(0)
    check.model = Transformer(config).to(device)

    # 3. against plain training; the warm-up
    lens = lengths_for(sizes.baseline_len, sizes.num_short, seed=1)
    batch = make_batch(lens, config.vocab_size, device)
    check.section("bf16 step vs plain", lambda: bf16_vs_plain(
        check, batch, chunk_size=chunk, kernel=kernel, flops=model_flops(shape, lens)),
        kind="plain", flops=model_flops(shape, lens))

    # 4. peak memory at both lengths, K=1, then 5. K=2
    lens_at = {n: lengths_for(n, sizes.num_short, seed=2) for n in sizes.memory_lens}
    batches = {n: make_batch(lens_at[n], config.vocab_size, device, seed=3)
               for n in sizes.memory_lens}
    peaks = {}
    for k in (1, 2):
        for n in sizes.memory_lens:
            flops = model_flops(shape, lens_at[n])
            label = f"chunkflow {tokens(n)} chunk {tokens(chunk)} K={k}"
            got = check.section(label, lambda: timed_chunkflow(
                check, label, batches[n], flops=flops, chunk_size=chunk, k=k,
                attention_backend=kernel), kind="chunkflow", flops=flops)
            if k == 1 and got is not None:
                peaks[n] = got
        if k == 1:
            memory_rows(check, config, lens_at, peaks, chunk_size=chunk)

    # 6. throughput against the ideal and HF, at a length where unchunked training fits
    flops = model_flops(shape, lens)
    n = tokens(sizes.baseline_len)
    for label, kind, options in (
            (f"chunkflow {n} chunk {tokens(chunk)} K=1", "chunkflow", dict(chunk_size=chunk)),
            (f"ideal (one packed varlen chunk) {n}", "ideal", dict(chunk_size=sum(lens)))):
        check.section(label, lambda: timed_chunkflow(
            check, label, batch, flops=flops, kind=kind, k=1, attention_backend=kernel,
            **options), kind=kind, flops=flops)
    label = f"HF flattened (mbs 4, SDPA, no flash-attn) {n}"

    def hf_row():
        seconds, hf_peak = hf_step(check.model, batch, device, micro_batch=4)
        check.timing_row(label, num_tokens=sum(lens), seconds=seconds, peak=hf_peak,
                         flops=flops, kind="hf")

    check.section(label, hf_row, kind="hf", flops=flops)

    # 7. recompute modes and offload at the longest length (issue 15)
    n = sizes.memory_lens[1]
    flops = model_flops(shape, lens_at[n])
    for recompute, offload in (("full", "none"), ("selective", "none"), ("full", "state"),
                               ("selective", "all")):
        label = f"K=1 {recompute} recompute, offload {offload} {tokens(n)}"
        kind = f"{recompute}/{offload}"
        check.section(label, lambda: timed_chunkflow(
            check, label, batches[n], flops=flops, kind=kind, chunk_size=chunk, k=1,
            attention_backend=kernel, recompute=recompute, offload=offload),
            kind=kind, flops=flops)

    # 8a. compiled decoder layers (--train.compile), on a copy of the model: a warm-up step
    # compiles (its time in the row), the next is timed, beside section 6's eager row
    n = tokens(sizes.baseline_len)
    flops = model_flops(shape, lens)
    label = f"chunkflow compiled {n} chunk {tokens(chunk)} K=1"

    def compiled_row():
        eager_model, check.model = check.model, copy.deepcopy(check.model)
        try:
            options = dict(chunk_size=chunk, k=1, attention_backend=kernel, compile=True)
            t0 = time.perf_counter()
            chunkflow_step(ChunkFlowEngine(check.model, **options), batch, device)
            warm = time.perf_counter() - t0
            timed_chunkflow(check, label, batch, flops=flops, kind="compiled", **options)
            check.report.add(f"{label}: warm-up step (compiles)", f"{warm:.1f} s", "", "",
                             f"{compiled.COUNTER.graphs} graphs, "
                             f"{compiled.COUNTER.eager_calls} eager attention calls")
        finally:
            check.model = eager_model

    check.section(label, compiled_row, kind="compiled", flops=flops)

    # 8. plan --dry-run's prediction of the same steps, beside what they measured (the smoke
    # run: the shorter one only, its code path)
    lengths = sizes.memory_lens[:1] if smoke else sizes.memory_lens
    for label in [f"chunkflow {tokens(n)} chunk {tokens(chunk)} K=1" for n in lengths]:
        if label in check.measured:
            check.section(f"dry run: {label}", lambda: dry_run_row(check, label, config),
                          kind="dry run")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
