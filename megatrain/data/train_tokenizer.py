"""`megatrain train-tokenizer`: train a sentencepiece vocabulary on your own corpus.

Documents stream from the same readers as `preprocess` (jsonl, txt, parquet, datasets), line by line,
into sentencepiece; at most `--max-sentences` lines are sampled, so a many-GB corpus needs no more
memory than that sample. The output directory holds `tokenizer.model` (+ `tokenizer.vocab`) and is
itself a tokenizer spec: `--tokenizer DIR`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Iterator

from megatrain.data.readers import InputError, expand_inputs, iter_texts
from megatrain.fileio import check_output_path

OUTPUTS = ("tokenizer.model", "tokenizer.vocab")  # what the output folder holds
SPECIAL = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3)  # eos (</s>) is the end-of-document token
MIN_COVERAGE, MIN_SENTENCES = 0.98, 100  # sentencepiece refuses a coverage below 0.98 and a sample of <= 100 lines


def _lines(paths: list[str], json_key: str, max_line_bytes: int, stats: dict) -> Iterator[str]:
    for text in iter_texts(paths, json_key, skip_bad_lines=stats["skip_bad_lines"], stats=stats):
        stats["documents"] += 1
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield line[:max_line_bytes]


def train_tokenizer(
    inputs: list[str],
    output_dir: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_key: str = "text",
    max_sentences: int = 2_000_000,
    character_coverage: float = 0.9995,
    skip_bad_lines: bool = False,
    seed: int = 1234,
) -> dict:
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise InputError(f"--model-type must be bpe or unigram, got {model_type!r}")
    if vocab_size < 8:
        raise InputError(f"--vocab-size must be at least 8, got {vocab_size}")
    # sentencepiece's own ranges (trainer_interface.cc), checked here so they read as flags, not INTERNAL checks
    if not MIN_COVERAGE <= character_coverage <= 1.0:
        raise InputError(f"--character-coverage {character_coverage}: must be between {MIN_COVERAGE} and 1 (the "
                         f"share of the corpus's characters given pieces of their own; rarer ones become bytes)")
    if max_sentences <= MIN_SENTENCES:
        raise InputError(f"--max-sentences {max_sentences}: must be above {MIN_SENTENCES} (lines sampled from the "
                         f"corpus; default 2,000,000)")
    paths = expand_inputs(inputs)
    check_output_path(output_dir, "--output", kind="folder", inputs=[("--input", p) for p in paths],
                      example="tokenizer")
    other = sorted(set(os.listdir(output_dir)) - set(OUTPUTS)) if os.path.isdir(output_dir) else []
    if other:  # the folder is replaced whole: only a tokenizer's own
        raise InputError(f"--output {output_dir}: an existing folder that holds other files ({', '.join(other[:3])}"
                         f"{', ...' if len(other) > 3 else ''}); it would be replaced whole: name a new folder")
    stats = dict(documents=0, skip_bad_lines=skip_bad_lines, bad_lines=0)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".train-tokenizer-", dir=os.path.dirname(os.path.abspath(output_dir)))
    t0 = time.perf_counter()
    spm.set_random_generator_seed(seed)
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(paths, json_key, 4096, stats),
                model_prefix=os.path.join(work, "tokenizer"),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                byte_fallback=True,  # unseen characters become bytes, never <unk>
                control_symbols=["<mask>"],  # for masked LM; never produced from text
                split_digits=True,
                allow_whitespace_only_pieces=True,
                remove_extra_whitespaces=False,
                normalization_rule_name="identity",  # keep text exactly; newlines round-trip via byte fallback
                num_threads=os.cpu_count() or 1,
                minloglevel=2,
                **SPECIAL,
            )
        except RuntimeError as e:
            if stats["documents"] == 0:
                raise InputError(f"{', '.join(paths)}: no text to train on (empty files, or every record "
                                 f"skipped)") from None
            msg = str(e).splitlines()[0] if str(e) else "sentencepiece failed"
            if "smaller than required" in msg:
                msg = msg.split("] ")[-1].split(".")[0] + ": raise --vocab-size (byte fallback alone needs 256 + 4 special pieces)"
            elif "Vocabulary size too high" in msg:
                msg = msg.split("] ")[-1].split(".")[0] + ": the corpus is too small for this --vocab-size, lower it"
            raise InputError(msg) from None
        if stats["documents"] == 0:
            raise InputError("the inputs hold no documents")
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(work, output_dir)  # the directory appears only once complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(documents=stats["documents"], bad_lines=stats["bad_lines"], seconds=time.perf_counter() - t0,
                model=os.path.join(output_dir, "tokenizer.model"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB", help="training corpus (as for preprocess)")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces, special tokens included")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="sentencepiece algorithm")
    p.add_argument("--output", required=True, metavar="DIR", help="writes DIR/tokenizer.model and DIR/tokenizer.vocab")
    p.add_argument("--json-key", default="text", help="field (jsonl) or column (parquet, datasets) with the text")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="lines sampled from the corpus for training, above 100 (default 2,000,000)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters the vocabulary covers, 0.98 to 1 (default 0.9995)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip unreadable records instead of stopping")


def command(args: argparse.Namespace) -> int:
    s = train_tokenizer(args.input, args.output, args.vocab_size, args.model_type, args.json_key,
                        args.max_sentences, args.character_coverage, args.skip_bad_lines)
    print(f"train-tokenizer: {args.vocab_size}-piece {args.model_type} vocabulary from {s['documents']:,} documents "
          f"in {s['seconds']:.1f} s -> {s['model']} (use --tokenizer {args.output})")
    return 0
