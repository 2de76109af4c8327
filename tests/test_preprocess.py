"""preprocess: every input kind, any worker count, the same bytes; bad input stops cleanly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatrain.data import IndexedDataset, InputError, build_tokenizer
from megatrain.data.preprocess import preprocess
from megatrain.data.train_tokenizer import train_tokenizer

from conftest import write_jsonl
from test_tokenizer import make_hf_tokenizer_json


def decoded_documents(prefix, spec, eod):
    ds, tok = IndexedDataset(prefix), build_tokenizer(spec)
    out = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        if eod:
            assert ids[-1] == tok.eod_id
            ids = ids[:-1]
        out.append(tok.decode(ids))
    return out


@pytest.fixture
def tokenizer_specs(tmp_path, corpus_jsonl, docs):
    train_tokenizer([corpus_jsonl], str(tmp_path / "sp"), vocab_size=320)
    hf = make_hf_tokenizer_json(tmp_path / "hf.json", docs)
    return {"byte": "byte", "sentencepiece": str(tmp_path / "sp"), "hf": hf}


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "hf"])
def test_decoded_tokens_spell_the_documents(tmp_path, corpus_jsonl, docs, tokenizer_specs, kind):
    spec = tokenizer_specs[kind]
    one, two = str(tmp_path / "w1"), str(tmp_path / "w2")
    s = preprocess([corpus_jsonl], spec, one, workers=1, append_eod=True)
    preprocess([corpus_jsonl], spec, two, workers=2, append_eod=True)
    assert s["documents"] == len(docs)
    assert decoded_documents(one, spec, eod=True) == docs
    # ordered output: 2 workers write exactly the bytes 1 worker writes
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(two + ext, "rb").read()
    meta = json.load(open(one + ".meta.json"))
    assert meta["documents"] == len(docs) and meta["append_eod"] is True


def test_text_parquet_datasets_and_glob_inputs(tmp_path, docs):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d.replace("\n", " ") for d in docs[:50]]  # a blank line would split a text document
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:20]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n\n\n".join(docs[20:30]), encoding="utf-8")
    pq.write_table(pa.table({"content": docs[30:40], "n": list(range(10))}), tmp_path / "c.parquet", row_group_size=3)
    datasets.Dataset.from_dict({"content": docs[40:50]}).save_to_disk(str(tmp_path / "d_ds"))
    out = str(tmp_path / "out" / "mix")
    s = preprocess([str(tmp_path / "*.txt"), str(tmp_path / "c.parquet"), str(tmp_path / "d_ds")], "byte", out,
                   json_key="content", workers=2)
    assert s["documents"] == 50
    assert decoded_documents(out, "byte", eod=False) == docs


def test_gzip_jsonl(tmp_path, docs):
    import gzip

    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:10])
    preprocess([str(tmp_path / "c.jsonl.gz")], "byte", str(tmp_path / "g"))
    assert decoded_documents(str(tmp_path / "g"), "byte", eod=False) == docs[:10]


def _bad_corpus(tmp_path, docs, bad_line: bytes, at: int = 7):
    lines = [json.dumps({"text": d}).encode() for d in docs[:600]]
    lines.insert(at - 1, bad_line)
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    return str(p)


@pytest.mark.parametrize("bad,reason", [
    (b'{"text": "unterminated', "malformed JSON"),
    (b'{"body": "no text key"}', "missing key 'text'"),
    (b'{"text": 42}', "value of 'text' is int"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    (b'["a list"]', "expected a JSON object"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_stops_with_its_line_number_and_leaves_nothing(tmp_path, docs, bad, reason, workers):
    docs = docs * 3
    path = _bad_corpus(tmp_path, docs, bad, at=420)  # in the second batch of records
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"bad\.jsonl:420: {reason}"):
        preprocess([path], "byte", str(out / "p"), workers=workers)
    assert not out.exists() or os.listdir(out) == []


STOP_MANY_TIMES = """
import sys
from megatrain.data import InputError
from megatrain.data.preprocess import preprocess
for i in range(40):
    try:
        preprocess([sys.argv[1]], "byte", f"{sys.argv[2]}/{i}/p", workers=2)
    except InputError:
        pass
