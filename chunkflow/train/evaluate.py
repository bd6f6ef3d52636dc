"""Held-out evaluation during a run (``--eval.*``): forward only, chunk by chunk.

The loss is the token mean over every supervised token of the evaluated records (not a mean of
per-batch means), so it equals the unchunked model's loss on the same records; memory is that of
one chunk plus a chain's key/value state, as in training.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from torch import nn

from chunkflow.train.batching import global_batches
from chunkflow.train.config import TrainConfig
from chunkflow.train.data import DataError, DataPosition, DataStats, FileDataset, to_inputs


def evaluate(engine, model: nn.Module, dataset: FileDataset, cfg: TrainConfig, *,
             autocast: Callable) -> dict[str, Any]:
    """Held-out loss (token mean) and perplexity over ``dataset`` (``--eval.path``): at most
    ``--eval.max_batches`` global batches from its start, through ``engine.evaluate`` (one
    process or a parallel layout). ``autocast()``: the run's autocast context."""
    t0 = time.perf_counter()
    loss_sum, num_tokens, num_batches = 0.0, 0, 0
    batches = global_batches(dataset, cfg.data, DataPosition(), DataStats(), num_epochs=1)
    model.eval()  # dropout off
    try:
        for batch, _, _ in batches:
            if cfg.eval.max_batches is not None and num_batches >= cfg.eval.max_batches:
                break
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
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)),
            "eval_tokens": num_tokens, "eval_batches": num_batches,
            "eval_time_s": time.perf_counter() - t0}
