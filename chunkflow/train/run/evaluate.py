"""Held-out evaluation during a run (``--eval.*``): forward only, chunk by chunk.

The loss is the token mean over every supervised token of the evaluated records (not a mean of
per-batch means), so it equals the unchunked model's loss on the same records; memory is that of
one chunk plus a chain's key/value state, as in training. Held-out records are never truncated
or dropped; the held-out files are read once before training (:func:`check_eval_data`), so a bad
record stops the run at its start.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from torch import nn

from chunkflow.train.data.batching import global_batches
from chunkflow.train.config import TrainConfig
from chunkflow.train.data.dataset import (
    DataError,
    DataPosition,
    DataStats,
    FileDataset,
    supervised_tokens,
    to_inputs,
)


def eval_batches(dataset: FileDataset, cfg: TrainConfig):
    """The held-out global batches one evaluation reads (at most ``--eval.max_batches``), each
    with the data counters after it."""
    batches = global_batches(dataset, cfg.data, DataPosition(), DataStats(), num_epochs=1)
    for i, (batch, _, stats) in enumerate(batches):
        if cfg.eval.max_batches is not None and i >= cfg.eval.max_batches:
            return
        yield batch, stats


def check_eval_data(dataset: FileDataset, cfg: TrainConfig) -> str:
    """Read the held-out data once before training, so a bad record stops the run at its start
    (naming file and line) rather than at its first evaluation; returns a description."""
    num_tokens, num_batches, stats = 0, 0, DataStats()
    for batch, stats in eval_batches(dataset, cfg):
        num_tokens += supervised_tokens(batch)
        num_batches += 1
    if num_tokens == 0:
        raise DataError(f"--eval.path={cfg.eval.path!r}: the held-out data has no supervised "
                        f"token in {num_batches} global batch(es); valid: records with targets "
                        f"(see --data.train_on)")
    skipped = (f", {stats.skipped} invalid record(s) skipped (first: {stats.first_skip_reason})"
               if stats.skipped else "")
    return (f"{num_batches} global batch(es), {stats.examples} records, {num_tokens} supervised "
            f"tokens{skipped}")


def evaluate(engine, model: nn.Module, dataset: FileDataset, cfg: TrainConfig, *,
             autocast: Callable) -> dict[str, Any]:
    """Held-out loss (token mean) and perplexity over ``dataset`` (``--eval.path``): at most
    ``--eval.max_batches`` global batches from its start, through ``engine.evaluate`` (one
    process or a parallel layout). ``autocast()``: the run's autocast context."""
    t0 = time.perf_counter()
    loss_sum, num_tokens, num_batches, stats = 0.0, 0, 0, DataStats()
    model.eval()  # dropout off
    try:
        for batch, stats in eval_batches(dataset, cfg):
            with autocast():
                result = engine.evaluate(to_inputs(batch))
            loss_sum += result.loss_sum
            num_tokens += result.num_loss_tokens
            num_batches += 1
    finally:
        model.train()
    if num_tokens == 0:
        raise DataError(f"--eval.path={cfg.eval.path!r}: the held-out data has no supervised "
                        f"token in {num_batches} global batch(es); valid: records with targets "
                        f"(see --data.train_on)")
    loss = loss_sum / num_tokens
    record = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
              "eval_tokens": num_tokens, "eval_batches": num_batches,
              "eval_records": stats.examples, "eval_time_s": time.perf_counter() - t0}
    if stats.skipped:
        record["eval_skipped"] = stats.skipped
    return record