"""


def test_stopping_two_workers_on_a_bad_line_never_hangs(tmp_path):
    """A bad line stops the pool while batches are still in flight; 40 stops in a row, each must return (a pool
    terminated while its task thread was writing into a full pipe used to hang within a few)."""
    lines = [json.dumps({"text": f"doc {i} " * (20 + i % 50)}).encode() for i in range(1800)]  # batches of ~60 kB
    lines[419] = b"{oops"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    r = subprocess.run([sys.executable, "-c", STOP_MANY_TIMES, str(path), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any(files for _, _, files in os.walk(tmp_path / "out"))


def test_skip_bad_lines_counts_them(tmp_path, docs):
    path = _bad_corpus(tmp_path, docs, b"{oops", at=3)
    with open(path, "ab") as f:
        f.write(b'{"text": ""}\n{"other": 1}\n')
    s = preprocess([path], "byte", str(tmp_path / "p"), workers=2, skip_bad_lines=True)
    assert s["bad_lines"] == 2 and s["empty_documents"] == 1 and s["documents"] == len(docs)
    assert decoded_documents(str(tmp_path / "p"), "byte", eod=False) == docs


def test_failure_keeps_an_earlier_complete_output(tmp_path, corpus_jsonl, docs):
    out = str(tmp_path / "p")
    preprocess([corpus_jsonl], "byte", out)
    before = open(out + ".bin", "rb").read()
    bad = _bad_corpus(tmp_path, docs, b"{", at=2)
    with pytest.raises(InputError):
        preprocess([bad], "byte", out)
    assert open(out + ".bin", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "corpus.jsonl", "p.bin", "p.idx", "p.meta.json"]


def test_large_vocab_uses_int32(tmp_path, docs):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab.update({"<|endoftext|>": 70000, "[UNK]": 70001})
    for j, w in enumerate(sorted({w for d in docs for w in d.split()})):
        vocab[w] = 70002 + j
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    s = preprocess([write_jsonl(tmp_path / "c.jsonl", docs[:5])], str(tmp_path / "tokenizer.json"), str(tmp_path / "p"))
    assert s["dtype"] == "int32" and IndexedDataset(str(tmp_path / "p")).dtype == np.int32
    assert int(IndexedDataset(str(tmp_path / "p"))[0].max()) >= 70002


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "megatrain", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_end_to_end_and_one_line_errors(tmp_path, corpus_jsonl, docs):
    r = run_cli("train-tokenizer", "--input", corpus_jsonl, "--vocab-size", "320", "--output", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    r = run_cli("preprocess", "--input", corpus_jsonl, "--tokenizer", str(tmp_path / "tok"),
                "--output-prefix", str(tmp_path / "p"), "--workers", "2", "--append-eod")
    assert r.returncode == 0, r.stderr
    assert f"{len(docs):,} documents" in r.stdout
    r = run_cli("data-info", str(tmp_path / "p"), "--doc", "1")
    assert r.returncode == 0, r.stderr
    assert f"documents:  {len(docs)}" in r.stdout and repr(docs[1]) in r.stdout

    bad = _bad_corpus(tmp_path, docs, b'{"text": "x"', at=5)
    for args, msg in [
        (("preprocess", "--input", bad, "--tokenizer", "byte", "--output-prefix", str(tmp_path / "q")), "bad.jsonl:5: malformed JSON"),
        (("preprocess", "--input", corpus_jsonl, "--tokenizer", "nonsense", "--output-prefix", str(tmp_path / "q")), "unknown tokenizer spec"),
        (("preprocess", "--input", str(tmp_path / "*.nothing"), "--tokenizer", "byte", "--output-prefix", str(tmp_path / "q")), "matches no file"),
        (("data-info", str(tmp_path / "missing")), "no such file"),
    ]:
        r = run_cli(*args)
        assert r.returncode == 1 and msg in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(n.startswith("q.") for n in os.listdir(tmp_path))


def test_preprocess_and_data_info_never_import_torch(tmp_path, corpus_jsonl):
    """Data preparation runs where torch is not wanted (a login node, a CPU-only tokenising job): `megatrain preprocess`
    and `data-info` go through the same `cli.main` as pretrain, whose end of run touches torch.distributed only where
    the command imported it."""
    prefix = str(tmp_path / "p")
    code = ("import sys; from megatrain.cli import main; "
            f"rcs = [main(['preprocess', '--input', {corpus_jsonl!r}, '--tokenizer', 'byte', '--output-prefix', "
            f"{prefix!r}, '--no-progress']), main(['data-info', {prefix!r}])]; "
            "print('rcs', rcs, 'torch imported:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rcs [0, 0] torch imported: False" in r.stdout, r.stdout[-2000:]
