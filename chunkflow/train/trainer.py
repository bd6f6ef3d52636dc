"""The training loop: one global batch, one ChunkFlow forward/backward, one AdamW step.

``train(config)`` runs a whole job: it builds the model, data stream and engine from the config,
resumes from a checkpoint when asked, and for each step

1. takes the next global batch from the stream (chunks are built over the whole batch),
2. runs ``engine.forward_backward`` (bf16 autocast on CUDA when enabled),
3. checks that loss and gradient norm are finite, clips, sets the scheduled learning rate and
   steps AdamW,
4. appends a line to ``metrics.jsonl``, updates the progress bar, saves a checkpoint every
   ``checkpoint.interval`` steps.

Exact resume: a checkpoint holds everything the next step reads (weights, optimizer moments,
step, data position and counters, RNG states), so on CPU a resumed run's weights equal an
uninterrupted run's bit for bit. The first Ctrl-C finishes the current step and saves a
checkpoint; a NaN/inf loss stops before the optimizer step, so the last checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from chunkflow.models import Transformer
from chunkflow.runtime.engine import ChunkFlowEngine
from chunkflow.train import TrainingError
from chunkflow.train.checkpoint import (
    load_checkpoint,
    load_distributed_checkpoint,
    save_checkpoint,
    save_distributed_checkpoint,
)
from chunkflow.train.config import TrainConfig
from chunkflow.train.data import DataPosition, DataStats, build_dataset, global_batches
from chunkflow.train.resume import check_resumed_config, prepare_run_dir


@dataclass
class TrainSummary:
    run_dir: Path
    steps_done: int
    first_loss: float | None = None
    last_loss: float | None = None
    interrupted: bool = False
    checkpoint: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine decay."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--train.device=cuda but no CUDA device is available (this torch "
                         f"build: {torch.__version__}); use --train.device=cpu")
    return torch.device(name)


def build_model(config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The model to train: a preset initialised from the seed, or model.path's weights."""
    dtype = getattr(torch, config.model.dtype)
    torch.manual_seed(config.train.seed)
    if config.model.path is None:
        return Transformer(config.model.model_config()).to(device=device, dtype=dtype)
    if config.model.vocab_size is not None:
        raise ValueError("--model.vocab_size applies to presets; a --model.path checkpoint has "
                         "its own vocabulary")
    if config.model.implementation == "reference":
        from chunkflow.models.hf_checkpoint import load_hf_checkpoint

        return load_hf_checkpoint(config.model.path, dtype=dtype, device=device)
    from chunkflow.models.hf import load_hf_model

    return load_hf_model(config.model.path, dtype=dtype, device=device)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _init_parallel(cfg: TrainConfig):
    """The distributed context under torchrun (WORLD_SIZE > 1), else None (one process)."""
    from chunkflow.parallel import init_distributed, is_distributed_launch

    if not is_distributed_launch():
        if cfg.parallel.pp > 1:
            raise ValueError(f"--parallel.pp={cfg.parallel.pp} needs at least {cfg.parallel.pp} "
                             f"processes, one per stage; valid: launch with torchrun "
                             f"--nproc-per-node {cfg.parallel.pp} -m chunkflow train ..., or pp=1")
        return None
    return init_distributed(pp=cfg.parallel.pp, device=resolve_device(cfg.train.device),
                            timeout_s=cfg.parallel.timeout_s)


