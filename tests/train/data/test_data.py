"""Data sets and global batches: records, errors with file:line, shuffling, streaming, resume.

Expected batches and counts are written out by hand (or follow from the records' own text);
the resume tests compare a resumed run with an uninterrupted one at every batch boundary.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chunkflow.train.config import DataSection
from chunkflow.train.data.batching import global_batches
from chunkflow.train.data.dataset import (DataError, DataPosition, DataStats, Example, FileDataset,
                                  build_dataset)
from chunkflow.train.data.synthetic import MarkovSource, sample_lengths
from chunkflow.train.data.tokenizer import ByteTokenizer, ChatTemplateError

HINT = "; --data.skip_invalid=true skips such records"


def write_jsonl(path, records) -> str:
    """Records as JSON lines; a str is written as the raw line."""
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def dataset(path, *, vocab_size=256, seed=0, tokenizer=None, **fields):
    cfg = DataSection(path=str(path), **{"shuffle_buffer": 0, **fields})
    return build_dataset(cfg, vocab_size=vocab_size, seed=seed, tokenizer=tokenizer), cfg


def take(ds, n, start=DataPosition(), stats=None):
    stats = DataStats() if stats is None else stats
    return [ex for ex, _ in itertools.islice(ds.examples(start, stats), n)]


def texts(examples):
    return [bytes(ex.input_ids).decode() for ex in examples]


# ---------------------------------------------------------------- records

def test_text_ids_and_chat_records(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"text": "héllo", "id": 7},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [1, 2]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    ds, _ = dataset(path)
    a, b, c, d = take(ds, 4)
    assert a == Example(list("héllo".encode()), None, f"{path}:1")  # byte tokenizer: no EOS
    assert (b.input_ids, b.labels, b.origin) == ([5, 6, 7], [-100, 6, 7], f"{path}:2")
    assert c.labels is None and len(c) == 2
    assert bytes(d.input_ids) == b"<|user|>\nq\n<|assistant|>\na<|end|>\n"
    assert bytes(t for t in d.labels if t != -100) == b"a<|end|>\n"
    ds, _ = dataset(path, train_on="all")
    assert take(ds, 4)[3].labels == d.input_ids


class WithEos(ByteTokenizer):
    eos_token_id = 0


def test_eos_appended_to_text_only_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ab"}, {"input_ids": [9]}])
    ds, _ = dataset(path, tokenizer=WithEos())
    stats = DataStats()
    assert [ex.input_ids for ex in take(ds, 2, stats=stats)] == [[97, 98, 0], [9]]
    assert stats.summary(eos_token_id=ds.eos_appended) == \
        "2 examples (1 text with EOS 0 appended, 1 pre-tokenised)"
    ds, _ = dataset(path, tokenizer=WithEos(), add_eos=False)
    assert take(ds, 1)[0].input_ids == [97, 98]


def test_eos_is_not_announced_for_chat_only_data(tmp_path):
    """Issue 13.9: "EOS appended" was printed for data without a text record."""
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ds, _ = dataset(write_jsonl(tmp_path / "a.jsonl", [chat]), tokenizer=WithEos())
    stats = DataStats()
    take(ds, 3, stats=stats)
    assert "EOS" not in ds.describe() and "EOS" not in stats.summary(eos_token_id=0)
    assert stats.summary(eos_token_id=0) == "3 examples (3 chat)"


def test_unknown_chat_roles_are_refused_or_mapped(tmp_path):
    """Issue 13.9: roles such as ShareGPT's "human"/"gpt" next to an assistant turn were
    rendered and trained silently."""
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"},
                      {"role": "assistant", "content": "b"}]},
    ])
    ds, _ = dataset(path)
    with pytest.raises(DataError, match=re.escape(
            f"{path}:2: 'messages': unknown role(s) 'gpt', 'human'; valid roles: system, user, "
            f"assistant, tool. Map others with --data.role_map")):
        take(ds, 2)
    ds, _ = dataset(path, role_map="human=user,gpt=assistant")
    mapped = take(ds, 2)[1]
    assert bytes(mapped.input_ids) == (b"<|user|>\nq\n<|assistant|>\na<|end|>\n"
                                       b"<|assistant|>\nb<|end|>\n")
    assert bytes(t for t in mapped.labels if t != -100) == b"a<|end|>\nb<|end|>\n"
    with pytest.raises(ValueError, match="--data.role_map='gpt': 'gpt' is not from=to"):
        dataset(path, role_map="gpt")


def test_hf_tokenizer_directory(tmp_path):
    from tests.train.data.test_tokenizer import make_hf_tokenizer

    tok_dir = make_hf_tokenizer(tmp_path / "tok")
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello there"}])
    cfg = DataSection(path=path, tokenizer=tok_dir)
    ds = build_dataset(cfg, vocab_size=512, seed=0)
    (ex,) = take(ds, 1)
    assert ex.input_ids[-1] == ds.tokenizer.eos_token_id  # HF tokenizer has <|im_end|> as EOS
    assert ds.tokenizer.name == tok_dir
    with pytest.raises(DataError, match=r"has \d+ token ids .* --model.vocab_size=\d+ or larger"):
        build_dataset(cfg, vocab_size=256, seed=0)


def test_blank_lines_are_not_records_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('\n{"text": "x"}\n  \n\n{"text": "y"}\n')
    ds, _ = dataset(path)
    assert [ex.origin for ex in take(ds, 3)] == [f"{path}:2", f"{path}:5", f"{path}:2"]


BAD_RECORDS = [
    ('{"text": "a"', r"malformed JSON \(Expecting ',' delimiter"),
    ("[1, 2]", "record is a JSON array, not an object"),
    ('{"foo": 1, "bar": 2}', r"none of the fields 'input_ids', 'messages', 'text' \(non-null\); "
                             r"its fields are \['bar', 'foo'\]"),
    ('{"text": ""}', "'text' is empty"),
    ('{"text": 5}', "'text' must be a string, got number"),
    ('{"input_ids": [1, "a"]}', r"'input_ids'\[1\] = 'a' is not an integer"),
    ('{"input_ids": [1, 2.0]}', r"'input_ids'\[1\] = 2.0 is not an integer"),
    ('{"input_ids": []}', "'input_ids' is empty"),
    ('{"input_ids": "1 2"}', "'input_ids' must be an array of integers, got string"),
    ('{"input_ids": [1, 300]}', r"token id 300 at position 1 of 'input_ids' is outside the "
                                r"vocabulary \[0, 256\)"),
    ('{"input_ids": [-1]}', r"token id -1 at position 0 .* \[0, 256\)"),
    ('{"input_ids": [1, 2], "labels": [1]}', "'labels' has 1 entries but the input ids have 2"),
    ('{"input_ids": [1, 2], "labels": [1, 999]}', r"'labels'\[1\] = 999 is neither -100 nor"),
    ('{"messages": "hi"}', "'messages': messages must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "message 0: 'content' must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no message has role 'assistant'"),
]


@pytest.mark.parametrize("line, reason", BAD_RECORDS)
def test_invalid_jsonl_record_names_file_and_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, line])
    ds, _ = dataset(path)
    examples = ds.examples(DataPosition(), DataStats())
    assert next(examples)[0].origin == f"{path}:1"
    with pytest.raises(DataError) as info:
        next(examples)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and message.endswith(HINT)
    assert re.search(reason, message), message


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    ds, _ = dataset(path)
    with pytest.raises(DataError, match=f"^{path}:2: not valid UTF-8"):
        take(ds, 2)


def test_parquet_rows_mixed_kinds_and_errors(tmp_path):
    path = str(tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"text": "ab", "input_ids": None, "other": 1},
        {"text": None, "input_ids": [3, 4], "other": 2},
        {"text": "", "input_ids": None, "other": 3},
    ]), path, row_group_size=2)
    ds, _ = dataset(path)
    a, b = take(ds, 2)
    # rows are numbered from 1, like JSONL lines (and spreadsheet rows)
    assert (a.input_ids, a.origin, b.input_ids, b.origin) == \
        ([97, 98], f"{path}:row 1", [3, 4], f"{path}:row 2")
    with pytest.raises(DataError, match=f"^{path}:row 3: 'text' is empty{HINT}$"):
        take(ds, 3)
    pq.write_table(pa.Table.from_pylist([{"body": "x", "n": 1}]), path)
    ds, _ = dataset(path)
    with pytest.raises(DataError, match=rf"^{path}:row 1: .* its fields are \['body', 'n'\]"):
        take(ds, 1)
    (tmp_path / "junk.parquet").write_text('{"text": "not parquet"}\n')
    ds, _ = dataset(tmp_path / "junk.parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        take(ds, 1)
    ds, _ = dataset(tmp_path / "junk.parquet", format="jsonl")
    assert texts(take(ds, 1)) == ["not parquet"]


def test_chat_template_error_is_not_skippable(tmp_path):
    class NoTemplate(ByteTokenizer):
        def render_chat(self, messages, *, add_generation_prompt):
            raise ChatTemplateError("tokenizer 'x' has no chat_template")

    path = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    ds, _ = dataset(path, tokenizer=NoTemplate(), skip_invalid=True)
    with pytest.raises(DataError, match=f"^{path}:1: tokenizer 'x' has no chat_template$"):
        take(ds, 1)


def test_skip_invalid_counts_and_keeps_the_first_reason(tmp_path):
    records = [{"text": f"r{i}"} for i in range(10)]
    records[1], records[4], records[8] = '{"text": ', {"text": 3}, "[]"
    path = write_jsonl(tmp_path / "a.jsonl", records)
    ds, cfg = dataset(path, skip_invalid=True)
    stats = DataStats()
    assert texts(take(ds, 7, stats=stats)) == ["r0", "r2", "r3", "r5", "r6", "r7", "r9"]
    assert (stats.examples, stats.skipped) == (7, 3)
    assert stats.first_skip_reason.startswith(f"{path}:2: malformed JSON (")
    assert stats.summary() == f"7 examples (7 text); 3 invalid records skipped (first: " \
                              f"{stats.first_skip_reason})"


def test_no_usable_records(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["{", '{"text": ""}'])
    ds, _ = dataset(path, skip_invalid=True)
    with pytest.raises(DataError, match=r"no usable records in .*a.jsonl'.* 2 records, 2 invalid "
                                        r"skipped, 0 dropped"):
        take(ds, 1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable records .* 0 records"):
        take(dataset(empty)[0], 1)
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "abcdef"}])
    ds, _ = dataset(path, max_length=3, overlong="drop")
    with pytest.raises(DataError, match="1 dropped as longer than --data.max_length=3"):
        take(ds, 1)


def test_max_length_truncates_or_drops_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"text": "abcdef"}, {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]},
        {"text": "xy"}, {"text": "z" * 5000}])
    ds, _ = dataset(path, max_length=4)
    stats = DataStats()
    a, b, c, d = take(ds, 4, stats=stats)
    assert (a.input_ids, b.input_ids, b.labels, c.input_ids, len(d)) == \
        (list(b"abcd"), [1, 2, 3, 4], [-100, 2, 3, 4], list(b"xy"), 4)
    assert (stats.examples, stats.truncated, stats.dropped) == (4, 3, 0)
    assert stats.summary(max_length=4) == ("4 examples (3 text, 1 pre-tokenised); 3 truncated "
                                           "to max_length 4")
    ds, _ = dataset(path, max_length=4, overlong="drop")
    stats = DataStats()
    assert texts(take(ds, 2, stats=stats)) == ["xy", "xy"]  # second one from epoch 1
    # each record counted once, though epoch 1 reads (and drops) them again
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 0, 3)
    ds, _ = dataset(path)  # unset: never truncated or dropped
    assert [len(ex) for ex in take(ds, 4)] == [6, 5, 2, 5000]


# ---------------------------------------------------------------- files, shuffling, streaming

def test_paths_and_globs(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    write_jsonl(tmp_path / "notes.txt", [{"text": "t1"}])  # auto format: not .parquet -> JSONL
    pq.write_table(pa.Table.from_pylist([{"text": "p1"}]), tmp_path / "c.parquet")
    ds, _ = dataset(f"{tmp_path}/*.jsonl, {tmp_path}/c.parquet,{tmp_path}/notes.txt")
    assert texts(take(ds, 5)) == ["a1", "b1", "b2", "p1", "t1"]
    assert "4 jsonl/parquet file(s)" in ds.describe()
    with pytest.raises(DataError, match=r"--data.path: pattern '.*/\*.json' matches no files"):
        dataset(f"{tmp_path}/a.jsonl,{tmp_path}/*.json")
    with pytest.raises(DataError, match=r"--data.path: '.*missing.jsonl' does not exist"):
        dataset(f"{tmp_path}/a.jsonl,{tmp_path}/missing.jsonl")
    with pytest.raises(DataError, match="is a directory but not a saved Hugging Face dataset "
                                        r"\(no state.json\); valid: files, a glob"):
        dataset(tmp_path)


def test_shuffle_is_a_bounded_permutation_fixed_by_seed_and_epoch(tmp_path):
    n, buffer = 50, 7
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"{i:02d}"} for i in range(n)])

    def order(seed, epoch=0, buffer_size=buffer):
        ds, _ = dataset(path, seed=seed, shuffle_buffer=buffer_size)
        return [int(t) for t in texts(take(ds, n * (epoch + 1)))[n * epoch:]]

    first = order(0)
    assert sorted(first) == list(range(n)) and first != list(range(n))
    assert order(0) == first                        # deterministic per seed
    assert order(1) != first and sorted(order(1)) == list(range(n))
    assert order(0, epoch=1) != first and sorted(order(0, epoch=1)) == list(range(n))
    # A streaming buffer of 7 can only emit what it has read: record p + 7 at the latest.
    assert all(record <= p + buffer for p, record in enumerate(first))
    assert order(0, buffer_size=0) == list(range(n))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_first_batch_comes_before_the_end_of_the_file(tmp_path):
    """A pipe whose writer keeps it open: reading to the end of the file would block forever."""
    fifo = tmp_path / "live.jsonl"
    os.mkfifo(fifo)
    release = threading.Event()

    def writer():
        with open(fifo, "w") as f:
            f.writelines(json.dumps({"text": f"{i:03d}"}) + "\n" for i in range(100))
            f.flush()
            release.wait(60)

    threading.Thread(target=writer, daemon=True).start()
    ds, cfg = dataset(fifo, shuffle_buffer=10, batch_size=4)
    got = []
    reader = threading.Thread(target=lambda: got.append(
        next(global_batches(ds, cfg, DataPosition(), DataStats()))), daemon=True)
    reader.start()
    reader.join(10)
    release.set()
    assert got, "the first batch waited for the end of the file"
    batch, position, stats = got[0]
    assert position == DataPosition(0, 4) and stats.examples == 4
    assert all(int(t) < 14 for t in texts(batch))


def test_resume_replays_without_parsing(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"{i:02d}"} for i in range(20)])
    ds, _ = dataset(path, shuffle_buffer=5)
    full = texts(take(ds, 20))
    parsed = []
    real = FileDataset._example
    monkeypatch.setattr(FileDataset, "_example",
                        lambda self, raw, where: parsed.append(where) or real(self, raw, where))
    assert texts(take(ds, 3, start=DataPosition(0, 12))) == full[12:15]
    assert len(parsed) == 3
    with pytest.raises(DataError, match="cannot resume at .* fewer than 21 records"):
        take(ds, 1, start=DataPosition(0, 21))


# ---------------------------------------------------------------- global batches and resume

def test_batches_of_batch_size_cross_epochs(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": str(i)} for i in range(7)])
    ds, cfg = dataset(path, batch_size=3)
    got = list(itertools.islice(global_batches(ds, cfg, DataPosition(), DataStats()), 3))
    assert [texts(b) for b, _, _ in got] == [["0", "1", "2"], ["3", "4", "5"], ["6", "0", "1"]]
    assert [p for _, p, _ in got] == [DataPosition(0, 3), DataPosition(0, 6), DataPosition(1, 2)]
    assert [s.examples for _, _, s in got] == [3, 6, 9]


def test_batches_of_a_token_budget(tmp_path):
    lengths = [3, 4, 2, 10, 1, 1]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x" * n} for n in lengths])
    ds, cfg = dataset(path, batch_tokens=6)
    got = list(itertools.islice(global_batches(ds, cfg, DataPosition(), DataStats()), 5))
    assert [[len(e) for e in b] for b, _, _ in got] == [[3], [4, 2], [10], [1, 1, 3], [4, 2]]
    assert [(p.epoch, p.index) for _, p, _ in got] == [(0, 1), (0, 3), (0, 4), (1, 1), (1, 3)]


def test_batch_stats_are_as_of_the_batch_position(tmp_path):
    # The first batch ends only when "xxxxx" does not fit, after skipping the bad record; that
    # skip belongs to the next batch, whose position lies after it.
    path = write_jsonl(tmp_path / "a.jsonl",
                       [{"text": "xxxx"}, {"text": "x"}, "{", {"text": "x" * 5}])
    ds, cfg = dataset(path, batch_tokens=6, skip_invalid=True)
    given = DataStats()
    (b1, p1, s1), (b2, p2, s2) = itertools.islice(global_batches(ds, cfg, DataPosition(), given), 2)
    assert ([len(e) for e in b1], p1, s1.skipped, s1.examples) == ([4, 1], DataPosition(0, 2), 0, 2)
    assert ([len(e) for e in b2], p2, s2.skipped, s2.examples) == ([5], DataPosition(0, 4), 1, 3)
    assert given == DataStats()  # the caller's stats are not modified


def resume_records():
    rng = random.Random(3)
    records = [{"text": "t" * rng.randint(1, 12)} for _ in range(20)]
    records[3], records[11], records[17] = "{oops", {"text": ""}, {"input_ids": [1, 999]}
    records[6] = {"text": "L" * 40}  # overlong for max_length=16
    return records


@pytest.mark.parametrize("fields", [
    dict(batch_size=3),
    dict(batch_size=4, shuffle_buffer=5),
    dict(batch_tokens=20, shuffle_buffer=6),
    dict(batch_tokens=20, shuffle_buffer=6, max_length=16),
    dict(batch_size=3, shuffle_buffer=4, max_length=16, overlong="drop"),
])
def test_resume_from_every_batch_boundary_matches_an_uninterrupted_run(tmp_path, fields):
    path = write_jsonl(tmp_path / "a.jsonl", resume_records())
    ds, cfg = dataset(path, skip_invalid=True, seed=5, **fields)
    num = 24  # several epochs

    def run(start, stats, n):
        return [([(e.origin, e.input_ids, e.labels) for e in b], p, s.to_dict())
                for b, p, s in itertools.islice(global_batches(ds, cfg, start, stats), n)]

    full = run(DataPosition(), DataStats(), num)
    # several epochs, each bad record counted once (3 invalid records in the file)
    assert full[-1][1].epoch >= 2 and full[-1][2]["skipped"] == 3
    for k in range(num - 1):
        # What a checkpoint stores: JSON of the position and stats yielded with batch k.
        saved = json.loads(json.dumps({"pos": full[k][1].to_dict(), "stats": full[k][2]}))
        resumed = run(DataPosition.from_dict(saved["pos"]), DataStats.from_dict(saved["stats"]),
                      num - k - 1)
        assert resumed == full[k + 1:], f"resume after batch {k}"


# ---------------------------------------------------------------- synthetic data

def test_synthetic_examples_are_a_function_of_seed_and_index():
    cfg = DataSection(synthetic_min_len=5, synthetic_max_len=300, batch_size=4)
    ds = build_dataset(cfg, vocab_size=256, seed=7)
    first = [ex for ex, _ in itertools.islice(ds.examples(DataPosition(), DataStats()), 40)]
    source = MarkovSource(32, seed=7)
    for i, ex in enumerate(first):
        rng = random.Random(f"7:{i}")
        (n,) = sample_lengths(rng, 1, max_len=300, min_len=5)
        assert ex.input_ids == [64 + s for s in source.sample(rng, n)]
        assert 5 <= len(ex) <= 300 and all(64 <= t < 96 for t in ex.input_ids)
        assert (ex.labels, ex.origin) == (None, f"synthetic:{i}")
    again = build_dataset(cfg, vocab_size=256, seed=7)
    resumed = itertools.islice(again.examples(DataPosition(0, 25), DataStats()), 3)
    assert [ex for ex, _ in resumed] == first[25:28]
    other = build_dataset(cfg, vocab_size=256, seed=8)
    assert next(other.examples(DataPosition(), DataStats()))[0] != first[0]
    batches = global_batches(ds, cfg, DataPosition(0, 8), DataStats())
    batch, position, stats = next(batches)
    assert batch == first[8:12] and position == DataPosition(0, 12) and stats.examples == 4
    assert "synthetic" in ds.describe()


def test_synthetic_max_length_and_vocabulary():
    cfg = DataSection(synthetic_min_len=20, synthetic_max_len=400, max_length=32)
    ds = build_dataset(cfg, vocab_size=256, seed=0)
    stats = DataStats()
    lengths = [len(ex) for ex, _ in itertools.islice(ds.examples(DataPosition(), stats), 200)]
    assert max(lengths) == 32 and min(lengths) >= 20
    assert stats.truncated == sum(n == 32 for n in lengths) - stats.dropped > 0
    with pytest.raises(DataError, match="drops every synthetic sequence"):
        build_dataset(DataSection(max_length=4, overlong="drop"), vocab_size=256, seed=0)
    with pytest.raises(DataError, match=r"--model.vocab_size=256 or larger"):
        build_dataset(DataSection(), vocab_size=80, seed=0)
    with pytest.raises(DataError, match=r"synthetic data uses token ids 64..95"):
        build_dataset(DataSection(), vocab_size=80, seed=0, tokenizer=type(
            "Small", (ByteTokenizer,), {"vocab_size": 50})())


def test_position_and_stats_round_trip():
    p = DataPosition(3, 17)
    assert DataPosition.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    s = DataStats(examples=1200, skipped=1, truncated=2, dropped=5,
                  first_skip_reason="a.jsonl:7: x")
    assert DataStats.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.summary(max_length=4096) == ("1200 examples; 1 invalid record skipped (first: "
                                          "a.jsonl:7: x); 2 truncated to max_length 4096; "
                                          "5 dropped as longer than max_length 4096")
    assert DataStats(examples=3).summary() == "3 examples"


def test_sharegpt_as_distributed_trains_like_its_plain_chat(tmp_path):
    """{"conversations": [{"from": "human", "value": ...}]}: read with no option, the usual
    speakers mapped, --data.role_map for others; the same tokens and labels as the chat."""
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    share = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q"},
             {"from": "gpt", "value": "a"}]
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": chat}, {"conversations": share},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}])
    ds, _ = dataset(path)
    plain, shared = take(ds, 2)
    assert plain.input_ids == shared.input_ids and plain.labels == shared.labels
    with pytest.raises(DataError, match=re.escape(
            f"{path}:3: 'conversations': unknown role(s) 'bot'; valid roles: system, user, "
            f"assistant, tool. Map others with --data.role_map (e.g. 'bot=user')")):
        take(ds, 3)
    ds, _ = dataset(path, role_map="bot=assistant")
    assert take(ds, 3)[2].labels == plain.labels[-len(take(ds, 3)[2].labels):]


def test_a_null_content_is_named_null_not_missing(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user"}]}])
    ds, _ = dataset(path)
    with pytest.raises(DataError, match=r":1: 'messages': message 0: 'content' must be a "
                                        r"string, got null"):
        take(ds, 1)
    path = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=r"'content' must be a string, got missing"):
        take(dataset(path)[0], 1)


def test_compressed_jsonl_is_read_streamed_by_content(tmp_path):
    """.jsonl.gz (and a gzip file named .jsonl) read as the plain file; a truncated one is an
    error naming it; zstd needs the zstandard module, and says so."""
    import gzip

    records = [{"text": f"record {i} " + "x" * i} for i in range(50)]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    raw = open(plain, "rb").read()
    for name in ("a.jsonl.gz", "misnamed.jsonl"):
        (tmp_path / name).write_bytes(gzip.compress(raw))
        assert texts(take(dataset(tmp_path / name)[0], 50)) == texts(take(dataset(plain)[0], 50))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(raw)[:200])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot be read to the end"):
        take(dataset(tmp_path / "cut.jsonl.gz")[0], 50)
    zst = tmp_path / "a.jsonl.zst"
    try:
        import zstandard
    except ImportError:
        zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
        with pytest.raises(DataError, match="zstd-compressed, and the zstandard module is not "
                                            "installed; valid: pip install zstandard"):
            take(dataset(zst)[0], 1)
    else:
        zst.write_bytes(zstandard.ZstdCompressor().compress(raw))
        assert texts(take(dataset(zst)[0], 50)) == texts(take(dataset(plain)[0], 50))


def test_a_saved_datasets_directory_and_arrow_files_train_like_jsonl(tmp_path):
    """Dataset.save_to_disk writes Arrow IPC streams listed in state.json: read in that order,
    streamed, without the datasets package; rows are named like Parquet's."""
    import pyarrow as pa

    records = [{"text": f"record {i} " + "y" * i} for i in range(30)]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    saved = tmp_path / "saved"
    saved.mkdir()
    files = []
    for n, part in enumerate((records[:17], records[17:])):
        name = f"data-{n:05d}-of-00002.arrow"
        table = pa.Table.from_pylist(part)
        with pa.ipc.new_stream(str(saved / name), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=5):
                writer.write_batch(batch)
        files.append({"filename": name})
    (saved / "state.json").write_text(json.dumps({"_data_files": files,
                                                  "_fingerprint": "x"}))
    (saved / "dataset_info.json").write_text("{}")
    expected = texts(take(dataset(plain)[0], 30))
    assert texts(take(dataset(saved)[0], 30)) == expected
    assert texts(take(dataset(saved / files[1]["filename"])[0], 13)) == expected[17:]
    table = pa.Table.from_pylist([{"text": "ok"}, {"text": None, "other": 1}])
    with pa.ipc.new_stream(str(tmp_path / "c.arrow"), table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'c.arrow'}:row 2: record has "
                                                  f"none of the fields")):
        take(dataset(tmp_path / "c.arrow")[0], 2)
    split = tmp_path / "dict"
    (split / "train").mkdir(parents=True)
    (split / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=re.escape(
            f"holds a DatasetDict (splits train, test); valid: one split's directory, e.g. "
            f"'{split / 'train'}'")):
        dataset(split)
    with pytest.raises(DataError, match="is a directory but not a saved Hugging Face dataset"):
        dataset(tmp_path / "dict" / "train")


def test_an_id_outside_a_pretrained_models_vocabulary_names_its_config(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"input_ids": [1, 300]}])
    cfg = DataSection(path=path, shuffle_buffer=0, tokenizer="byte")
    ds = build_dataset(cfg, vocab_size=256, seed=0, model_path="/models/qwen")
    with pytest.raises(DataError, match=re.escape(
            "token id 300 at position 1 of 'input_ids' is outside the vocabulary [0, 256) (the "
            "vocabulary of --model.path=/models/qwen, its config.json)")):
        take(ds, 1)
    with pytest.raises(DataError, match=re.escape("[0, 256) (--model.vocab_size)")):
        take(dataset(path)[0], 1)
