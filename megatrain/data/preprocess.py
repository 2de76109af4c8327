"""`megatrain preprocess`: raw text -> tokenized, memory-mapped `P.bin` + `P.idx`.

The main process streams raw records (readers.py) and writes tokens; `--workers` processes decode,
parse and tokenise batches. At most a few batches per worker are in flight, so memory stays flat
however large the corpus, and output order equals input order whatever the worker count.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from megatrain.data.indexed import IndexedDatasetWriter, token_dtype_for_vocab
from megatrain.data.readers import InputError, RecordBatch, expand_inputs, iter_record_batches, parse_record
from megatrain.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer
from megatrain.fileio import check_output_path

BATCH_DOCS = 256  # records per task sent to a worker
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: bounds memory while keeping workers busy


@dataclass
class TokenizedBatch:
    tokens: np.ndarray  # every kept document's ids, concatenated
    sizes: np.ndarray  # tokens per kept document
    errors: list[tuple[int, str]]  # (line, reason) of records that could not be parsed
    empty: int  # documents with no tokens (dropped)
    nbytes: int  # raw bytes consumed, for the progress bar


_worker: dict = {}


def _init_worker(spec: str, json_key: str, append_eod: bool, dtype: str, skip_bad: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=build_tokenizer(spec), key=json_key, eod=append_eod, dtype=np.dtype(dtype), skip=skip_bad)


def _tokenize(batch: RecordBatch) -> TokenizedBatch:
    tok: Tokenizer = _worker["tok"]
    texts, errors = [], []
    for raw, line in zip(batch.records, batch.lines):
        try:
            texts.append(parse_record(batch.kind, raw, _worker["key"]))
        except InputError as e:
            errors.append((line, str(e)))
    nbytes = sum(len(r) for r in batch.records if r is not None)
    if errors and not _worker["skip"]:  # the main process will stop: don't spend time tokenising
        return TokenizedBatch(np.zeros(0, _worker["dtype"]), np.zeros(0, np.int64), errors, 0, nbytes)
    eod = [tok.eod_id] if _worker["eod"] else []
    if isinstance(tok, ByteTokenizer):
        encoded = [tok.encode_bytes(t) for t in texts]
        sizes = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
        flat = np.frombuffer(b"".join(encoded), np.uint8).astype(_worker["dtype"])
        if eod:
            flat = np.insert(flat, np.cumsum(sizes), tok.eod_id)
            sizes += 1
    else:
        ids = tok.encode_batch(texts)
        sizes = np.fromiter((len(x) + len(eod) for x in ids), np.int64, len(ids))
        chain = itertools.chain.from_iterable((x + eod) if eod else x for x in ids)
        flat = np.fromiter(chain, _worker["dtype"], int(sizes.sum()))
    keep = sizes > 0
    empty = int((~keep).sum())
    return TokenizedBatch(flat, sizes[keep], errors, empty, nbytes)


def preprocess(
    inputs: list[str],
    tokenizer: str,
    output_prefix: str,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    skip_bad_lines: bool = False,
    progress: bool | None = None,
) -> dict:
    """Tokenise `inputs` into `output_prefix.{bin,idx}` (plus `.meta.json`); returns the summary."""
    check_output_path(output_prefix, "--output-prefix", example="data")  # empty, a folder, a parent not writable
    paths = expand_inputs(inputs)
    for ext in (".bin", ".idx", ".meta.json"):
        check_output_path(output_prefix + ext, "--output-prefix", inputs=[("--input", p) for p in paths])
    tok = build_tokenizer(tokenizer)
    dtype = np.dtype(token_dtype_for_vocab(tok.vocab_size))
    init_args = (tokenizer, json_key, append_eod, dtype.str, skip_bad_lines)
    stats = dict(documents=0, tokens=0, bad_lines=0, empty_documents=0)
    total_bytes = sum(os.path.getsize(p) for p in paths) if all(os.path.isfile(p) and not p.endswith(".gz") for p in paths) else None
    bar = _progress_bar(total_bytes, progress)
    t0 = time.perf_counter()

    batches = iter_record_batches(paths, json_key, BATCH_DOCS)
    pool = None
    if workers > 1:
        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init_args)
        results = _ordered_bounded(pool, batches, workers * IN_FLIGHT_PER_WORKER)
    else:
        _init_worker(*init_args)
        results = ((b, _tokenize(b)) for b in batches)
    try:
        with IndexedDatasetWriter(output_prefix, dtype=dtype) as writer:
            for batch, res in results:
                if res.errors:
                    if not skip_bad_lines:
                        line, reason = res.errors[0]
                        raise InputError(f"{batch.source}:{line}: {reason} (or pass --skip-bad-lines)")
                    stats["bad_lines"] += len(res.errors)
                writer.add_documents(res.tokens, res.sizes)
                stats["documents"] += len(res.sizes)
                stats["tokens"] += int(res.sizes.sum())
                stats["empty_documents"] += res.empty
                if bar is not None:
                    bar.update(res.nbytes)
                    secs = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{stats['tokens'] / secs:,.0f} tok/s, {stats['documents'] / secs:,.0f} docs/s", refresh=False)
            if stats["documents"] == 0:  # raised inside the writer: nothing is kept
                raise InputError(f"{', '.join(paths)}: no documents to write ({stats['bad_lines']:,} bad lines and "
                                 f"{stats['empty_documents']:,} empty documents skipped); check the files and --json-key")
            meta_tmp = f"{output_prefix}.meta.json.tmp{os.getpid()}"
            stats["seconds"] = round(time.perf_counter() - t0, 3)
            meta = dict(
                tokenizer=tok.spec, vocab_size=tok.vocab_size, eod_id=tok.eod_id, append_eod=append_eod,
                dtype=str(dtype), json_key=json_key, inputs=[os.path.abspath(p) for p in paths], **stats,
            )
            with open(meta_tmp, "w") as f:
                json.dump(meta, f, indent=2)
            writer.add_file_on_finalize(meta_tmp, f"{output_prefix}.meta.json")
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            results.close()  # waits for the batches in flight (see _ordered_bounded)
            pool.terminate()
            pool.join()
    stats["dtype"] = str(dtype)
    return stats


def _ordered_bounded(pool, batches, max_in_flight: int):
    """Like pool.imap, but reads ahead at most `max_in_flight` batches (imap would read everything)."""
    window: collections.deque = collections.deque()
    try:
        for batch in batches:
            window.append((batch, pool.apply_async(_tokenize, (batch,))))
            if len(window) >= max_in_flight:
                b, r = window.popleft()
                yield b, r.get()
        while window:
            b, r = window.popleft()
            yield b, r.get()
    finally:
        # NOTE: stopped early (a bad line, Ctrl-C), the batches still in flight are waited for before the caller's
        # pool.terminate(): terminating while the pool's task thread is still writing a large batch into a full pipe
        # can leave that thread, and terminate() with it, blocked forever (CPython's Pool).
        for _, r in window:
            r.wait(timeout=60)


def _progress_bar(total_bytes: int | None, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm  # only for a terminal (tqdm imports importlib.metadata, email, ...: skipped otherwise)

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, smoothing=0.1)


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="jsonl / txt / parquet files (globs ok, .gz ok for jsonl/txt) or saved `datasets` directories")
    p.add_argument("--tokenizer", required=True, metavar="SPEC",
                   help="'byte', a sentencepiece .model, a tokenizer.json, or a directory holding one")
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin, P.idx and P.meta.json")
    p.add_argument("--json-key", default="text", help="field (jsonl) or column (parquet, datasets) with the text")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1: in the main process)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count unreadable records instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")


def command(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    s = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key, args.workers,
                   args.append_eod, args.skip_bad_lines, progress=False if args.no_progress else None)
    secs = max(s["seconds"], 1e-9)
    extra = ""
    if s["bad_lines"] or s["empty_documents"]:
        extra = f"; skipped {s['bad_lines']:,} bad lines and {s['empty_documents']:,} empty documents"
    print(f"preprocess: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}) in {secs:.2f} s "
          f"({s['tokens'] / secs:,.0f} tokens/s, {s['documents'] / secs:,.0f} docs/s){extra} "
          f"-> {args.output_prefix}.bin, {args.output_prefix}.idx")
    return 0
