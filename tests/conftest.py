import json
import random

import pytest

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
