"""Sequence classification: a text (or a pair of texts) -> one of finetune.labels.

Files: jsonl {"text": ..., "label": ..., ["text_pair": ...]}, or csv/tsv with a header row; finetune.text_column,
text_pair_column and label_column name other fields. Labels are any strings: the set in the training file, sorted,
becomes the run's labels (unless finetune.labels names them; saved with every checkpoint); a label in another file
that training never saw is refused.
A causal model reads the text, an end-of-document token (and the pair, and another one) and is classified at that
last token, which has read everything; see heads.SequenceClassifier for the pooling.
"""
from __future__ import annotations

import torch

from megatrain.data.readers import InputError
from megatrain.data.task_files import field_of, read_records
from megatrain.model import IGNORE_INDEX
from megatrain.tasks.base import Batch, Examples, FinetuneTask, pad_rows
from megatrain.tasks.metrics import classification_metrics


class Classify(FinetuneTask):
    name = "classify"
    metric = "val_accuracy"
    metrics = ("val_loss", "val_accuracy", "val_macro_precision", "val_macro_recall", "val_macro_f1")

    def _label(self, rec) -> str:
        return field_of(rec, self.cfg.finetune.label_column, "label").strip()

    def prepare(self, train_file: str) -> None:
        if not self.labels:
            self.labels = sorted({self._label(r) for r in read_records(train_file, self.cfg.finetune.format)})
        if len(self.labels) < 2:
            raise InputError(f"{train_file}: only one label ({self.labels[0]!r}); classification needs two or more")

    def encode(self, path: str, train: bool, labeled: bool = True) -> Examples:
        f = self.cfg.finetune
        index = {name: i for i, name in enumerate(self.labels)}
        items, truncated = [], 0
        for rec in read_records(path, f.format):
            if not labeled and f.label_column not in rec.fields:
                label = None
            elif (label := self._label(rec)) not in index:
                raise InputError(f"{rec.where}: label {label!r} never occurs in the training file "
                                 f"({', '.join(self.labels[:10])}{' ...' if len(self.labels) > 10 else ''})")
            ids = self.tok.encode(field_of(rec, f.text_column, "text")) + [self.tok.eod_id]
            pair = rec.fields.get(f.text_pair_column)
            if isinstance(pair, str) and pair:
                ids += self.tok.encode(pair) + [self.tok.eod_id]
            if len(ids) > self.max_len:
                ids, truncated = ids[: self.max_len - 1] + [self.tok.eod_id], truncated + 1
            items.append(dict(ids=ids, label=index[label] if label is not None else IGNORE_INDEX, record=rec.fields))
        return Examples(items, self.cfg.train.seed, shuffle=train, truncated=truncated)

    def collate(self, items: list, device) -> Batch:
        tokens, segments = pad_rows([it["ids"] for it in items], self.pad)
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return Batch(tokens.to(device), labels.to(device), segments.to(device))

    def forward_eval(self, engine, batch: Batch):
        logits = engine(*batch.model_inputs(labels=False))
        return torch.nn.functional.cross_entropy(logits, batch.labels), logits

    def outputs(self, logits, batch: Batch, items: list) -> list:
        probs = logits.float().softmax(-1)
        return list(zip(probs.argmax(-1).tolist(), probs.max(-1).values.tolist()))

    def score(self, examples: Examples, results: list) -> dict:
        m = classification_metrics([it["label"] for it in examples.items], [r[0] for r in results],
                                   self.labels)
        return {k: v for k, v in m.items() if k not in ("labels",)}

    def present(self, examples: Examples, results: list) -> list[dict]:
        labels = self.labels
        return [dict(it["record"], prediction=labels[r[0]], score=r[1]) for it, r in zip(examples.items, results)]
