"""Global batches: the data stream grouped into optimizer steps, and their number.

``global_batches`` yields each batch with the position right after its last example and the
stats as of that position, so resuming from that pair yields exactly the batches and counts of
an uninterrupted run. ``count_steps`` counts the batches of ``--train.epochs`` passes exactly,
from one pass over the files (the epochs' shuffles depend on the seed and the record count only).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator

from chunkflow.train.config import DataSection
from chunkflow.train.data.dataset import (DataError, DataPosition, DataStats, Example, FileDataset,
                                          shuffled, supervised_tokens, to_inputs)


def global_batches(dataset, cfg: DataSection, start: DataPosition, stats: DataStats, *,
                   num_epochs: int | None = None
                   ) -> Iterator[tuple[list[Example], DataPosition, DataStats]]:
    """Global batches, each with the position after its last example and the stats then.

    ``cfg.batch_tokens`` set: as many examples as fit the budget (a longer one alone); otherwise
    ``cfg.batch_size`` examples. Endless, or with ``num_epochs`` until the data set's stream
    ends after that many epochs, the last batch then holding what is left (nothing is dropped).
    ``stats`` is not modified: the yielded copies carry the counts.
    """
    running = dataclasses.replace(stats)
    batch: list[Example] = []
    num_tokens = 0
    last_position, last_snapshot = start, running
    stream = (dataset.examples(start, running) if num_epochs is None
              else dataset.examples(start, running, num_epochs=num_epochs))
    for example, position in stream:
        # Snapshot per example: with a token budget the batch ends only once the next example is
        # read, and the counts must not include what reading it skipped or truncated.
        snapshot = dataclasses.replace(running)
        if cfg.batch_tokens is not None and batch and num_tokens + len(example) > cfg.batch_tokens:
            yield batch, last_position, last_snapshot
            batch, num_tokens = [], 0
        batch.append(example)
        num_tokens += len(example)
        last_position, last_snapshot = position, snapshot
        full = (num_tokens >= cfg.batch_tokens if cfg.batch_tokens is not None
                else len(batch) == cfg.batch_size)
        if full:
            yield batch, last_position, last_snapshot
            batch, num_tokens = [], 0
    if batch:  # a finite stream's remainder
        yield batch, last_position, dataclasses.replace(running)


class _Sized:
    """A stand-in example: a length (what batching reads) and a number of targets."""

    def __init__(self, num_tokens: int, num_targets: int):
        self.num_tokens, self.num_targets = num_tokens, num_targets

    def __len__(self) -> int:
        return self.num_tokens


class _RecordSizes:
    """A stand-in data set of known record sizes, replaying FileDataset's epoch shuffles
    (which depend on the number of records and the seed alone) without reading the files."""

    def __init__(self, sizes: list[tuple[int, int] | None], *, seed: int, shuffle_buffer: int):
        self.sizes, self.seed, self.shuffle_buffer = sizes, seed, shuffle_buffer

    def examples(self, start: DataPosition, stats: DataStats, *, num_epochs: int):
        for epoch in range(start.epoch, num_epochs):
            order = shuffled(iter(range(len(self.sizes))), self.shuffle_buffer,
                             random.Random(f"{self.seed}:{epoch}"))
            for idx, raw in enumerate(order, 1):
                if idx <= (start.index if epoch == start.epoch else 0):
                    continue
                if self.sizes[raw] is not None:
                    yield _Sized(*self.sizes[raw]), DataPosition(epoch, idx)


def with_step_plans(items: Iterator, prepare) -> Iterator:
    """Each (batch, position, stats) of ``items`` with what its step needs before its data:
    the engine's inputs (tensors) and ``prepare(lengths)`` (``ParallelEngine.prepare``: the
    chunk plan, the replicas' shares, this rank's actions); None and None for a batch with
    nothing supervised. Under ``--data.prefetch`` the trainer runs it in the prefetch thread."""
    for batch, position, stats in items:
        if supervised_tokens(batch) == 0:
            yield batch, position, stats, None, None
            continue
        inputs = to_inputs(batch)
        try:
            prepared = prepare([len(x["input_ids"]) for x in inputs])
        except ValueError as e:  # not the data's fault: no bad record to name
            raise RuntimeError(f"planning the step of a global batch failed: {e}") from e
        yield batch, position, stats, inputs, prepared


def count_steps(dataset: FileDataset, cfg: DataSection, num_epochs: int) -> tuple[int, int]:
    """Optimizer steps in ``num_epochs`` passes over the files, exactly as :func:`global_batches`
    will form the batches (a batch without a supervised token is skipped, not a step), and the
    raw records of one pass; reads and tokenises the files once."""
    sizes = _RecordSizes(dataset.record_sizes(), seed=dataset.seed,
                         shuffle_buffer=dataset.shuffle_buffer)
    if not any(n is not None for n in sizes.sizes):
        raise DataError(f"no usable records in {dataset.path!r}")
    steps = sum(1 for batch, _, _ in global_batches(sizes, cfg, DataPosition(), DataStats(),
                                                    num_epochs=num_epochs)
                if any(ex.num_targets for ex in batch))
    return steps, len(sizes.sizes)


def first_batches(cfg, num_batches: int, *, vocab_size: int | None = None):
    """The configured data set (with the run's tokenizer) and its first global batches, each
    with the data counters after it. ``vocab_size``: the model's (default: the configured
    model's)."""
    from chunkflow.train.build import build_tokenizer, configured_shape
    from chunkflow.train.data.dataset import build_dataset

    vocab_size = configured_shape(cfg).vocab_size if vocab_size is None else vocab_size
    dataset = build_dataset(cfg.data, vocab_size=vocab_size,
                            seed=cfg.train.seed, tokenizer=build_tokenizer(cfg),
                            model_path=cfg.model.path)
    batches = global_batches(dataset, cfg.data, DataPosition(), DataStats())
    return dataset, [(batch, stats) for (batch, _, stats), _ in zip(batches, range(num_batches))]
