import json
import os
import random
import sys

import pytest

# The tests start hundreds of Python processes (CLI commands, ranks), each importing torch and DeepSpeed. Where the
# environment sets PYTHONDONTWRITEBYTECODE (some containers and CI images do), each of them would compile those
# packages from source again: ~2.5 s a process on 2 cores. The test run caches bytecode like a default Python does.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

WORDS = ("the quick brown fox jumps over a lazy dog near river stone under light and dark "
         "king queen castle horse sword café naïve 東京 😀").split()


def make_documents(n: int, seed: int = 0, min_words: int = 1, max_words: int = 60) -> list[str]:
    """Deterministic synthetic documents, some multi-line, some non-ASCII."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        if len(words) > 10 and i % 3 == 0:
            words.insert(5, "\n")
        docs.append(" ".join(words).replace(" \n ", "\n") + f" #{i}")
    return docs


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": 1}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture
def docs():
    return make_documents(300)


@pytest.fixture
def corpus_jsonl(tmp_path, docs):
    return write_jsonl(tmp_path / "corpus.jsonl", docs)