class _StopRequest:
    """First Ctrl-C: finish the step, save, exit. Second: stop at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nchunkflow: interrupted; finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """torch.use_deterministic_algorithms for the run only, not for the rest of the process."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
    torch.use_deterministic_algorithms(enabled or previous)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Metrics:
    """metrics.jsonl (one line per step) and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            # A killed run may have logged steps after its last checkpoint; they will be redone.
            # A SIGKILL during a write can also leave a partial last line: drop it too.
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)  # a kill now keeps either the old or the new history
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"--log.tensorboard=true needs the tensorboard package "
                                 f"(pip install tensorboard): {e}") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class Trainer:
    """Everything one run holds: model, engine, optimizer, data stream, run directory."""

    def __init__(self, config: TrainConfig):
        self.cfg = cfg = config.validate()
        # Under torchrun: this rank's place in the (dp x pp) layout; None for one process.
        self.ctx = ctx = _init_parallel(cfg)
        self.is_main = ctx is None or ctx.rank == 0
        self.device = ctx.device if ctx is not None else resolve_device(cfg.train.device)
        self.autocast = cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto"
                                                         and self.device.type == "cuda")
        if ctx is None:
            self.run_dir, resume_path = prepare_run_dir(cfg)
        else:  # rank 0 decides (and names a default run directory) for everyone
            output_dir, self.run_dir, resume_path = ctx.run_on_rank0(
                lambda: (cfg.train.output_dir, *prepare_run_dir(cfg)))
            cfg.train.output_dir = output_dir
        self.model = build_model(cfg, self.device)
        self.dataset = build_dataset(cfg.data, vocab_size=self.model.config.vocab_size,
                                     seed=cfg.train.seed, model_path=cfg.model.path)
        options = dict(chunk_size=cfg.chunking.chunk_size, k=cfg.chunking.k,
                       loss_normalization=cfg.chunking.loss_normalization,
                       pack_chain_tails=cfg.chunking.pack_chain_tails,
                       attention_backend=cfg.chunking.attention_backend)
        if ctx is None:
            self.engine = ChunkFlowEngine(self.model, **options)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            from chunkflow.parallel import ParallelEngine

            self.engine = ParallelEngine(self.model, ctx,
                                         data_parallel=cfg.parallel.data_parallel, **options)
            self.params = self.engine.parameters()
            self.layout = {"dp": ctx.dp, "pp": ctx.pp,
                           "data_parallel": cfg.parallel.data_parallel if ctx.dp > 1 else "none"}
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        # What a checkpoint must hold beyond weights and optimizer: where the data stream is.
        self.step, self.position, self.stats, self.tokens_seen = 0, DataPosition(), DataStats(), 0
        self.last_checkpoint: Path | None = None
        if resume_path is not None:
            state = self._load(resume_path)
            check_resumed_config(state["config"], cfg, resume_path, verbose=self.is_main)
            for group in self.optimizer.param_groups:  # the configured values, not the saved
                group.update(betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.position = DataPosition.from_dict(state["data_position"])
            self.stats = DataStats.from_dict(state["data_stats"])
            self.last_checkpoint = resume_path
        if self.is_main:
            cfg.save(self.run_dir / "config.toml")
        name = (cfg.model.preset if cfg.model.path is None else
                f"{cfg.model.path} ({cfg.model.implementation})")
        where = (f"{self.device}" if ctx is None else
                 f"{ctx.layout.world_size} processes (dp={ctx.dp} x pp={ctx.pp}"
                 f"{', ' + cfg.parallel.data_parallel if ctx.dp > 1 else ''}) on "
                 f"{self.device.type}")
        self._print(f"chunkflow train: {name} model "
                    f"({_num_params(self.model) / 1e6:.2f}M params"
                    f"{' on stage 0' if ctx is not None and ctx.pp > 1 else ''}, "
                    f"{cfg.model.dtype}) on {where}{', bf16 autocast' if self.autocast else ''}; "
                    f"data: {self.dataset.describe()}; chunk_size={cfg.chunking.chunk_size}, "
                    f"k={cfg.chunking.k}; run dir {self.run_dir}"
                    + (f"; resuming from {resume_path} (step {self.step})" if resume_path
                       else ""))

    def _print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _load(self, path: Path) -> dict[str, Any]:
        if self.ctx is None:
            return load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        from chunkflow.parallel.checkpoint import load_stage_state

        model_state, optim_state, state = load_distributed_checkpoint(
            path, ctx=self.ctx, layout=self.layout)
        load_stage_state(self.engine, self.optimizer, model_state, optim_state)
        return state

    def save(self) -> Path:
        state = {"data_position": self.position.to_dict(), "data_stats": self.stats.to_dict(),
                 "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict()}
        if self.ctx is None:
            self.last_checkpoint = save_checkpoint(
                self.run_dir, step=self.step, model=self.model, optimizer=self.optimizer,
                trainer_state=state, keep_last=self.cfg.checkpoint.keep_last)
            return self.last_checkpoint
        from chunkflow.parallel.checkpoint import stage_state

        model_state, optim_state = stage_state(self.engine, self.optimizer)
        self.last_checkpoint = save_distributed_checkpoint(
            self.run_dir, step=self.step, ctx=self.ctx, layout=self.layout, model=self.model,
            model_state=model_state, optim_state=optim_state, trainer_state=state,
            keep_last=self.cfg.checkpoint.keep_last)
        return self.last_checkpoint

    def run(self) -> TrainSummary:
        cfg, total = self.cfg, self.cfg.train.steps
        summary = TrainSummary(run_dir=self.run_dir, steps_done=self.step)
        if self.step >= total:
            self._print(f"nothing to do: the checkpoint is at step {self.step} and "
                        f"--train.steps={total}")
            return summary
        # Only rank 0 logs; every rank trains, saves its part and stops together.
        metrics = (_Metrics(self.run_dir, resume_step=self.step, tensorboard=cfg.log.tensorboard)
                   if self.is_main else None)
        batches = global_batches(self.dataset, cfg.data, self.position, self.stats)
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=None if cfg.log.progress and self.is_main else True)
        warned_skips = self.stats.skipped > 0
        try:
            with _StopRequest() as stop, _deterministic(cfg.train.deterministic):
                while self.step < total:
                    record = self.train_step(*next(batches))
                    if metrics is not None:
                        metrics.log(record)
                    if summary.first_loss is None:
                        summary.first_loss = record["loss"]
                    summary.last_loss, summary.steps_done = record["loss"], self.step
                    bar.set_postfix(loss=f"{record['loss']:.4f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}",
                                    peak=f"{record['peak_memory_bytes'] / 2**20:.0f}MiB",
                                    refresh=False)
                    bar.update(1)
                    if record["skipped"] and not warned_skips and self.is_main:
                        warned_skips = True
                        bar.write(f"warning: skipping invalid records (--data.skip_invalid); "
                                  f"first: {self.stats.first_skip_reason}")
                    if self.is_main and (self.step % cfg.log.interval == 0
                                         or self.step == total):
                        bar.write(_format_line(record, total))
                    interval = cfg.checkpoint.interval
                    stopping = stop.requested
                    if self.ctx is not None:  # a signal may reach ranks a step apart: agree
                        stopping = self.ctx.all_sum([float(stopping)])[0] > 0
                    if stopping or self.step == total or (
                            interval and self.step % interval == 0):
                        self.save()
                    if stopping:
                        summary.interrupted = True
                        break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        summary.checkpoint, summary.data = self.last_checkpoint, self.stats.to_dict()
        losses = (f", loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}"
                  if summary.first_loss is not None else "")
        data = self.stats.summary(max_length=cfg.data.max_length)
        self._print(f"{'interrupted' if summary.interrupted else 'done'}: step {self.step}/"
                    f"{total}{losses}; data: {data}; checkpoint {self.last_checkpoint}")
        if summary.interrupted:
            launcher = "torchrun ... -m chunkflow" if self.ctx is not None else "chunkflow"
            self._print(f"continue with: {launcher} train --config "
                        f"{self.run_dir / 'config.toml'} --resume")
        return summary

    def train_step(self, batch, position: DataPosition, stats: DataStats) -> dict[str, Any]:
        """One optimizer step on one global batch; returns its metrics record."""
        cfg, step = self.cfg, self.step + 1
        inputs = [{"input_ids": torch.tensor(ex.input_ids),
                   "labels": torch.tensor(ex.labels if ex.labels is not None else ex.input_ids)}
                  for ex in batch]
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            result = self.engine.forward_backward(inputs)
        if result.num_loss_tokens == 0:
            raise TrainingError(
                f"step {step}: the global batch ({batch[0].origin} .. {batch[-1].origin}) has no "
                f"supervised token, so there is nothing to learn and the step was not taken; "
                f"check the labels (-100 everywhere?), --data.train_on, and records of a single "
                f"token (the first token of a sequence is never a target)")
        loss = float(result.loss)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        if self.ctx is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        else:  # the norm over every stage (and FSDP shard), the same on every rank
            grad_norm = self.engine.clip_grad_norm(max_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = (f"the last checkpoint, {self.last_checkpoint}, is intact"
                    if self.last_checkpoint else "no checkpoint was saved yet")
            raise TrainingError(
                f"step {step}: loss {loss}, gradient norm {grad_norm}: training diverged and "
                f"stopped before updating the weights; {kept}. Try a lower --optim.lr (now "
                f"{cfg.optim.lr}) or more --optim.warmup_steps; the batch holds "
                f"{batch[0].origin} .. {batch[-1].origin}")
        lr = lr_at(step, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                   total_steps=cfg.train.steps, min_lr_ratio=cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - t0
        # Only now is the step complete: advance what the next checkpoint records.
        self.step, self.position, self.stats = step, position, stats
        self.tokens_seen += result.num_tokens
        plan = result.plan
        record = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "sequences": len(batch), "tokens": result.num_tokens,
            "supervised_tokens": result.num_loss_tokens, "chunks": plan.num_chunks,
            "chains": len(plan.chains), "longest_sequence": max(len(ex) for ex in batch),
            "packing_efficiency": plan.packing_efficiency,
            "peak_memory_bytes": result.peak_memory_bytes, "max_rss_bytes": _max_rss_bytes(),
            "step_time_s": step_time, "tokens_per_s": result.num_tokens / step_time,
            "tokens_seen": self.tokens_seen, "skipped": stats.skipped,
            "truncated": stats.truncated, "dropped": stats.dropped,
        }
        if self.ctx is not None:
            # How evenly the replicas' estimated costs came out (max/mean), and their chunks.
            record["dp_imbalance"] = result.imbalance
            record["dp_chunks"] = [len(c) for c in result.sharding.chunk_ids]
        return record


def train(config: TrainConfig) -> TrainSummary:
    """Run the training job described by ``config``; see the module docstring."""
    trainer = Trainer(config)
    summary = trainer.run()
    if trainer.ctx is not None:
        trainer.ctx.close()
    return summary


def _format_line(record: dict[str, Any], total: int) -> str:
    return (f"step {record['step']:>{len(str(total))}}/{total}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  grad {record['grad_norm']:.2f}  "
            f"tokens {record['tokens']:6d}  chunks {record['chunks']:3d}  "
            f"packing {record['packing_efficiency']:.1%}  "
            f"peak {record['peak_memory_bytes'] / 2**20:6.1f} MiB  "
            f"{record['tokens_per_s']:7.0f} tok/s"
            + (f"  dp imbalance {record['dp_imbalance']:.2f}" if "dp_imbalance" in record
               else ""))
