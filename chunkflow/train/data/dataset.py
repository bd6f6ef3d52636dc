"""Training data: JSONL/Parquet files or the built-in synthetic set, streamed into global batches.

A data set is a stream of ``Example`` (input ids, optional labels, origin), each yielded with the
``DataPosition`` right after it: endless, or ``num_epochs`` passes over the files.
:mod:`chunkflow.train.data.batching` groups the stream into global batches.

Invariants:
- Streaming: files are read line by line (JSONL) or batch by batch (Parquet); memory holds at most
  ``shuffle_buffer`` raw records, never a whole file.
- ``DataPosition(epoch, index)``: ``index`` counts raw items taken from the epoch's shuffled stream,
  invalid and dropped ones included. The shuffle RNG depends on (seed, epoch) only, so resuming
  replays the raw stream and the shuffle and discards ``index`` items without parsing them.
- Nothing is truncated or dropped unless ``max_length`` is set, and then each one is counted.
- Synthetic example i depends on (seed, i) alone: resuming costs nothing, and there are no epochs.

Labels are unshifted, Hugging Face style: ``labels[j]`` is the target for token j (the runtime
shifts), -100 = not supervised; ``labels=None`` supervises every token.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator

from chunkflow.train.config import CHAT_ROLES, DataSection, parse_role_map
from chunkflow.train.data.formats import (DataError, _arrow_rows, _expand, _format_of,
                                     _jsonl_lines, _parquet_rows)
from chunkflow.train.data.synthetic import MarkovSource, sample_lengths
from chunkflow.train.data.tokenizer import (IGNORE_INDEX, ChatTemplateError, check_messages,
                                       encode_chat, load_tokenizer, text_content)

_SKIP_HINT = "; --data.skip_invalid=true skips such records"
# Synthetic Markov symbol s becomes byte 64 + s ('@', 'A'..'Z', '[', ...): printable, and inside
# the byte tokenizer's vocabulary.
_SYMBOL_OFFSET, _NUM_SYMBOLS = 64, 32


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int] | None  # None: every next token supervised
    origin: str               # "data/a.jsonl:12", "data/b.parquet:row 7", "synthetic:5"

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    index: int = 0  # raw items taken from the epoch's shuffled stream

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


@dataclass
class DataStats:
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    first_skip_reason: str | None = None
    text_examples: int = 0
    chat_examples: int = 0
    token_examples: int = 0
    epoch_records: int | None = None
    """Raw records in one epoch of the files, known once the first epoch has been read."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataStats":
        return cls(**d)

    def summary(self, *, max_length: int | None = None, eos_token_id: int | None = None) -> str:
        """One line, e.g. ``1200 examples (1150 chat, 50 text); 3 invalid records skipped
        (first: ...)``; ``eos_token_id``: the one appended to text records, if any."""
        limit = "max_length" if max_length is None else f"max_length {max_length}"
        kinds = [f"{n} {kind}" for n, kind in ((self.chat_examples, "chat"),
                                               (self.text_examples, "text"),
                                               (self.token_examples, "pre-tokenised"))
                 if n]
        if self.text_examples and eos_token_id is not None:
            kinds[[k.endswith(" text") for k in kinds].index(True)] += \
                f" with EOS {eos_token_id} appended"
        parts = [f"{self.examples} examples" + (f" ({', '.join(kinds)})" if kinds else "")]
        if self.skipped:
            parts.append(f"{self.skipped} invalid record{'s' * (self.skipped != 1)} skipped "
                         f"(first: {self.first_skip_reason})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {limit}")
        if self.dropped:
            parts.append(f"{self.dropped} dropped as longer than {limit}")
        return "; ".join(parts)


def supervised_tokens(batch: list[Example]) -> int:
    """Targets in a global batch (the first token of a sequence is never one)."""
    return sum(len(ex) - 1 if ex.labels is None else
               sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in batch)


