"""Every tokenizer kind behind one interface; the specs that name nothing fail in one line."""
import os

import pytest

from megatrain.data import TokenizerError, build_tokenizer
from megatrain.data.train_tokenizer import train_tokenizer
from megatrain.data.readers import InputError


def make_hf_tokenizer_json(path, texts):
    """A small byte-level BPE tokenizer.json trained offline with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    text = "héllo\nwörld 東京 😀"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.vocab_size == 260 and {tok.eod_id, tok.pad_id, tok.bos_id, tok.mask_id} == {256, 257, 258, 259}
    assert tok.decode(ids + [tok.eod_id]) == text  # special tokens decode to nothing


def test_sentencepiece_train_and_round_trip(tmp_path, corpus_jsonl, docs):
    out = tmp_path / "sp"
    stats = train_tokenizer([corpus_jsonl], str(out), vocab_size=320, model_type="bpe")
    assert stats["documents"] == len(docs) and os.path.isfile(out / "tokenizer.model")
    for spec in (str(out), str(out / "tokenizer.model"), f"sentencepiece:{out / 'tokenizer.model'}"):
        tok = build_tokenizer(spec)
        assert tok.vocab_size == 320 and tok.eod_id == 2 and tok.pad_id == 3 and tok.mask_id is not None
        for d in docs[:20]:
            assert tok.decode(tok.encode(d)) == d
        assert tok.encode_batch(docs[:3]) == [tok.encode(d) for d in docs[:3]]
    # unseen characters fall back to bytes instead of <unk>
    assert tok.decode(tok.encode("Ωmega ∑")) == "Ωmega ∑"


def test_unigram_trains(tmp_path):
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(rng.sample(words, 30)) for _ in range(400)))
    train_tokenizer([str(tmp_path / "c.txt")], str(tmp_path / "u"), vocab_size=400, model_type="unigram")
    tok = build_tokenizer(str(tmp_path / "u"))
    assert tok.decode(tok.encode("the quick fox")) == "the quick fox"


def test_train_tokenizer_errors_leave_nothing(tmp_path, corpus_jsonl):
    with pytest.raises(InputError, match="raise --vocab-size"):
        train_tokenizer([corpus_jsonl], str(tmp_path / "small"), vocab_size=100)
    with pytest.raises(InputError, match="lower it"):
        train_tokenizer([corpus_jsonl], str(tmp_path / "huge"), vocab_size=50000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: malformed JSON"):
        train_tokenizer([str(bad)], str(tmp_path / "b"), vocab_size=300)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "corpus.jsonl"]


def test_hf_tokenizer_json_and_directory(tmp_path, docs):
    path = make_hf_tokenizer_json(tmp_path / "tokenizer.json", docs)
    for spec in (path, f"hf:{path}", str(tmp_path)):
        tok = build_tokenizer(spec)
        assert tok.eod_id == 0 and tok.vocab_size == 300
        for d in docs[:20]:
            assert tok.decode(tok.encode(d)) == d
    # a directory written by transformers' save_pretrained loads offline through AutoTokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>", pad_token="<pad>")
    hf.save_pretrained(tmp_path / "hfdir")
    tok = build_tokenizer(str(tmp_path / "hfdir"))
    assert tok.eod_id == 0 and tok.pad_id == 1
    assert tok.decode(tok.encode(docs[0])) == docs[0]


@pytest.mark.parametrize("spec,match", [
    ("bytes", "unknown tokenizer spec 'bytes'"),
    ("/no/such/tokenizer.model", "unknown tokenizer spec"),
    ("hf:/no/such", "does not exist"),
])
def test_unknown_specs(spec, match):
    with pytest.raises(TokenizerError, match=match):
        build_tokenizer(spec)


def test_file_that_is_not_a_model(tmp_path):
    p = tmp_path / "junk.model"
    p.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        build_tokenizer(str(p))
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(TokenizerError, match="neither tokenizer.model nor tokenizer.json"):
        build_tokenizer(str(d))
