"""``chunkflow data check``: read all the data once, streamed, before renting GPUs.

It takes ``chunkflow train``'s options, builds the same tokenizer and record reader, and reads
every record of ``--data.path`` (and ``--eval.path``) in file order: every bad record is found,
not just the first. It reports the first ``--show`` bad records with their file and line, then
how many more of each kind; the records by kind (text, chat, token ids); tokens, supervised
tokens and the length distribution; and what ``--data.max_length`` would truncate or drop. The
exit status is 0 when every record is usable, 2 when some are not (so a job script can gate on
it), whatever ``--data.skip_invalid`` says.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

from chunkflow.train.data.dataset import DataError, FileDataset, _Invalid, supervised_tokens

SHOW = 20
"""Bad records listed one by one before the rest are counted."""


@dataclass
class DataReport:
    """What one pass over a data set found."""

    name: str
    records: int = 0
    kinds: collections.Counter = field(default_factory=collections.Counter)
    lengths: list[int] = field(default_factory=list)
    supervised: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    """(file:line, reason) of every bad record, in file order."""
    over_max_length: int = 0

    def format(self, *, show: int, max_length: int | None, overlong: str) -> str:
        lines = [f"{self.name}: {self.records} records, {len(self.bad)} bad"]
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()))
        if self.lengths:
            ordered = sorted(self.lengths)
            total = sum(ordered)

            def pct(p: float) -> int:
                return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

            lines.append(f"  usable: {len(ordered)} ({kinds}); {total:,} tokens, "
                         f"{self.supervised:,} supervised ({self.supervised / total:.1%})")
            lines.append(f"  tokens per record: min {ordered[0]:,}, median {pct(0.5):,}, "
                         f"p90 {pct(0.9):,}, p99 {pct(0.99):,}, max {ordered[-1]:,}; "
                         f"the longest 1% hold {sum(ordered[-max(1, len(ordered) // 100):]) / total:.1%}"
                         f" of the tokens")
            if max_length is not None:
                verb = "truncated to" if overlong == "truncate" else "dropped as longer than"
                lines.append(f"  --data.max_length={max_length}: {self.over_max_length} "
                             f"record(s) would be {verb} it")
        for where, reason in self.bad[:show]:
            lines.append(f"  {where}: {reason}")
        rest = self.bad[show:]
        if rest:
            kinds = collections.Counter(_kind_of(reason) for _, reason in rest)
            lines.append(f"  ... and {len(rest)} more bad record(s): " + "; ".join(
                f"{n} {kind}" for kind, n in kinds.most_common()))
        return "\n".join(lines)


def _kind_of(reason: str) -> str:
    """A bad record's reason without its particulars (numbers, quoted values), to count alike
    ones together."""
    head = reason.split("(", 1)[0].split(";", 1)[0]
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "…", head)).strip()


def check_dataset(dataset: FileDataset, name: str) -> DataReport:
    """Every record of ``dataset``, in file order: usable ones counted, bad ones listed."""
    report = DataReport(name)
    cfg = dataset.cfg
    for file_idx, num, raw in dataset._raw_items():
        report.records += 1
        where = dataset._where(file_idx, num)
        try:
            example, kind = dataset._example(raw, where)
        except _Invalid as e:
            report.bad.append((where, str(e)))
            continue
        report.kinds[kind] += 1
        report.lengths.append(len(example))
        report.supervised += supervised_tokens([example])
        if cfg.max_length is not None and len(example) > cfg.max_length:
            report.over_max_length += 1
    return report


def check_data(cfg, *, show: int = SHOW, log=print) -> int:
    """``chunkflow data check`` for the configuration ``cfg``; its exit status."""
    from chunkflow.train.build import build_tokenizer, configured_shape
    from chunkflow.train.data.dataset import build_dataset, build_eval_dataset

    if cfg.data.path is None:
        raise ValueError("chunkflow data check reads --data.path; none is set (the built-in "
                         "synthetic data has nothing to check)")
    tokenizer = build_tokenizer(cfg)
    vocab_size = configured_shape(cfg).vocab_size
    dataset = build_dataset(cfg.data, vocab_size=vocab_size, seed=cfg.train.seed,
                            tokenizer=tokenizer, model_path=cfg.model.path)
    sets = [(dataset, f"--data.path ({dataset.describe()})")]
    if cfg.eval.path is not None:
        held_out = build_eval_dataset(cfg.data, cfg.eval.path, vocab_size=vocab_size,
                                      tokenizer=tokenizer)
        sets.append((held_out, f"--eval.path ({cfg.eval.path})"))
    bad = 0
    for data, name in sets:
        try:
            report = check_dataset(data, name)
        except DataError as e:  # the tokenizer or a file, not one record: nothing to go on
            raise ValueError(str(e)) from None
        log(report.format(show=show, max_length=cfg.data.max_length,
                          overlong=cfg.data.overlong))
        bad += len(report.bad)
    log("every record is usable" if not bad else
        f"{bad} bad record(s): fix them, or train with --data.skip_invalid=true to skip them "
        f"(counted in the run's summary)")
    return 0 if not bad else 2