def to_inputs(batch: list[Example]) -> list[dict]:
    """A global batch as the engines take it: ``input_ids`` and ``labels`` tensors."""
    import torch

    return [{"input_ids": torch.tensor(ex.input_ids),
             "labels": torch.tensor(ex.labels if ex.labels is not None else ex.input_ids)}
            for ex in batch]


TOOLS_FIELD = "tools"
"""A chat record's tool definitions (OpenAI's format), passed to the chat template."""

SHAREGPT_FIELD = "conversations"
"""Where ShareGPT records keep their turns: read when a record has no --data.messages_field."""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "system": "system", "tool": "tool"}
"""ShareGPT speaker names (``from``) and the chat roles they are, unless --data.role_map maps
them otherwise."""


class _Invalid(Exception):
    """A record-level problem (message without location); skippable with --data.skip_invalid."""


def _fit(example: Example, cfg: DataSection, stats: DataStats) -> Example | None:
    """Apply --data.max_length / --data.overlong, counting what it changes."""
    n = cfg.max_length
    if n is None or len(example) <= n:
        return example
    if cfg.overlong == "drop":
        stats.dropped += 1
        return None
    stats.truncated += 1
    labels = None if example.labels is None else example.labels[:n]
    return Example(example.input_ids[:n], labels, example.origin)


class SyntheticDataset:
    """Endless long-tailed Markov sequences; example i is a function of (seed, i) alone."""

    def __init__(self, cfg: DataSection, *, seed: int, tokenizer):
        if cfg.overlong == "drop" and cfg.max_length is not None \
                and cfg.max_length < cfg.synthetic_min_len:
            raise DataError(f"--data.max_length={cfg.max_length} with --data.overlong=drop drops "
                            f"every synthetic sequence (--data.synthetic_min_len="
                            f"{cfg.synthetic_min_len}); valid: max_length >= synthetic_min_len")
        self.cfg, self.seed, self.tokenizer = cfg, seed, tokenizer
        self.source = MarkovSource(_NUM_SYMBOLS, seed=seed)  # one transition table per run

    def example(self, idx: int) -> Example:
        rng = random.Random(f"{self.seed}:{idx}")  # str seeds hash with sha512: stable everywhere
        (length,) = sample_lengths(rng, 1, max_len=self.cfg.synthetic_max_len,
                                   min_len=self.cfg.synthetic_min_len)
        ids = [_SYMBOL_OFFSET + s for s in self.source.sample(rng, length)]
        return Example(ids, None, f"synthetic:{idx}")

    def describe(self) -> str:
        return (f"synthetic long-tail data: lengths {self.cfg.synthetic_min_len}.."
                f"{self.cfg.synthetic_max_len}, Markov chain over {_NUM_SYMBOLS} symbols (best "
                f"loss {self.source.entropy_nats:.3f}), seed {self.seed}{_limit_note(self.cfg)}")

    def examples(self, start: DataPosition, stats: DataStats
                 ) -> Iterator[tuple[Example, DataPosition]]:
        """Endless: synthetic data has no epochs."""
        if start.epoch != 0:
            raise DataError(f"position {start}: the synthetic data set has no epochs; valid: "
                            f"epoch 0 (was the checkpoint written with file data, --data.path?)")
        idx = start.index
        while True:
            example = _fit(self.example(idx), self.cfg, stats)
            idx += 1
            if example is not None:
                stats.examples += 1
                yield example, DataPosition(0, idx)


