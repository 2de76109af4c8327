"""The tasks' own metrics, by their standard definitions.

    classification_metrics   accuracy, per-class and macro precision / recall / F1, the confusion matrix
    entity_metrics           entity-level precision / recall / F1 by exact span match, per type, and token accuracy:
                             seqeval's (the CoNLL-2000 conlleval rules for IOB1/IOB2; strict BIOES spans)
    squad_metrics            exact match and F1 after the official SQuAD v1.1 answer normalisation (lower case, no
                             punctuation, no articles a/an/the, single spaces), best over the gold answers
    generation_metrics       generated text against one reference each (sft): exact match of the stripped texts,
                             ROUGE-1/2/L F-measure (rouge-score, stemmed) averaged over examples, corpus BLEU and
                             chrF (sacrebleu's defaults); all in percent
"""
from __future__ import annotations

import collections
import re
import string


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]  # [gold][predicted]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    per_class = {}
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[g][i] for g in range(n))
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = dict(precision=precision, recall=recall, f1=f1, support=support)
    present = [v for v in per_class.values() if v["support"]] or list(per_class.values())
    return dict(accuracy=sum(g == p for g, p in zip(gold, pred)) / max(1, len(gold)),
                macro_precision=sum(v["precision"] for v in present) / len(present),
                macro_recall=sum(v["recall"] for v in present) / len(present),
                macro_f1=sum(v["f1"] for v in present) / len(present),
                per_class=per_class, confusion=confusion, labels=list(labels))


def entity_metrics(gold: list[list[str]], pred: list[list[str]], scheme: str = "iob2") -> dict:
    """Entity-level scores over sentences of tags (seqeval), and the share of tags that are right."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOBES

    kw = dict(mode="strict", scheme=IOBES) if scheme == "bioes" else {}
    report = classification_report(gold, pred, output_dict=True, zero_division=0, **kw)
    per_type = {k: dict(precision=float(v["precision"]), recall=float(v["recall"]), f1=float(v["f1-score"]),
                        support=int(v["support"])) for k, v in report.items() if not k.endswith(" avg")}
    tags = [(g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
    return dict(precision=float(precision_score(gold, pred, zero_division=0, **kw)),  # plain floats, not numpy's:
                recall=float(recall_score(gold, pred, zero_division=0, **kw)),       # they go into checkpoints
                f1=float(f1_score(gold, pred, zero_division=0, **kw)),
                token_accuracy=sum(g == p for g, p in tags) / max(1, len(tags)), per_type=per_type)


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], answers: list[list[str]]) -> dict:
    """Exact match and F1 in percent, each the best over an example's gold answers, averaged over examples."""
    em = [max((exact_match(p, a) for a in golds), default=0.0) for p, golds in zip(predictions, answers)]
    f = [max((f1(p, a) for a in golds), default=0.0) for p, golds in zip(predictions, answers)]
    return dict(exact_match=100 * sum(em) / max(1, len(em)), f1=100 * sum(f) / max(1, len(f)))


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def generation_score_names(names: list[str]) -> list[str]:
    """What generation_metrics reports for the metric names of finetune.generation_metrics (rouge: three scores)."""
    return [k for name in names for k in (ROUGE_TYPES if name == "rouge" else (name,))]


def generation_metrics(predictions: list[str], references: list[str], names: list[str]) -> dict:
    """The named metrics (exact_match, rouge, bleu, chrf) of predictions against their references, in percent."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n, out = max(1, len(predictions)), {}
    if "exact_match" in names:
        out["exact_match"] = 100 * sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    if "rouge" in names:
        from rouge_score.rouge_scorer import RougeScorer

        scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        scores = [scorer.score(r, p) for p, r in zip(predictions, references)]  # (target, prediction)
        out.update({k: 100 * sum(s[k].fmeasure for s in scores) / n for k in ROUGE_TYPES})
    if "bleu" in names:
        from sacrebleu import corpus_bleu

        out["bleu"] = float(corpus_bleu(predictions, [references]).score)
    if "chrf" in names:
        from sacrebleu import corpus_chrf

        out["chrf"] = float(corpus_chrf(predictions, [references]).score)
    return {k: float(v) for k, v in out.items()}  # plain floats: they go into checkpoints
