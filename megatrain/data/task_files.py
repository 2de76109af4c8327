"""Fine-tuning data files, read whole (they are small beside a pretraining corpus); a bad record stops the run with
one line, `file:line: what is wrong`.

    read_records(path, fmt)   jsonl (one JSON object a line), csv or tsv (a header row names the columns)
    read_conll(path)          CoNLL: `token ... tag` a line (tab or space separated, the tag last), a blank line
                              between sentences, -DOCSTART- lines skipped; or jsonl {"tokens": [...], "tags": [...]}
    read_squad(path)          SQuAD v1.1 JSON ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}), or jsonl of
                              {"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}} (or
                              "answers" as SQuAD JSON's list of {"text", "answer_start"}); empty lists: no answer
"""
from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import dataclass, field

from megatrain.data.readers import InputError

FORMATS = ("auto", "jsonl", "csv", "tsv", "conll", "squad")


@dataclass
class Record:
    fields: dict
    where: str  # "file:line"


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    where: str


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]
    starts: list[int]  # character offset of each answer in the context
    where: str
    extra: dict = field(default_factory=dict)


def file_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(ext, "conll")


def _open(path: str):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.endswith(".gz") else \
        open(path, encoding="utf-8", newline="")


def _lines(path: str):
    """(1-based line number, text) of a UTF-8 file; a non-UTF-8 byte is one error line naming where."""
    with _open(path) as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):
                yield n, line
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{n + 1}: not UTF-8 ({e.reason} at byte {e.start})") from None


def read_records(path: str, fmt: str = "auto") -> list[Record]:
    fmt = file_format(path, fmt)
    out: list[Record] = []
    if fmt == "jsonl":
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            out.append(Record(obj, f"{path}:{n}"))
    elif fmt in ("csv", "tsv"):
        with _open(path) as f:
            try:
                reader = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
                header = next(reader, None)
                for row in reader:
                    n = reader.line_num
                    if not any(c.strip() for c in row):
                        continue
                    if len(row) != len(header):
                        raise InputError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
                    out.append(Record(dict(zip(header, row)), f"{path}:{n}"))
            except csv.Error as e:
                raise InputError(f"{path}:{reader.line_num}: malformed {fmt.upper()} ({e})") from None
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    else:
        raise InputError(f"{path}: format {fmt!r} holds no text records; use jsonl, csv or tsv (finetune.format)")
    if not out:
        raise InputError(f"{path}: empty (no examples)")
    return out


