"""Where training records come from: paths and globs expanded to files (a Hugging Face
``datasets`` directory to its Arrow files), and each file's records streamed as raw JSONL lines
(gzip or zstd decompressed on the fly) or Parquet/Arrow row dicts, with 1-based numbers for
errors. Parsing the records is :mod:`chunkflow.train.data.dataset`'s."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

_PARQUET_BATCH_ROWS = 256  # rows decoded at a time; long-context rows can be megabytes each


class DataError(ValueError):
    """Unusable data or data configuration; the message names the file and line."""



def _expand(spec: str, option: str = "--data.path") -> list[str]:
    """Comma-separated paths and globs -> files, each pattern's matches sorted."""
    files = []
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        if any(c in pattern for c in "*?["):
            matches = [m for m in sorted(glob.glob(pattern, recursive=True))
                       if not os.path.isdir(m)]
            if not matches:
                raise DataError(f"{option}: pattern {pattern!r} matches no files; valid: "
                                f"existing JSONL/Parquet files or globs that match some")
        elif not os.path.exists(pattern):
            raise DataError(f"{option}: {pattern!r} does not exist; valid: existing "
                            f"JSONL/Parquet files or globs, comma-separated")
        elif os.path.isdir(pattern):
            matches = _saved_dataset_files(pattern, option)
        else:
            matches = [pattern]
        files += matches
    if not files:
        raise DataError(f"{option}={spec!r} names no files")
    return files


def _saved_dataset_files(directory: str, option: str) -> list[str]:
    """The Arrow files of a Hugging Face ``datasets`` directory (``Dataset.save_to_disk``), in
    the order its ``state.json`` lists them; read without the ``datasets`` package."""
    state = os.path.join(directory, "state.json")
    splits = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(splits):
        try:
            names = json.loads(open(splits).read())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            names = ["train"]
        raise DataError(f"{option}: {directory!r} holds a DatasetDict (splits "
                        f"{', '.join(names)}); valid: one split's directory, e.g. "
                        f"{os.path.join(directory, names[0])!r}")
    if not os.path.isfile(state):
        raise DataError(f"{option}: {directory!r} is a directory but not a saved Hugging Face "
                        f"dataset (no state.json); valid: files, a glob such as "
                        f"'{os.path.join(directory, '*.jsonl')}', or a Dataset.save_to_disk "
                        f"directory")
    try:
        files = [f["filename"] for f in json.loads(open(state).read())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{option}: {state} is not a datasets state file ({type(e).__name__}: "
                        f"{e}); valid: the directory Dataset.save_to_disk wrote") from None
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing or not files:
        raise DataError(f"{option}: {directory!r} lists {', '.join(missing) or 'no data files'} "
                        f"in state.json, not found; valid: a complete save_to_disk directory")
    return [os.path.join(directory, f) for f in files]


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    return "parquet" if lower.endswith(".parquet") else "arrow" if lower.endswith(
        ".arrow") else "jsonl"


def _arrow_rows(path: str, fields: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row dict) of an Arrow IPC file or stream (what ``datasets`` writes),
    one record batch in memory at a time."""
    import pyarrow as pa
    import pyarrow.ipc

    try:
        source = pa.memory_map(path)
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    except Exception as e:  # ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable Arrow file ({e}); valid: an Arrow IPC file "
                        f"or stream (as datasets' save_to_disk writes), or --data.format=jsonl "
                        f"for JSONL with another extension") from None
    names = None
    num = 0
    for batch in reader:
        if names is None:
            names = [f for f in fields if f in batch.schema.names] or batch.schema.names
        for row in batch.select(names).to_pylist():
            num += 1
            yield num, row


_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) for each non-blank line; parsing waits for the consumer.
    A gzip (``.jsonl.gz``) or zstd (``.jsonl.zst``, with the ``zstandard`` module) file is
    decompressed on the fly, recognised by its first bytes whatever its name says."""
    import gzip
    import io

    with open(path, "rb") as raw:
        magic = raw.peek(4)[:4]  # a pipe may show fewer: read as plain text then
        stream = raw
        if magic.startswith(_GZIP_MAGIC):
            stream = gzip.GzipFile(fileobj=raw)
        elif magic == _ZSTD_MAGIC:
            try:
                import zstandard
            except ImportError:
                raise DataError(f"{path}: zstd-compressed, and the zstandard module is not "
                                f"installed; valid: pip install zstandard, or decompress it "
                                f"(zstd -d)") from None
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        try:
            for line_no, line in enumerate(stream, 1):
                if line.strip():
                    yield line_no, line
        except (OSError, EOFError) as e:  # a truncated or corrupt compressed file
            raise DataError(f"{path}: cannot be read to the end ({type(e).__name__}: {e}); "
                            f"valid: an intact file") from None


def _parquet_rows(path: str, fields: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row dict), one record batch in memory at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable Parquet file ({e}); valid: a Parquet file, or "
                        f"--data.format=jsonl for JSONL with another extension") from None
    with pf:
        # Read only the columns a record can use; with none of them, read all so the error can
        # list the fields the file does have.
        columns = [f for f in fields if f in pf.schema_arrow.names] or None
        rows = (row for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS,
                                                 columns=columns) for row in batch.to_pylist())
        yield from enumerate(rows, 1)