class FileDataset:
    """JSONL/Parquet records, streamed through a shuffle buffer, epoch after epoch."""

    def __init__(self, cfg: DataSection, *, vocab_size: int, seed: int, tokenizer,
                 path: str | None = None, shuffle_buffer: int | None = None,
                 option: str = "--data.path", model_path: str | None = None):
        self.cfg, self.vocab_size, self.seed, self.tokenizer = cfg, vocab_size, seed, tokenizer
        # where the vocabulary's size comes from, for a token id outside it
        self.vocab_source = ("--model.vocab_size" if model_path is None else
                             f"the vocabulary of --model.path={model_path}, its config.json")
        self.path = cfg.path if path is None else path
        self.shuffle_buffer = cfg.shuffle_buffer if shuffle_buffer is None else shuffle_buffer
        self.role_map = parse_role_map(cfg.role_map) if cfg.role_map else {}
        self.files = [(p, _format_of(p, cfg.format)) for p in _expand(self.path, option)]
        for path, fmt in self.files:
            if fmt != "jsonl" or not os.path.isfile(path):  # a pipe cannot be peeked at
                continue
            with open(path, "rb") as f:
                if f.read(4) == b"PAR1":
                    raise DataError(f"{path}: is a Parquet file read as JSONL; valid: the "
                                    f".parquet extension or --data.format=parquet")
        self.fields = (cfg.input_ids_field, cfg.labels_field, cfg.messages_field, cfg.text_field,
                       SHAREGPT_FIELD, TOOLS_FIELD)

    def describe(self) -> str:
        num_bytes = sum(os.path.getsize(p) for p, _ in self.files)
        formats = sorted({f for _, f in self.files})
        return (f"{len(self.files)} {'/'.join(formats)} file(s) from {self.path!r} "
                f"({num_bytes / 2**20:.1f} MiB), tokenizer {self.tokenizer.name} (vocab "
                f"{self.tokenizer.vocab_size}), shuffle buffer {self.shuffle_buffer}, "
                f"seed {self.seed}{_limit_note(self.cfg)}")

    @property
    def eos_appended(self) -> int | None:
        """The EOS id appended to text records, if any (reported with the record counts)."""
        return self.tokenizer.eos_token_id if self.cfg.add_eos else None

    def examples(self, start: DataPosition, stats: DataStats, *, num_epochs: int | None = None
                 ) -> Iterator[tuple[Example, DataPosition]]:
        """Examples from ``start`` on, each with the position after it: endless, or up to the
        end of epoch ``num_epochs - 1``."""
        epoch, resume_idx = start.epoch, start.index
        while num_epochs is None or epoch < num_epochs:
            rng = random.Random(f"{self.seed}:{epoch}")
            stream = shuffled(self._raw_items(), self.shuffle_buffer, rng)
            # Replaying the raw stream (unparsed lines) keeps the shuffle RNG in step.
            if sum(1 for _ in itertools.islice(stream, resume_idx)) < resume_idx:
                raise DataError(f"cannot resume at {start}: epoch {epoch} of {self.path!r} "
                                f"has fewer than {resume_idx} records; valid: the data files of "
                                f"the checkpointed run, unchanged")
            usable, idx = 0, resume_idx
            # Later epochs read the same records again: count each skipped/truncated/dropped
            # record once, in the epoch that first reads it.
            counts = stats if epoch == 0 else DataStats()
            skipped0, dropped0 = counts.skipped, counts.dropped
            for file_idx, num, raw in stream:
                idx += 1
                parsed = self._parse(file_idx, num, raw, counts)
                if parsed is None:
                    continue
                example, kind = parsed
                usable += 1
                stats.examples += 1
                setattr(stats, f"{kind}_examples", getattr(stats, f"{kind}_examples") + 1)
                yield example, DataPosition(epoch, idx)
            # A resumed epoch (resume_idx > 0) already yielded an example before the checkpoint.
            if usable == 0 and resume_idx == 0:
                raise DataError(f"no usable records in {self.path!r}: epoch {epoch} read "
                                f"{idx} records, {counts.skipped - skipped0} invalid skipped, "
                                f"{counts.dropped - dropped0} dropped as longer than "
                                f"--data.max_length={self.cfg.max_length}")
            stats.epoch_records = idx
            epoch, resume_idx = epoch + 1, 0

    def record_sizes(self) -> list[tuple[int, int] | None]:
        """(tokens, supervised tokens) of each raw record in file order as training will see
        it (after max_length), None for one that is skipped or dropped; one pass over the
        files."""
        counts = DataStats()
        return [None if parsed is None else (len(parsed[0]), supervised_tokens([parsed[0]]))
                for parsed in (self._parse(*item, counts) for item in self._raw_items())]

    def _parse(self, file_idx: int, num: int, raw: Any, counts: DataStats
               ) -> tuple[Example, str] | None:
        """A raw record as training sees it (after --data.max_length) and its kind, or None
        when it is skipped (--data.skip_invalid) or dropped, counted in ``counts``; an invalid
        record is otherwise a DataError naming its file and line."""
        where = self._where(file_idx, num)
        try:
            example, kind = self._example(raw, where)
        except _Invalid as e:
            if not self.cfg.skip_invalid:
                raise DataError(f"{where}: {e}{_SKIP_HINT}") from None
            counts.skipped += 1
            counts.first_skip_reason = counts.first_skip_reason or f"{where}: {e}"
            return None
        example = _fit(example, self.cfg, counts)
        return None if example is None else (example, kind)

    def check_chat_template(self, scan: int = 100) -> None:
        """Before training: when one of the first ``scan`` records is a chat and only assistant
        turns are supervised, label a two-turn conversation with the tokenizer's template, so
        a template that cannot be masked is refused now, not at the first such record
        mid-run (a ChatTemplateError, as a DataError naming the record)."""
        if self.cfg.train_on != "assistant":
            return
        fields = (self.cfg.messages_field, SHAREGPT_FIELD)
        for file_idx, num, raw in itertools.islice(self._raw_items(), scan):
            try:
                record = json.loads(raw) if isinstance(raw, bytes) else raw
            except (ValueError, UnicodeDecodeError):
                continue  # a bad record: the stream reports it when it gets there
            if isinstance(record, dict) and any(record.get(f) is not None for f in fields):
                probe = [{"role": "user", "content": "Hello."},
                         {"role": "assistant", "content": "Hi."},
                         {"role": "user", "content": "How are you?"},
                         {"role": "assistant", "content": "Fine, thanks."}]
                try:
                    encode_chat(self.tokenizer, probe, train_on="assistant")
                except ChatTemplateError as e:
                    raise DataError(f"{self._where(file_idx, num)} is a chat, and {e}") from None
                except ValueError:
                    pass  # the template refuses this probe's shape, not the masking
                return

    def _raw_items(self) -> Iterator[tuple[int, int, Any]]:
        """(file index, line number or row index, unparsed line / row dict) for every record."""
        for file_idx, (path, fmt) in enumerate(self.files):
            rows = (_jsonl_lines(path) if fmt == "jsonl" else _arrow_rows(path, self.fields)
                    if fmt == "arrow" else _parquet_rows(path, self.fields))
            for num, raw in rows:
                yield file_idx, num, raw

    def _where(self, file_idx: int, num: int) -> str:
        path, fmt = self.files[file_idx]
        return f"{path}:{num}" if fmt == "jsonl" else f"{path}:row {num}"  # both 1-based

    def _roles(self, messages: Any, field: str) -> Any:
        """Messages with --data.role_map applied; a role outside CHAT_ROLES is refused, so a
        ShareGPT "gpt" turn is never trained as context (or a "human" one as a reply).
        ShareGPT turns (``{"from": ..., "value": ...}``) become ``{role, content}`` messages,
        their usual speaker names mapped by ``SHAREGPT_ROLES`` after --data.role_map."""
        if isinstance(messages, list):
            messages = text_content([self._sharegpt_turn(m) for m in messages])
        check_messages(messages)
        if self.role_map:
            messages = [dict(m, role=self.role_map.get(m["role"], m["role"])) for m in messages]
        unknown = sorted({m["role"] for m in messages} - set(CHAT_ROLES))
        if unknown:
            hint = ", ".join(f"{r}=" for r in unknown)
            raise _Invalid(f"{field!r}: unknown role(s) {', '.join(map(repr, unknown))}; "
                           f"valid roles: {', '.join(CHAT_ROLES)}. Map others with "
                           f"--data.role_map (e.g. '{hint}user'); ShareGPT turns "
                           f"({{from, value}}) read human and gpt as user and assistant")
        return messages

    def _sharegpt_turn(self, m: Any) -> Any:
        if not (isinstance(m, dict) and "from" in m and "role" not in m and "content" not in m):
            return m
        speaker = m["from"]
        role = self.role_map.get(speaker) or SHAREGPT_ROLES.get(speaker, speaker)
        return {"role": role, "content": m.get("value")}

    def _example(self, raw: Any, where: str) -> tuple[Example, str]:
        """The record as an example, and its kind: "token", "chat" or "text"."""
        cfg = self.cfg
        if isinstance(raw, bytes):
            try:
                raw = json.loads(raw)
            except UnicodeDecodeError as e:
                raise _Invalid(f"not valid UTF-8 ({e})") from None
            except json.JSONDecodeError as e:
                raise _Invalid(f"malformed JSON ({e})") from None
        if not isinstance(raw, dict):
            raise _Invalid(f"record is a JSON {_json_type(raw)}, not an object")
        # Null counts as absent: Parquet files with mixed record kinds have null columns.
        if raw.get(cfg.input_ids_field) is not None:
            ids = _check_ids(raw[cfg.input_ids_field], cfg.input_ids_field, self.vocab_size,
                             self.vocab_source)
            labels = raw.get(cfg.labels_field)
            if labels is not None:
                _check_labels(labels, len(ids), cfg.labels_field, self.vocab_size)
            return Example(ids, labels, where), "token"
        field = cfg.messages_field
        if raw.get(field) is None and raw.get(SHAREGPT_FIELD) is not None:
            field = SHAREGPT_FIELD  # ShareGPT as distributed: {"conversations": [...]}
        if raw.get(field) is not None:
            try:
                messages = self._roles(raw[field], field)
                tools = raw.get(TOOLS_FIELD)
                if tools is not None and not (isinstance(tools, list) and tools):
                    raise _Invalid(f"{TOOLS_FIELD!r} must be a non-empty array of tool "
                                   f"definitions, got {_json_type(tools)}")
                ids, labels = encode_chat(self.tokenizer, messages, train_on=cfg.train_on,
                                          tools=tools)
            except ChatTemplateError as e:  # the tokenizer's fault, not the record's: no skipping
                raise DataError(f"{where}: {e}") from None
            except ValueError as e:
                raise _Invalid(f"{field!r}: {e}") from None
            if cfg.train_on == "assistant" and all(x == IGNORE_INDEX for x in labels):
                roles = sorted({m["role"] for m in messages})
                raise _Invalid(f"no message has role 'assistant' (roles: {', '.join(roles)}), so "
                               f"nothing would be supervised; valid: an assistant turn, or "
                               f"--data.train_on=all")
            return Example(ids, labels, where), "chat"
        if raw.get(cfg.text_field) is not None:
            text = raw[cfg.text_field]
            if not isinstance(text, str):
                raise _Invalid(f"{cfg.text_field!r} must be a string, got {_json_type(text)}")
            ids = list(self.tokenizer.encode_document(text))
            if not text or not ids:
                raise _Invalid(f"{cfg.text_field!r} is empty")
            eos = self.tokenizer.eos_token_id
            if cfg.add_eos and eos is not None and ids[-1] != eos:
                ids.append(eos)
            return Example(ids, None, where), "text"
        expected = ", ".join(repr(f) for f in (cfg.input_ids_field, cfg.messages_field,
                                                 cfg.text_field))
        raise _Invalid(f"record has none of the fields {expected} (non-null); its fields are "
                       f"{sorted(raw)}; choose fields with --data.text_field, "
                       f"--data.messages_field or --data.input_ids_field")


