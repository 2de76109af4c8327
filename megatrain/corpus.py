"""The built-in corpus: the Python standard library's own sources, on every machine with Python.

`megatrain pretrain` with no `data.path` trains on it, so the first command a new user runs needs no
download. It goes through the same path as user data — a jsonl of documents, `train-tokenizer`
(sentencepiece BPE) and `preprocess` — once, cached under ~/.cache/megatrain (or $MEGATRAIN_CACHE).
"""
from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig

from megatrain.config import ConfigError
from megatrain.data.indexed import dataset_exists
from megatrain.data.preprocess import preprocess
from megatrain.data.train_tokenizer import train_tokenizer
from megatrain.fileio import atomic_path, cache_dir

VOCAB_SIZE = 2048  # small: the tiny model's embedding stays cheap and each piece is seen often


def cache_root() -> str:
    return os.path.join(cache_dir(), f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}")


def source_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = ("/test/", "/tests/", "/idlelib/", "/site-packages/", "/dist-packages/", "/lib2to3/", "/encodings/")
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if not any(s in f.replace(os.sep, "/") for s in skip))
    if not files:
        raise ConfigError(f"no Python sources under {root}: set data.path to your own dataset")
    return files


def builtin_corpus_paths() -> tuple[str, str]:
    """(dataset prefix, tokenizer spec) of the standard-library corpus in the cache."""
    root = cache_root()
    return os.path.join(root, "stdlib"), os.path.join(root, "tokenizer")


def ensure_builtin_corpus(log=print) -> tuple[str, str]:
    """Build (once) and return (dataset prefix, tokenizer spec) of the standard-library corpus."""
    root = cache_root()
    prefix, tok_dir = builtin_corpus_paths()
    if dataset_exists(prefix) and os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        return prefix, tok_dir
    os.makedirs(root, exist_ok=True)
    files = source_files()
    jsonl = os.path.join(root, "sources.jsonl")
    with atomic_path(jsonl) as tmp, open(tmp, "w") as out:  # the file closes, then the rename
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                out.write(json.dumps({"text": text}) + "\n")
    log(f"built-in corpus: {len(files)} Python standard-library files -> {jsonl}; training a {VOCAB_SIZE}-piece tokenizer ...")
    train_tokenizer([jsonl], tok_dir, vocab_size=VOCAB_SIZE, model_type="bpe", max_sentences=300_000)
    stats = preprocess([jsonl], tok_dir, prefix, workers=max(1, min(4, os.cpu_count() or 1)), append_eod=True, progress=False)
    log(f"built-in corpus: {stats['documents']:,} documents, {stats['tokens']:,} tokens -> {prefix}.bin/.idx (cached)")
    return prefix, tok_dir
