"""The training loop: one global batch, one ChunkFlow forward/backward, one AdamW step.

``train(config)`` runs a whole job: it builds the tokenizer, model (LoRA-wrapped when asked),
data stream and engine from the config, resumes from a checkpoint when asked, and for each step

1. takes the next global batch from the stream (chunks are built over the whole batch); a batch
   without a supervised token is skipped with a warning (the data position moves on, no step is
   taken) and ``--train.max_empty_batches`` of them in a row stop the run;
2. runs ``engine.forward_backward`` (bf16 autocast on CUDA when enabled);
3. checks that loss and gradient norm are finite, clips, sets the scheduled learning rate and
   steps AdamW;
4. evaluates on ``--eval.path`` every ``eval.interval`` steps and at the end (forward only,
   chunk by chunk), appends a line to ``metrics.jsonl``, updates the progress bar, saves a
   checkpoint every ``checkpoint.interval`` steps and at the end.

Exact resume: a checkpoint holds everything the next step reads (weights or adapter, optimizer
moments, step, data position and counters, RNG states), so on CPU a resumed run's weights equal
an uninterrupted run's bit for bit. The first Ctrl-C, SIGTERM or SIGUSR1 (a scheduler's
warning before it kills the job) finishes the current step and saves a checkpoint (every rank
at the same step); a bad record met mid-stream saves the steps taken before it; a NaN/inf loss
stops before the optimizer step, so the last checkpoint stays good.
A start that fails before its first step leaves no run directory behind.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from chunkflow.parallel import ParallelEngine
from chunkflow.plan.units import BYTES_PER_ELEMENT
from chunkflow.runtime import compiled
from chunkflow.train import TrainingError
from chunkflow.train.auto.chunking import choose_chunking
from chunkflow.train.build import (
    build_model,
    build_tokenizer,
    check_dtypes,
    describe_dtypes,
    model_label,
)
from chunkflow.train.checkpoint.export import ModelFiles, state_bytes
from chunkflow.train.checkpoint.io import CheckpointIO, layout_of
from chunkflow.train.checkpoint.resume import check_resumed_config, prepare_run_dir
from chunkflow.train.config import TrainConfig
from chunkflow.train.data.batching import count_steps, global_batches, with_step_plans
from chunkflow.train.data.dataset import (
    DataPosition,
    DataStats,
    FileDataset,
    build_dataset,
    build_eval_dataset,
    to_inputs,
)
from chunkflow.train.data.prefetch import Prefetcher
from chunkflow.train.run.evaluate import check_eval_data, evaluate
from chunkflow.train.run.metrics import MetricsLog, format_eval, format_step
from chunkflow.train.run.process import (
    StopRequest,
    deterministic,
    init_parallel,
    max_rss_bytes,
)

@dataclass
class TrainSummary:
    run_dir: Path
    steps_done: int
    first_loss: float | None = None
    last_loss: float | None = None
    stop_signal: int | None = None
    """The signal that stopped the run after a checkpoint (the largest number any rank got)."""

    @property
    def interrupted(self) -> bool:
        return self.stop_signal is not None
    checkpoint: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)
    eval_loss: float | None = None


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine decay."""
    if step <= warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def _num_params(model: torch.nn.Module, *, trainable: bool = False) -> int:
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable}
    return sum(p.numel() for p in params.values())