def _check_ids(ids: Any, field: str, vocab_size: int,
               source: str = "--model.vocab_size") -> list[int]:
    if not isinstance(ids, list):
        raise _Invalid(f"{field!r} must be an array of integers, got {_json_type(ids)}")
    if not ids:
        raise _Invalid(f"{field!r} is empty")
    for pos, t in enumerate(ids):
        if type(t) is not int:  # bool is an int subclass, and 1.0 is not a token id
            raise _Invalid(f"{field!r}[{pos}] = {t!r} is not an integer")
        if not 0 <= t < vocab_size:
            raise _Invalid(f"token id {t} at position {pos} of {field!r} is outside the "
                           f"vocabulary [0, {vocab_size}) ({source})")
    return ids


def _check_labels(labels: Any, length: int, field: str, vocab_size: int) -> None:
    if not isinstance(labels, list):
        raise _Invalid(f"{field!r} must be an array of integers, got {_json_type(labels)}")
    if len(labels) != length:
        raise _Invalid(f"{field!r} has {len(labels)} entries but the input ids have {length}; "
                       f"valid: one label per token")
    for pos, t in enumerate(labels):
        if type(t) is not int or not (t == IGNORE_INDEX or 0 <= t < vocab_size):
            raise _Invalid(f"{field!r}[{pos}] = {t!r} is neither {IGNORE_INDEX} nor a token id "
                           f"in [0, {vocab_size})")


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _limit_note(cfg: DataSection) -> str:
    if cfg.max_length is None:
        return ", no max_length (nothing truncated)"
    return f", max_length {cfg.max_length} ({cfg.overlong} longer ones)"


def shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: a permutation in which no item moves earlier than buffer_size places."""
    if buffer_size <= 0:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def build_dataset(cfg: DataSection, *, vocab_size: int, seed: int, tokenizer=None,
                  model_path: str | None = None) -> SyntheticDataset | FileDataset:
    """The data set of ``cfg``: files when ``cfg.path`` is set, else the synthetic set.

    ``--data.tokenizer=auto`` means ``model_path``'s tokenizer when given, else the byte one."""
    if tokenizer is None:
        spec = cfg.tokenizer if cfg.tokenizer != "auto" else (model_path or "byte")
        tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > vocab_size:
        if model_path is not None:
            advice = (f"the tokenizer the model at --model.path={model_path!r} was trained with "
                      f"(--data.tokenizer=auto uses the one in its directory), or a copy of the "
                      f"model with resized embeddings (model.resize_token_embeddings("
                      f"{tokenizer.vocab_size}), then save_pretrained)")
        else:
            advice = f"--model.vocab_size={tokenizer.vocab_size} or larger"
        raise DataError(f"--data.tokenizer={tokenizer.name!r} has {tokenizer.vocab_size} token "
                        f"ids but the model's vocabulary has {vocab_size}, so some ids would "
                        f"have no embedding; valid: {advice}")
    if cfg.path is None:
        if vocab_size < _SYMBOL_OFFSET + _NUM_SYMBOLS:
            raise DataError(f"the synthetic data uses token ids {_SYMBOL_OFFSET}.."
                            f"{_SYMBOL_OFFSET + _NUM_SYMBOLS - 1} but the model's vocabulary has "
                            f"{vocab_size}; valid: --model.vocab_size >= "
                            f"{_SYMBOL_OFFSET + _NUM_SYMBOLS}, or --data.path")
        return SyntheticDataset(cfg, seed=seed, tokenizer=tokenizer)
    return FileDataset(cfg, vocab_size=vocab_size, seed=seed, tokenizer=tokenizer,
                       model_path=model_path)


def build_eval_dataset(cfg: DataSection, path: str, *, vocab_size: int, tokenizer
                       ) -> FileDataset:
    """Held-out files (``--eval.path``) read like the training data, in file order, and never
    truncated or dropped (``--data.max_length`` is for training memory; evaluation runs chunk
    by chunk without it). Invalid records are skipped only with ``--data.skip_invalid``, and
    counted."""
    cfg = dataclasses.replace(cfg, max_length=None)
    return FileDataset(cfg, vocab_size=vocab_size, seed=0, tokenizer=tokenizer, path=path,
                       shuffle_buffer=0, option="--eval.path")
