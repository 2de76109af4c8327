"""Token classification (named entities and other tagging): a tag for every word of a sentence.

Files: CoNLL (`word ... tag` a line, the tag last, tab or space separated; a blank line between sentences; -DOCSTART-
skipped) or jsonl {"tokens": [...], "tags": [...]}. Tags follow finetune.scheme (iob1, iob2, bioes), checked on every
sentence; the training file's tag set, sorted, becomes the run's labels (unless finetune.labels names them). A
sentence is tokenized as its words joined by spaces, and each word's tag is learned and predicted on one of its
pieces: the first for a bidirectional model, the last for a causal one (a causal model's first piece has not yet
seen the rest of its word); the other pieces carry no loss. Metrics: entity-level precision/recall/F1 by exact span
(seqeval), per type, and token accuracy.
"""
from __future__ import annotations

import torch

from megatrain.data.readers import InputError
from megatrain.data.task_files import check_scheme, read_conll
from megatrain.model import IGNORE_INDEX
from megatrain.tasks.base import Batch, Examples, FinetuneTask, pad_rows
from megatrain.tasks.metrics import entity_metrics


def word_pieces(tok, words: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of the words joined by single spaces, and the word each token belongs to (-1: none, e.g. a lone
    space): the word whose characters the token's first non-space character falls in."""
    text, starts = "", []
    for w in words:
        text += (" " if text else "")
        starts.append(len(text))
        text += w
    ids, offsets = tok.encode_with_offsets(text)
    owner, w = [], 0
    for a, b in offsets:
        while a < b and text[a] == " ":
            a += 1
        while w + 1 < len(starts) and a >= starts[w + 1]:
            w += 1
        inside = a < b and starts[w] <= a < starts[w] + len(words[w])
        owner.append(w if inside else -1)
    return ids, owner


def label_positions(owner: list[int], n_words: int, causal: bool) -> list[int]:
    """The token that carries each word's tag: its last piece (causal) or its first (bidirectional); -1 for a word
    that no token covers (cut by max_seq_len)."""
    pos = [-1] * n_words
    for i, w in enumerate(owner):
        if w >= 0 and (causal or pos[w] < 0):
            pos[w] = i
    return pos


class Tokens(FinetuneTask):
    name = "tokens"
    metric = "val_f1"
    metrics = ("val_loss", "val_precision", "val_recall", "val_f1", "val_token_accuracy")

    def prepare(self, train_file: str) -> None:
        if not self.labels:
            self.labels = sorted({t for s in read_conll(train_file, self.cfg.finetune.format) for t in s.tags})

    def encode(self, path: str, train: bool, labeled: bool = True) -> Examples:
        f = self.cfg.finetune
        index = {t: i for i, t in enumerate(self.labels)}
        causal = self.cfg.model.objective == "causal"
        items, truncated = [], 0
        for sent in read_conll(path, f.format, tags=labeled):
            if labeled:
                check_scheme(sent, f.scheme)
            for i, t in enumerate(sent.tags):
                if labeled and t not in index:
                    raise InputError(f"{sent.where}: tag {t!r} (word {i + 1}) never occurs in the training file")
            ids, owner = word_pieces(self.tok, sent.words)
            if len(ids) > self.max_len:
                ids, owner, truncated = ids[: self.max_len], owner[: self.max_len], truncated + 1
            pos = label_positions(owner, len(sent.words), causal)
            labels = [IGNORE_INDEX] * len(ids)
            for w, p in enumerate(pos):
                if p >= 0 and labeled:
                    labels[p] = index[sent.tags[w]]
            items.append(dict(ids=ids, labels=labels, positions=pos, tags=sent.tags, words=sent.words))
        return Examples(items, self.cfg.train.seed, shuffle=train, truncated=truncated)

    def collate(self, items: list, device) -> Batch:
        tokens, segments = pad_rows([it["ids"] for it in items], self.pad)
        labels = torch.full(tokens.shape, IGNORE_INDEX, dtype=torch.long)
        for b, it in enumerate(items):
            labels[b, : len(it["labels"])] = torch.tensor(it["labels"])
        return Batch(tokens.to(device), labels.to(device), segments.to(device))

    def forward_eval(self, engine, batch: Batch):
        logits = engine(*batch.model_inputs(labels=False))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
        return loss, logits

    def outputs(self, logits, batch: Batch, items: list) -> list:
        best = logits.argmax(-1).tolist()
        labels = self.labels
        # a word with no token (cut by max_seq_len) is predicted O
        return [[labels[best[b][p]] if p >= 0 else "O" for p in it["positions"]] for b, it in enumerate(items)]

    def score(self, examples: Examples, results: list) -> dict:
        return entity_metrics([it["tags"] for it in examples.items], results, self.cfg.finetune.scheme)

    def present(self, examples: Examples, results: list) -> list[dict]:
        """Each sentence's words, predicted tags and entities with their character offsets in the words joined by
        single spaces."""
        from seqeval.metrics.sequence_labeling import get_entities

        out = []
        for it, tags in zip(examples.items, results):
            words, starts, at = it["words"], [], 0
            for w in words:
                starts.append(at)
                at += len(w) + 1
            spans = get_entities(tags)
            ents = [dict(type=t, text=" ".join(words[a: b + 1]), start=starts[a], end=starts[b] + len(words[b]),
                         words=[a, b + 1]) for t, a, b in spans]
            out.append(dict(words=words, tags=tags, entities=ents))
        return out
