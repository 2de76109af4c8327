"""Extractive question answering: the answer is a span of the context.

Files: SQuAD v1.1 JSON, or jsonl {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}
(task_files.read_squad); every answer_start is checked against its text. A row is the question, an end-of-document
token and a window of the context (the question first, so that under a causal model every context token has read
it); a context longer than a row is cut into windows that share finetune.doc_stride tokens (each starts that many
tokens before the end of the one before; a run refuses a doc_stride not below the narrowest window). The span head
gives every position a start and an end logit; training points both at the answer's first and last token in the
window that holds it, and at position 0 (never a context token) in the others. A prediction is the best-scoring span
over all of an example's windows (start <= end, at most finetune.max_answer_tokens long), mapped back to its
characters of the context and widened to whole words (a span that starts inside a word takes all of it). Metrics:
exact match and F1 with the official SQuAD answer normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatrain.data.task_files import read_squad
from megatrain.model import IGNORE_INDEX
from megatrain.tasks.base import Batch, Examples, FinetuneTask, pad_rows
from megatrain.tasks.metrics import squad_metrics

TOP = 20  # candidate starts and ends per window


def narrowest_window(max_len: int) -> int:
    """The fewest context tokens a row holds: max_len less the longest question (cut to half a row) and the
    end-of-document token between them. finetune.doc_stride must be below it (finetune.check_model)."""
    return max_len - max_len // 2 - 1


def char_to_token(offsets: list[tuple[int, int]], char: int) -> int:
    """The token whose span holds character `char` (the next token when it falls between two)."""
    for i, (a, b) in enumerate(offsets):
        if char < b and a < b:
            return i
    return len(offsets) - 1


def whole_words(context: str, start: int, end: int) -> str:
    """The span's text, widened to whole words: a span that starts or ends inside a word (a sub-word token) takes
    the rest of it, as an answer is words of the context."""
    while start > 0 and context[start - 1].isalnum() and context[start].isalnum():
        start -= 1
    while end < len(context) and context[end - 1].isalnum() and context[end].isalnum():
        end += 1
    return context[start:end].strip()


class QA(FinetuneTask):
    name = "qa"
    metric = "val_f1"
    metrics = ("val_loss", "val_exact_match", "val_f1")

    def encode(self, path: str, train: bool, labeled: bool = True) -> Examples:
        f = self.cfg.finetune
        items, examples, truncated = [], [], 0
        for k, ex in enumerate(read_squad(path, f.format, labeled)):
            q = self.tok.encode(ex.question)[: self.max_len // 2]
            ctx, offsets = self.tok.encode_with_offsets(ex.context)
            base = len(q) + 1
            width = self.max_len - base  # at least narrowest_window(max_len)
            # consecutive windows share doc_stride tokens: each starts width - doc_stride tokens after the last. A
            # fine-tuning run refuses a doc_stride not below every window; a checkpoint saved before that check may
            # hold one: its windows overlap by half (never a step of 1 token, which multiplied the rows ~100-fold)
            stride = width - (f.doc_stride if f.doc_stride < width else width // 2)
            answer = None
            if ex.answers:
                a0, a1 = ex.starts[0], ex.starts[0] + len(ex.answers[0])
                answer = (char_to_token(offsets, a0), char_to_token(offsets, max(a0, a1 - 1)))
            starts = list(range(0, max(1, len(ctx) - width + stride), stride))
            truncated += len(starts) > 1
            for s in starts:
                window = ctx[s: s + width]
                start = end = 0
                if answer and s <= answer[0] and answer[1] < s + len(window):
                    start, end = base + answer[0] - s, base + answer[1] - s
                items.append(dict(ids=q + [self.tok.eod_id] + window, start=start, end=end, base=base, first=s,
                                  example=k))
            examples.append(dict(id=ex.id, context=ex.context, offsets=offsets, answers=ex.answers))
        out = Examples(items, self.cfg.train.seed, shuffle=train, truncated=truncated)
        out.examples = examples
        return out

    def collate(self, items: list, device) -> Batch:
        tokens, segments = pad_rows([it["ids"] for it in items], self.pad)
        labels = torch.tensor([[it["start"], it["end"]] for it in items], dtype=torch.long)
        allowed = torch.zeros(tokens.shape, dtype=torch.bool)
        for b, it in enumerate(items):
            allowed[b, 0] = True  # "not in this window"
            allowed[b, it["base"]: len(it["ids"])] = True
        return Batch(tokens.to(device), labels.to(device), segments.to(device), dict(allowed=allowed.to(device)))

    def logits(self, engine, batch: Batch) -> torch.Tensor:
        out = engine(*batch.model_inputs(labels=False))
        return out.masked_fill(~batch.extra["allowed"].unsqueeze(-1), float("-inf"))

    def span_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(logits[..., 0], labels[:, 0], ignore_index=IGNORE_INDEX)
                + F.cross_entropy(logits[..., 1], labels[:, 1], ignore_index=IGNORE_INDEX)) / 2

    def loss(self, engine, batch: Batch) -> torch.Tensor:
        return self.span_loss(self.logits(engine, batch), batch.labels)

    def forward_eval(self, engine, batch: Batch):
        logits = self.logits(engine, batch)
        return self.span_loss(logits, batch.labels), logits

    def outputs(self, logits, batch: Batch, items: list) -> list:
        """Each window's best spans: (score, first token, last token) in context-token numbering."""
        out = []
        limit = self.cfg.finetune.max_answer_tokens
        for b, it in enumerate(items):
            start, end = logits[b, :, 0], logits[b, :, 1]
            k = min(TOP, len(it["ids"]) - it["base"])
            s_top, e_top = start[it["base"]:].topk(k), end[it["base"]:].topk(k)
            best = []
            for si, sv in zip(s_top.indices.tolist(), s_top.values.tolist()):
                for ei, ev in zip(e_top.indices.tolist(), e_top.values.tolist()):
                    if si <= ei < si + limit:
                        best.append((sv + ev, it["first"] + si, it["first"] + ei))
            out.append(sorted(best, reverse=True)[:TOP])
        return out

    def answers(self, examples: Examples, results: list) -> list[str]:
        """The predicted answer text of every example: its best span over all its windows."""
        best: dict[int, tuple] = {}
        for it, spans in zip(examples.items, results):
            for span in spans[:1]:
                if it["example"] not in best or span[0] > best[it["example"]][0]:
                    best[it["example"]] = span
        texts = []
        for k, ex in enumerate(examples.examples):
            if k not in best:
                texts.append("")
                continue
            _, a, b = best[k]
            texts.append(whole_words(ex["context"], ex["offsets"][a][0], ex["offsets"][b][1]))
        return texts

    def score(self, examples: Examples, results: list) -> dict:
        return squad_metrics(self.answers(examples, results), [ex["answers"] for ex in examples.examples])

    def present(self, examples: Examples, results: list) -> list[dict]:
        return [dict(id=ex["id"], answer=a) for ex, a in zip(examples.examples, self.answers(examples, results))]