class Trainer:
    """Everything one run holds: model, engine, optimizer, data stream, run directory."""

    def __init__(self, config: TrainConfig):
        self.cfg = cfg = config.validate()
        # This rank's place in the (dp x pp x tp) layout; one process is the 1x1x1 layout.
        self.ctx = ctx = init_parallel(cfg)
        self.distributed = ctx.world_size > 1
        self.is_main = ctx.rank == 0
        self.device = ctx.device
        self.autocast = cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto"
                                                         and self.device.type == "cuda")
        # Rank 0 decides (and names a default run directory) for everyone; with several ranks,
        # each checksums its share of the checkpoint when it loads it.
        output_dir, self.run_info = ctx.run_on_rank0(
            lambda: (cfg.train.output_dir, prepare_run_dir(cfg, hashes=not self.distributed)))
        cfg.train.output_dir = output_dir
        self.run_dir = self.run_info.path
        try:
            self._build()
        except BaseException:
            if self.is_main:
                self.run_info.remove_if_unused()
                self.run_info.release()
            raise

    def _build(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        for note in self.run_info.notes:
            self._print(note)
        for warning in self.run_info.warnings:
            self._print(f"warning: {warning}")
        self.tokenizer = build_tokenizer(cfg)
        check_dtypes(cfg, autocast=self.autocast)
        self.model = build_model(cfg, self.device)
        vocab_size = self.model.config.vocab_size
        self.dataset = build_dataset(cfg.data, vocab_size=vocab_size, seed=cfg.train.seed,
                                     tokenizer=self.tokenizer, model_path=cfg.model.path)
        if isinstance(self.dataset, FileDataset):
            self.dataset.check_chat_template()  # a template that cannot be masked: now
        self.eval_dataset = None
        if cfg.eval.path is not None:
            self.eval_dataset = build_eval_dataset(cfg.data, cfg.eval.path,
                                                   vocab_size=vocab_size, tokenizer=self.tokenizer)
            self._print(f"held-out data: {check_eval_data(self.eval_dataset, cfg)}")
        self.files = ModelFiles(self.model, self.tokenizer, model_path=cfg.model.path,
                                dtype=getattr(torch, cfg.model.weights_dtype()))
        if cfg.chunking.auto:
            self._choose_chunking()
        if cfg.chunking.offload != "none" and self.device.type != "cuda":
            self._print(f"warning: --chunking.offload={cfg.chunking.offload} on "
                        f"{self.device.type}: the host memory is the same memory, so it saves "
                        f"nothing here (it is for CUDA)")
        # One path for every layout: one process is ParallelEngine on the 1x1x1 layout, whose
        # collectives are the identity.
        options = replace(cfg.chunking.options(), compile=cfg.train.compile)
        self.engine = ParallelEngine(self.model, ctx, options,
                                     data_parallel=cfg.parallel.data_parallel,
                                     sequence_parallel=cfg.parallel.sequence_parallel,
                                     vocab_parallel=cfg.parallel.vocab_parallel,
                                     mixed_precision=self.autocast,
                                     schedule=cfg.parallel.schedule)
        self.params = self.engine.parameters()
        module = self.engine.state_module
        self.layout = layout_of(ctx, cfg.parallel.data_parallel)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.checkpoints = CheckpointIO(ctx, module, self.optimizer, self.files,
                                        layout=self.layout)
        # What a checkpoint must hold beyond weights and optimizer: where the data stream is.
        self.step, self.position, self.stats, self.tokens_seen = 0, DataPosition(), DataStats(), 0
        self.empty_batches = self.consecutive_empty = 0
        self._small_data = False  # warned that the data is smaller than a global batch
        self.last_checkpoint: Path | None = None
        self.saved_step: int | None = None  # the step of the newest checkpoint of this run
        resume_path = self.run_info.resume_from
        if resume_path is not None:
            state = self.checkpoints.load(resume_path, log=self._print)
            check_resumed_config(state["config"], cfg, resume_path, verbose=self.is_main)
            for group in self.optimizer.param_groups:  # the configured values, not the saved
                group.update(betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.position = DataPosition.from_dict(state["data_position"])
            self.stats = DataStats.from_dict(state["data_stats"])
            self.empty_batches = state.get("empty_batches", 0)
            self.consecutive_empty = state.get("consecutive_empty", 0)
            self.last_checkpoint, self.saved_step = resume_path, self.step
        self.total_steps = self._total_steps()
        ratio = cfg.optim.warmup_ratio
        self.warmup_steps = (math.ceil(ratio * self.total_steps) if ratio is not None
                             else cfg.optim.warmup_steps)
        if self.is_main:
            cfg.save(self.run_dir / "config.toml")
        self._print(self._describe(resume_path))
        notes = getattr(cfg, "notes", [])
        if notes:
            self._print(f"fine-tuning defaults for a pretrained model: {', '.join(notes)} "
                        f"(set the options to choose others)")
        if self.warmup_steps >= self.total_steps:
            self._print(f"warning: the warmup ({self.warmup_steps} steps) is not shorter than "
                        f"the run ({self.total_steps} steps): the learning rate never reaches "
                        f"--optim.lr={cfg.optim.lr:g}; valid: fewer --optim.warmup_steps, a "
                        f"--optim.warmup_ratio below 1, or more steps")

    def _choose_chunking(self) -> None:
        """--chunking.auto: the settings for this one device."""
        cfg = self.cfg
        if self.distributed:
            raise ValueError("--chunking.auto=true runs in one process: the memory model does "
                             "not price pipeline stages' chunks in flight, DDP's gradient "
                             "buckets or FSDP's shards; valid: choose --chunking.* with "
                             "chunkflow plan --auto, or run one process")
        param_dtype = cfg.param_dtype()
        activation_bytes = (2 if self.autocast and param_dtype != "float64" else
                            BYTES_PER_ELEMENT[param_dtype])

        text = choose_chunking(cfg, self.dataset, self.device,
                               activation_bytes=activation_bytes, log=self._print)
        self._print(text)
        if self.is_main:
            (self.run_dir / "chunking_auto.txt").write_text(text + "\n")

    def _total_steps(self) -> int:
        """--train.steps, or the global batches of --train.epochs passes over the files."""
        cfg = self.cfg
        self.epoch_records = None  # records in a pass, once known
        if cfg.train.epochs is None:
            return cfg.num_steps
        if not isinstance(self.dataset, FileDataset):
            raise ValueError(f"--train.epochs={cfg.train.epochs} needs data files "
                             f"(--data.path): the built-in synthetic data is endless; valid: "
                             f"--train.steps")
        steps, self.epoch_records = count_steps(self.dataset, cfg.data, cfg.train.epochs)
        self._print(f"train.epochs={cfg.train.epochs}: {steps} steps (global batches) in "
                    f"{cfg.train.epochs} pass(es) over {self.dataset.path!r}")
        return steps

    def _describe(self, resume_path: Path | None) -> str:
        cfg, ctx = self.cfg, self.ctx
        trainable = ""
        if cfg.lora.rank:
            trainable = (f", {_num_params(self.model, trainable=True) / 1e6:.2f}M trainable: "
                         f"LoRA rank {cfg.lora.rank}")
        par = cfg.parallel
        where = (f"{self.device}" if not self.distributed else
                 f"{ctx.world_size} processes (dp={ctx.dp} x pp={ctx.pp} x tp={ctx.tp}"
                 f"{', sequence parallel' if ctx.tp_enabled and par.sequence_parallel else ''}"
                 f"{', vocabulary parallel' if ctx.tp_enabled and par.vocab_parallel else ''}"
                 f"{', ' + par.data_parallel if ctx.dp_enabled else ''}) on "
                 f"{self.device.type}")
        held = ((" on rank 0" if ctx.tp_enabled else " on stage 0")
                if ctx.pp_enabled or ctx.tp_enabled else "")
        return (f"chunkflow train: {model_label(cfg)} model "
                f"({_num_params(self.model) / 1e6:.2f}M params{held}{trainable}, "
                f"{describe_dtypes(cfg)}) on {where}{', bf16 autocast' if self.autocast else ''}; "
                f"data: {self.dataset.describe()}; chunk_size={cfg.chunking.chunk_size}, "
                f"k={cfg.chunking.k}; run dir {self.run_dir}"
                + (f"; resuming from {resume_path} (step {self.step})" if resume_path else ""))

    def _print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        """Release the run directory's lock (:meth:`run` does when it ends): for a trainer
        built and not run."""
        if self.is_main:
            self.run_info.release()

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, *, final: bool = False) -> Path:
        cfg = self.cfg
        state = {"data_position": self.position.to_dict(), "data_stats": self.stats.to_dict(),
                 "tokens_seen": self.tokens_seen, "empty_batches": self.empty_batches,
                 "consecutive_empty": self.consecutive_empty, "config": cfg.to_dict()}
        merged = self.files.lora and (cfg.lora.merge_on_save or final)
        needed = self.files.num_bytes(merged=merged) + state_bytes(self.optimizer.state_dict())
        stop = getattr(self, "_stop", None)  # a second signal must not cut a save short
        with stop.saving() if stop is not None else contextlib.nullcontext():
            path, notes = self.checkpoints.save(self.run_dir, step=self.step, state=state,
                                                merged=merged,
                                                keep_last=cfg.checkpoint.keep_last,
                                                needed_bytes=needed)
        for note in notes:
            self._print(f"note: {note}")
        self.last_checkpoint, self.saved_step = path, self.step
        return path

    def _save_before_data_error(self, error: ValueError) -> ValueError:
        """A record the stream cannot use stops the run: save the steps taken since the last
        checkpoint first (every rank reads the same stream, so every rank gets here), and say
        how to go on."""
        if self.step == 0 or self.saved_step == self.step:
            return error
        steps = self.step - (self.saved_step or 0)
        path = self.save()
        launcher = "torchrun ... -m chunkflow" if self.distributed else "chunkflow"
        return ValueError(f"{error}\n(the {steps} step{'s' * (steps != 1)} "
                          f"since the last checkpoint are saved in {path}; fix the record, or "
                          f"skip such records with --data.skip_invalid=true, and continue with: "
                          f"{launcher} train --train.output_dir {self.run_dir} --resume)")

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainSummary:
        cfg, total = self.cfg, self.total_steps
        summary = TrainSummary(run_dir=self.run_dir, steps_done=self.step)
        if self.step >= total:
            self._print(f"nothing to do: the checkpoint is at step {self.step} and the run "
                        f"has {total} steps")
            if self.is_main:
                self.run_info.release()
            return summary
        # Only rank 0 logs; every rank trains, saves its part and stops together.
        try:
            metrics = (MetricsLog(self.run_dir, resume_step=self.step,
                                  tensorboard=cfg.log.tensorboard, set_aside=self.run_info.newer,
                                  wandb=cfg.log if cfg.log.wandb else None,
                                  config=cfg.to_dict())
                       if self.is_main else None)
        except BaseException:  # e.g. a logger that is not installed: nothing has run yet
            self.run_info.remove_if_unused()
            self.close()
            raise
        batches = with_step_plans(global_batches(self.dataset, cfg.data, self.position,
                                                 self.stats, num_epochs=cfg.train.epochs),
                                  self.engine.prepare)
        if cfg.data.prefetch:  # the next batches are read, tokenized and planned while a step
            batches = Prefetcher(batches, cfg.data.prefetch)  # trains
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=None if cfg.log.progress and self.is_main else True)
        warned_skips = self.stats.skipped > 0
        data_wait = 0.0  # seconds the loop waited for the next global batch since the last step
        try:
            with StopRequest() as stop, deterministic(cfg.train.deterministic):
                self._stop = stop
                while self.step < total:
                    waited_from = time.perf_counter()
                    try:
                        item = next(batches, None)
                    except ValueError as e:  # a bad record: keep the steps taken so far
                        raise self._save_before_data_error(e) from None
                    finally:
                        data_wait += time.perf_counter() - waited_from
                    if item is None:  # --train.epochs: the data is used up
                        break
                    batch, position, stats, inputs, prepared = item
                    self._note_epoch(bar, position, stats)
                    if prepared is None:  # nothing supervised
                        self._skip_empty(bar, batch, position, stats)
                        continue
                    record = self.train_step(batch, position, stats, inputs=inputs,
                                             prepared=prepared)
                    # reading, tokenizing and planning the batch (in the loop without
                    # prefetching), against the step itself
                    record["data_wait_s"] = data_wait
                    record["data_wait_share"] = data_wait / (data_wait + record["step_time_s"])
                    data_wait = 0.0
                    if cfg.train.compile:  # graphs compiled so far: growing late = recompiles
                        record["compiled_graphs"] = compiled.COUNTER.graphs
                    failed = None  # an evaluation that fails must not cost the step's progress
                    if self._eval_due(total):
                        try:
                            record.update(self.evaluate())
                        except Exception as e:
                            failed = e
                    if metrics is not None:
                        metrics.log(record)
                    self._show(bar, summary, record)
                    if record["skipped"] and not warned_skips and self.is_main:
                        warned_skips = True
                        bar.write(f"warning: skipping invalid records (--data.skip_invalid); "
                                  f"first: {self.stats.first_skip_reason}")
                    interval = cfg.checkpoint.interval
                    # A signal may reach ranks a step apart, or only some: agree on the step
                    # and on the signal (the largest number any rank got).
                    signum = self.ctx.all_max(stop.signum or 0)
                    stopping = signum > 0
                    if stopping or failed is not None or (
                            interval and self.step % interval == 0 and self.step < total):
                        self.save()
                    if failed is not None:
                        raise failed
                    if stopping:
                        summary.stop_signal = signum
                        break
                if summary.stop_signal is None and self.step > 0:
                    if self.saved_step != self.step:
                        self.save(final=True)
                    if self.eval_dataset is not None:  # after the save: it can fail alone
                        record = {"step": self.step, **self.evaluate()}
                        summary.eval_loss = record["eval_loss"]
                        if metrics is not None:
                            metrics.log(record)
                        self._print(f"step {self.step}: {format_eval(record)}")
        finally:
            if isinstance(batches, Prefetcher):
                batches.close()
            self._stop = None
            bar.close()
            if metrics is not None:
                metrics.close()
            if self.is_main:
                self.run_info.remove_if_unused()
                self.run_info.release()
        self._finish(summary, total)
        return summary

    def _show(self, bar, summary: TrainSummary, record: dict[str, Any]) -> None:
        """The step in the summary, the progress bar and, every log.interval steps, a line."""
        if summary.first_loss is None:
            summary.first_loss = record["loss"]
        summary.last_loss, summary.steps_done = record["loss"], self.step
        if "eval_loss" in record:
            summary.eval_loss = record["eval_loss"]
        postfix = dict(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                       peak=f"{record['peak_memory_bytes'] / 2**20:.0f}MiB",
                       data=f"{record['data_wait_share']:.0%}")
        if summary.eval_loss is not None:
            postfix["eval"] = f"{summary.eval_loss:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        total = self.total_steps
        if self.is_main and (self.step % self.cfg.log.interval == 0 or self.step == total
                             or "eval_loss" in record):
            bar.write(format_step(record, total))

    def _finish(self, summary: TrainSummary, total: int) -> None:
        cfg = self.cfg
        summary.checkpoint, summary.data = self.last_checkpoint, self.stats.to_dict()
        losses = (f", loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}"
                  if summary.first_loss is not None else "")
        if summary.eval_loss is not None:
            losses += f", eval loss {summary.eval_loss:.4f}"
        data = self.stats.summary(max_length=cfg.data.max_length,
                                  eos_token_id=getattr(self.dataset, "eos_appended", None))
        passes = self._passes()
        if passes is not None:
            data += f"; {passes:.2f} passes over the data"
        if self.empty_batches:
            data += (f"; {self.empty_batches} global batch{'es' * (self.empty_batches != 1)} "
                     f"without a supervised token skipped")
        self._print(f"{'interrupted' if summary.interrupted else 'done'}: step {self.step}/"
                    f"{total}{losses}; data: {data}; checkpoint {self.last_checkpoint}")
        if summary.interrupted:
            launcher = "torchrun ... -m chunkflow" if self.distributed else "chunkflow"
            self._print(f"continue with: {launcher} train --train.output_dir {self.run_dir} "
                        f"--resume")

    def _passes(self) -> float | None:
        """How many passes over the data files the run has made (None: not known yet)."""
        records = self.stats.epoch_records or self.epoch_records
        if not isinstance(self.dataset, FileDataset) or not records:
            return None
        return self.position.epoch + self.position.index / records

    def _note_epoch(self, bar, position: DataPosition, stats: DataStats) -> None:
        """Say when the stream has read every record once and starts the next pass."""
        if position.epoch <= self.position.epoch or not self.is_main:
            return
        if self.step == 0 and self.position.epoch == 0 or self._small_data:
            # the first global batch already wraps around: a data set smaller than a batch
            if not self._small_data:
                self._small_data = True
                size = (f"--data.batch_tokens={self.cfg.data.batch_tokens}"
                        if self.cfg.data.batch_tokens else
                        f"--data.batch_size={self.cfg.data.batch_size}")
                bar.write(f"warning: the data holds {stats.epoch_records} usable record(s), "
                          f"fewer than one global batch takes ({size}): every batch repeats "
                          f"records; valid: more data, or a smaller batch")
            return
        wrap = ("" if self.cfg.train.epochs is not None else
                "; the data wraps around (--train.epochs stops after a number of passes)")
        bar.write(f"data: epoch {self.position.epoch + 1} complete ({stats.epoch_records} "
                  f"records read); step {self.step + 1} starts epoch {position.epoch + 1}{wrap}")

    def _skip_empty(self, bar, batch, position: DataPosition, stats: DataStats) -> None:
        self.empty_batches += 1
        self.consecutive_empty += 1
        self.position, self.stats = position, stats  # the data moves on; no step is taken
        where = f"{batch[0].origin} .. {batch[-1].origin}"
        limit = self.cfg.train.max_empty_batches
        if self.consecutive_empty >= limit:
            saved = ""
            if self.step > 0 and self.saved_step != self.step:  # keep the steps taken so far
                saved = f"; the steps so far are saved in {self.save()}"
            raise TrainingError(
                f"{self.consecutive_empty} global batches in a row have no supervised token "
                f"(the last: {where}), --train.max_empty_batches={limit}; check the labels "
                f"(-100 everywhere?), --data.train_on, and records of a single token (the "
                f"first token of a sequence is never a target){saved}")
        if self.is_main:
            bar.write(f"warning: the global batch {where} has no supervised token: skipped, no "
                      f"step taken ({self.empty_batches} so far; {limit} in a row stop the run)")

    def _eval_due(self, total: int) -> bool:
        """At eval.interval steps before the last; the run's end evaluates after its save."""
        interval = self.cfg.eval.interval
        return (self.eval_dataset is not None and interval > 0 and self.step % interval == 0
                and self.step < total)

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss and perplexity over ``--eval.path`` (see :func:`evaluate`)."""
        return evaluate(self.engine, self.model, self.eval_dataset, self.cfg,
                        autocast=self._autocast)

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
                else contextlib.nullcontext())

    def train_step(self, batch, position: DataPosition, stats: DataStats, *, inputs=None,
                   prepared=None) -> dict[str, Any]:
        """One optimizer step on one global batch; returns its metrics record. ``inputs``
        and ``prepared``: the batch's tensors and step plan, made ahead
        (:func:`~chunkflow.train.data.batching.with_step_plans`)."""
        cfg, step = self.cfg, self.step + 1
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            result = self.engine.forward_backward(
                inputs if inputs is not None else to_inputs(batch), prepared=prepared)
        assert result.num_loss_tokens > 0, "empty batches are skipped before the step"
        loss = float(result.loss)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        # the norm over every stage (and FSDP and TP shard), the same on every rank
        grad_norm = self.engine.clip_grad_norm(max_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            kept = (f"the last checkpoint, {self.last_checkpoint}, is intact"
                    if self.last_checkpoint else "no checkpoint was saved yet")
            raise TrainingError(
                f"step {step}: loss {loss}, gradient norm {grad_norm}: training diverged and "
                f"stopped before updating the weights; {kept}. Try a lower --optim.lr (now "
                f"{cfg.optim.lr}) or a longer warmup (now {self.warmup_steps} steps); the "
                f"batch holds "
                f"{batch[0].origin} .. {batch[-1].origin}")
        lr = lr_at(step, lr=cfg.optim.lr, warmup_steps=self.warmup_steps,
                   total_steps=self.total_steps, min_lr_ratio=cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - t0
        # Only now is the step complete: advance what the next checkpoint records.
        self.step, self.position, self.stats = step, position, stats
        self.consecutive_empty = 0
        self.tokens_seen += result.num_tokens
        plan = result.plan
        record = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "sequences": len(batch), "tokens": result.num_tokens,
            "supervised_tokens": result.num_loss_tokens, "chunks": plan.num_chunks,
            "chains": len(plan.chains), "longest_sequence": max(len(ex) for ex in batch),
            "packing_efficiency": plan.packing_efficiency,
            "peak_memory_bytes": result.peak_memory_bytes, "max_rss_bytes": max_rss_bytes(),
            "step_time_s": step_time, "tokens_per_s": result.num_tokens / step_time,
            "tokens_seen": self.tokens_seen, "skipped": stats.skipped,
            "truncated": stats.truncated, "dropped": stats.dropped,
            "empty_batches": self.empty_batches,
        }
        passes = self._passes()
        if passes is not None:
            record["epoch"] = passes
        # How evenly the replicas' estimated costs came out (max/mean), and their chunks.
        record["dp_imbalance"] = result.imbalance
        record["dp_chunks"] = [len(c) for c in result.sharding.chunk_ids]
        return record


def train(config: TrainConfig) -> TrainSummary:
    """Run the training job described by ``config``; see the module docstring."""
    trainer = Trainer(config)
    summary = trainer.run()
    trainer.ctx.close()
    return summary
