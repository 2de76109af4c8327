"""Streaming document readers: jsonl, plain text, parquet and saved `datasets` directories.

The corpus is never held in memory: the main process reads raw records in batches (a jsonl line as
bytes, a text document as bytes, a parquet/datasets value as str) and the expensive part — UTF-8
decoding, JSON parsing and tokenisation — happens in `parse_record`, which the preprocess workers
call. Every record carries its file and line (or row) so that a bad one is reported as `file:line`.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
PARQUET_SUFFIXES = (".parquet",)


class InputError(ValueError):
    """A corpus file that cannot be read; the message starts with `file:line:` where known."""


@dataclass
class RecordBatch:
    """Consecutive raw records from one source file."""

    source: str
    kind: str  # "jsonl" (bytes lines), "text" (bytes documents) or "str" (already-decoded values)
    records: list = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # 1-based line (or row) of each record


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs, keep the order given (sorted within a glob), and check that every input exists."""
    out: list[str] = []
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            hits = sorted(glob.glob(pat, recursive=True))
            if not hits:
                raise InputError(f"{pat}: the pattern matches no file")
            out.extend(hits)
        elif os.path.exists(pat):
            out.append(pat)
        else:
            raise InputError(f"{pat}: no such file or directory")
    for p in out:
        input_kind(p)  # fail early on an unsupported file, before any work
    return out


def input_kind(path: str) -> str:
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "datasets"
        raise InputError(f"{path}: a directory that is not a saved `datasets` dataset (no dataset_info.json/state.json)")
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise InputError(
        f"{path}: unknown input type; use .jsonl/.json, .txt (documents separated by a blank line), "
        f".parquet (optionally .gz for the first two), or a `datasets` directory saved with save_to_disk"
    )


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_record_batches(paths: list[str], json_key: str = "text", batch_size: int = 512) -> Iterator[RecordBatch]:
    """Yield raw records from every input in order, `batch_size` at a time, never crossing files."""
    for path in paths:
        kind = input_kind(path)
        if kind == "jsonl":
            yield from _unpacked(path, _jsonl_batches(path, batch_size))
        elif kind == "text":
            yield from _unpacked(path, _text_batches(path, batch_size))
        elif kind == "parquet":
            yield from _parquet_batches(path, json_key, batch_size)
        else:
            yield from _datasets_batches(path, json_key, batch_size)


def _unpacked(path: str, batches: Iterator[RecordBatch]) -> Iterator[RecordBatch]:
    """A compressed file that ends early or is not compressed at all: one line naming it."""
    try:
        yield from batches
    except EOFError:
        raise InputError(f"{path}: the compressed file ends early (truncated?); fetch it again") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: not a valid gzip file ({e}); a .gz name needs gzip data, else rename it") from None


def _jsonl_batches(path: str, batch_size: int) -> Iterator[RecordBatch]:
    batch = RecordBatch(path, "jsonl")
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines between records are allowed
            batch.records.append(line)
            batch.lines.append(lineno)
            if len(batch.records) >= batch_size:
                yield batch
                batch = RecordBatch(path, "jsonl")
    if batch.records:
        yield batch


def _text_batches(path: str, batch_size: int) -> Iterator[RecordBatch]:
    """Documents are runs of non-blank lines; one or more blank lines separate them."""
    batch = RecordBatch(path, "text")
    doc: list[bytes] = []
    start = 0
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not doc:
                    start = lineno
                doc.append(line)
                continue
            if doc:
                batch.records.append(b"".join(doc).rstrip(b"\r\n"))
                batch.lines.append(start)
                doc = []
                if len(batch.records) >= batch_size:
                    yield batch
                    batch = RecordBatch(path, "text")
    if doc:
        batch.records.append(b"".join(doc).rstrip(b"\r\n"))
        batch.lines.append(start)
    if batch.records:
        yield batch


def _parquet_batches(path: str, key: str, batch_size: int) -> Iterator[RecordBatch]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise InputError(f"{path}: no column {key!r} (columns: {', '.join(names)}); pass --json-key with the text column")
    row = 1
    for rb in pf.iter_batches(batch_size=batch_size, columns=[key]):
        values = rb.column(0).to_pylist()
        yield RecordBatch(path, "str", values, list(range(row, row + len(values))))
        row += len(values)


def _datasets_batches(path: str, key: str, batch_size: int) -> Iterator[RecordBatch]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if key not in ds.column_names:
        raise InputError(f"{path}: no column {key!r} (columns: {', '.join(ds.column_names)}); pass --json-key")
    table = ds.data  # arrow-backed, memory-mapped: iterating does not load the dataset
    row = 1
    for rb in table.to_batches(max_chunksize=batch_size):
        values = rb.column(rb.schema.get_field_index(key)).to_pylist()
        yield RecordBatch(path, "str", values, list(range(row, row + len(values))))
        row += len(values)


def parse_record(kind: str, raw, json_key: str) -> str:
    """Decode one raw record to its text, or raise InputError with a short reason (no location)."""
    if kind == "str":
        if raw is None:
            raise InputError(f"value of {json_key!r} is null")
        if not isinstance(raw, str):
            raise InputError(f"value of {json_key!r} is {type(raw).__name__}, expected a string")
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); re-encode the file as UTF-8") from None
    if kind == "text":
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}")
    if json_key not in obj:
        keys = ", ".join(list(obj)[:8])
        raise InputError(f"missing key {json_key!r} (keys: {keys}); pass --json-key")
    value = obj[json_key]
    if not isinstance(value, str):
        raise InputError(f"value of {json_key!r} is {type(value).__name__}, expected a string")
    return value


def iter_texts(paths: list[str], json_key: str = "text", skip_bad_lines: bool = False, stats: dict | None = None) -> Iterator[str]:
    """Documents as text, in order, in this process (used by tokenizer training)."""
    for batch in iter_record_batches(paths, json_key):
        for raw, line in zip(batch.records, batch.lines):
            try:
                yield parse_record(batch.kind, raw, json_key)
            except InputError as e:
                if not skip_bad_lines:
                    raise InputError(f"{batch.source}:{line}: {e}") from None
                if stats is not None:
                    stats["bad_lines"] = stats.get("bad_lines", 0) + 1