def field_of(rec: Record, key: str, what: str = "text") -> str:
    """A required string field of a record."""
    if key not in rec.fields:
        raise InputError(f"{rec.where}: no {key!r} field (the {what}; set finetune.{what}_column to read another)"
                         if what in ("text", "label") else f"{rec.where}: no {key!r} field")
    value = rec.fields[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(f"{rec.where}: field {key!r} should be a string, got {type(value).__name__}")
    return value


def read_conll(path: str, fmt: str = "auto", tags: bool = True) -> list[Sentence]:
    """Sentences of words and tags; with tags=False (to predict them) the tag column, or the jsonl "tags", may be
    missing (tagged "O"), and jsonl may give {"text": ...} split at whitespace."""
    if file_format(path, fmt) == "jsonl":
        out = []
        for rec in read_records(path, "jsonl"):
            words, tags_ = rec.fields.get("tokens"), rec.fields.get("tags", rec.fields.get("ner_tags"))
            if not tags and isinstance(rec.fields.get("text"), str) and words is None:
                words = rec.fields["text"].split()
            if not tags and isinstance(words, list) and tags_ is None:
                tags_ = ["O"] * len(words)
            tags_list = tags_
            if not isinstance(words, list) or not isinstance(tags_list, list) or len(words) != len(tags_list):
                raise InputError(f"{rec.where}: expected \"tokens\" and \"tags\" lists of the same length")
            out.append(Sentence([str(w) for w in words], [str(t) for t in tags_list], rec.where))
        return out
    need_tags = tags
    out, words, tags, start = [], [], [], 0
    for n, line in _lines(path):
        text = line.strip()
        if not text:  # a blank (or whitespace-only) line ends a sentence
            if words:
                out.append(Sentence(words, tags, f"{path}:{start}"))
            words, tags = [], []
            continue
        if text.startswith("-DOCSTART-"):
            continue
        parts = text.split("\t") if "\t" in text else text.split()
        parts = [p for p in parts if p.strip()]
        if len(parts) < 2 and need_tags:
            raise InputError(f"{path}:{n}: a token with no tag (expected `token ... tag`, tab or space separated)")
        if not words:
            start = n
        words.append(parts[0].strip())
        tags.append(parts[-1].strip() if len(parts) > 1 else "O")
    if words:
        out.append(Sentence(words, tags, f"{path}:{start}"))
    if not out:
        raise InputError(f"{path}: empty (no sentences)")
    return out


def check_scheme(sentence: Sentence, scheme: str) -> None:
    """Tags allowed by the labelling scheme: IOB1 (I- may start an entity), IOB2 (every entity starts with B-), BIOES
    (S- for one-token entities, E- ends the others)."""
    prev = "O"
    for i, tag in enumerate(sentence.tags):
        kind, _, label = tag.partition("-")
        if tag != "O" and (kind not in "BIES" or len(kind) != 1 or not label):
            raise InputError(f"{sentence.where}: tag {tag!r} (word {i + 1}) is neither O nor B-/I-/E-/S- TYPE")
        pkind, _, plabel = prev.partition("-")
        if scheme == "iob2" and kind == "I" and (pkind not in "BI" or plabel != label or prev == "O"):
            raise InputError(f"{sentence.where}: tag {tag!r} (word {i + 1}) after {prev!r}: IOB2 starts every entity "
                             f"with B- (set finetune.scheme=iob1 if the file is IOB1)")
        if scheme in ("iob1", "iob2") and kind in "ES":
            raise InputError(f"{sentence.where}: tag {tag!r} (word {i + 1}) is BIOES, not {scheme.upper()} "
                             f"(set finetune.scheme=bioes)")
        if scheme == "bioes" and kind in "IE" and (pkind not in "BI" or plabel != label):
            raise InputError(f"{sentence.where}: tag {tag!r} (word {i + 1}) after {prev!r}: BIOES continues an entity "
                             f"only after B- or I- of the same type")
        prev = tag


def read_squad(path: str, fmt: str = "auto", labeled: bool = True) -> list[QAExample]:
    """Questions with their answers; labeled=False reads a file to predict (questions and contexts only)."""
    if file_format(path, fmt) == "jsonl" and not _is_squad_json(path):
        out = []
        for rec in read_records(path, "jsonl"):
            texts, starts = _answers(rec.fields, rec.where, labeled)
            out.append(_qa(rec.fields, texts, starts, rec.where, path))
        return out
    try:
        with _open(path) as f:
            doc = json.load(f)
    except ValueError as e:
        raise InputError(f"{path}: not a SQuAD JSON file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise InputError(f"{path}: not a SQuAD JSON file (no top-level \"data\" list)")
    out = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                where = f"{path}: question {qa.get('id', '?')}"
                texts, starts = _answers(qa, where, labeled)
                out.append(_qa(dict(qa, context=para.get("context")), texts, starts, where, path))
    if not out:
        raise InputError(f"{path}: empty (no questions)")
    return out


def _is_squad_json(path: str) -> bool:
    with _open(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head[:200]


ANSWERS_SHAPE = '"answers": {"text": [...], "answer_start": [...]}'


def _answers(obj: dict, where: str, labeled: bool) -> tuple[list, list]:
    """A question's answer texts and character offsets: "answers" as {"text": [...], "answer_start": [...]} (Hugging
    Face's squad) or as a list of {"text", "answer_start"} objects (SQuAD JSON's); empty lists say the question has
    no answer (SQuAD 2.0). A question with no "answers" at all, or answers of another shape, is refused where the
    file is trained or scored on: read as "no answer", every target would silently become position 0. A file to
    predict needs only questions and contexts (its answers are not read)."""
    if not labeled:
        return [], []
    if "answers" not in obj:
        fields = ", ".join(json.dumps(k) for k in obj)
        raise InputError(f"{where}: no \"answers\" field (it has {fields}); expected {ANSWERS_SHAPE}, with empty "
                         f"lists for a question that has no answer")
    ans = obj["answers"]
    if isinstance(ans, list) and all(isinstance(a, dict) and set(a) >= {"text", "answer_start"} for a in ans):
        ans = {"text": [a["text"] for a in ans], "answer_start": [a["answer_start"] for a in ans]}
    texts, starts = (ans.get("text"), ans.get("answer_start")) if isinstance(ans, dict) else (None, None)
    if not (isinstance(texts, list) and isinstance(starts, list) and all(isinstance(t, str) for t in texts)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in starts)):
        raise InputError(f"{where}: \"answers\" is {json.dumps(ans)[:80]}; expected {ANSWERS_SHAPE} (strings and "
                         f"character offsets into the context), or a list of {{\"text\", \"answer_start\"}} objects")
    return texts, starts


def _qa(obj: dict, texts: list, starts: list, where: str, path: str) -> QAExample:
    q, ctx = obj.get("question"), obj.get("context")
    if not isinstance(q, str) or not isinstance(ctx, str):
        raise InputError(f"{where}: a question needs \"question\" and \"context\" strings")
    if len(texts) != len(starts):
        raise InputError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    for t, s in zip(texts, starts):
        if not isinstance(s, int) or ctx[s: s + len(t)] != t:
            raise InputError(f"{where}: answer_start {s} does not match its text {t!r} (the context there reads "
                             f"{ctx[s: s + len(t)]!r})" if isinstance(s, int) else f"{where}: answer_start {s!r}")
    return QAExample(str(obj.get("id", where)), q, ctx, list(texts), list(starts), where)
