"""`megatrain data-info P`: what is in a `.bin/.idx` pair, and a decoded sample."""
from __future__ import annotations

import argparse
import os

import numpy as np

from megatrain.data.indexed import IndexedDataset, bin_path, idx_path
from megatrain.data.readers import InputError
from megatrain.data.tokenizer import build_tokenizer, check_same_vocabulary
from megatrain.fileio import read_json


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", metavar="P", help="dataset prefix (P.bin + P.idx)")
    p.add_argument("--tokenizer", metavar="SPEC", help="tokenizer to decode with (default: the one in P.meta.json)")
    p.add_argument("--doc", type=int, default=0, help="which document to decode (default 0)")
    p.add_argument("--max-chars", type=int, default=400, help="characters of the decoded sample to print")


def command(args: argparse.Namespace) -> int:
    ds = IndexedDataset(args.prefix)
    meta_file = f"{args.prefix}.meta.json"
    meta = read_json(meta_file, "remake it with `megatrain preprocess`, or remove it") if os.path.isfile(meta_file) else {}
    tok = build_tokenizer(args.tokenizer) if args.tokenizer else None
    if tok and meta.get("tokenizer"):  # another vocabulary than the one that made the ids decodes them to garbage
        check_same_vocabulary(tok, f"--tokenizer {args.tokenizer}", meta["tokenizer"],
                              f"{args.prefix} was made with ({meta_file})", meta.get("vocab_size"))
    sizes = ds.document_sizes()
    disk = os.path.getsize(bin_path(args.prefix)) + os.path.getsize(idx_path(args.prefix))
    print(f"dataset:    {args.prefix}")
    print(f"documents:  {ds.num_documents:,}" + (f" ({len(ds):,} sequences)" if len(ds) != ds.num_documents else ""))
    print(f"tokens:     {ds.num_tokens:,}")
    if len(sizes):
        print(f"doc length: mean {sizes.mean():,.1f}, min {int(sizes.min()):,}, median {int(np.median(sizes)):,}, max {int(sizes.max()):,}")
    print(f"dtype:      {ds.dtype}")
    print(f"on disk:    {_human(disk)}")
    spec = args.tokenizer or meta.get("tokenizer")
    if spec:
        print(f"tokenizer:  {spec}" + (f" (vocab {meta['vocab_size']:,}, eod appended: {meta['append_eod']})" if "vocab_size" in meta else ""))
    if not len(ds):
        return 0
    if not 0 <= args.doc < ds.num_documents:
        raise InputError(f"--doc {args.doc}: the dataset has {ds.num_documents} documents")
    first, last = int(ds.doc_idx[args.doc]), int(ds.doc_idx[args.doc + 1])
    ids = np.concatenate([ds[i] for i in range(first, last)]) if last > first else np.zeros(0, ds.dtype)
    print(f"document {args.doc} ({len(ids):,} tokens): ids {ids[:16].tolist()}{' ...' if len(ids) > 16 else ''}")
    if spec:
        text = (tok or build_tokenizer(spec)).decode(ids.tolist())
        more = " ..." if len(text) > args.max_chars else ""
        print("decoded:    " + repr(text[: args.max_chars]) + more)
    return 0
