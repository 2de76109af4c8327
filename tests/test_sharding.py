"""Tier 1: the one split table (parallel/sharding.py), the streaming safetensors writer, the HF name maps."""
import json
import math
import os

import pytest
import torch

from megatrain.checkpoint.stream import SafetensorsWriter, read_header
from megatrain.config import ModelConfig
from megatrain.model import Transformer
from megatrain.parallel.sharding import REPLICATED, Split, canonical_name, local_shape, shard, split_of, unshard

LLAMA = ModelConfig(vocab_size=96, n_layers=2, n_heads=6, n_kv_heads=3, d_model=48, d_ff=96, max_seq_len=16, bias=True)
GPT2 = ModelConfig(vocab_size=96, n_layers=2, n_heads=6, d_model=48, max_seq_len=16, norm="layernorm",
                   position="learned", mlp="gelu", bias=True, tie_embeddings=True)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_every_parameter_splits_and_reassembles_exactly(cfg, tp):
    torch.manual_seed(0)
    assert_splits_and_reassembles(Transformer(cfg), tp)


def assert_splits_and_reassembles(model: Transformer, tp: int) -> None:
    """Every parameter cut by the table into tp slices of local_shape, and put back exactly by unshard."""
    for name, p in model.named_parameters():
        split = split_of(name, model.cfg)
        slices = [shard(p.detach(), split, tp, r) for r in range(tp)]
        assert all(tuple(s.shape) == local_shape(tuple(p.shape), split, tp) for s in slices), name
        assert torch.equal(unshard(slices, split), p.detach()), name


def test_the_table_cuts_fused_parts_by_head_groups():
    """qkv rows [q | k | v]: each TP rank takes its query heads AND its KV heads (GQA-aware), never a q/k mix."""
    hd = LLAMA.d_model // LLAMA.n_heads  # 8
    split = split_of("layers.1.attn.qkv.weight", LLAMA)
    assert split == Split(0, (6 * hd, 3 * hd, 3 * hd))
    rows = torch.arange(12 * hd).float().unsqueeze(1)  # row i holds the value i
    r1 = shard(rows, split, 3, 1).squeeze(1).long().tolist()
    q, k, v = range(0, 6 * hd), range(6 * hd, 9 * hd), range(9 * hd, 12 * hd)
    assert r1 == list(q)[2 * hd: 4 * hd] + list(k)[hd: 2 * hd] + list(v)[hd: 2 * hd]
    assert split_of("layers.0.mlp.gate_up.weight", LLAMA).parts == (96, 96)
    assert split_of("layers.0.attn.o_proj.weight", LLAMA) == Split(1)
    for name in ("layers.0.attn.o_proj.bias", "layers.0.mlp.down.bias", "norm.weight", "pos_embed.weight",
                 "layers.0.attn_norm.weight"):
        assert split_of(name, GPT2) == REPLICATED, name
    assert split_of("layers.0.mlp.up_bias", GPT2) == Split(0)


def test_pipeline_names_map_to_the_models_own():
    L = 4
    assert canonical_name("0.embed.weight", L) == "embed.weight"
    assert canonical_name("3.block.attn.qkv.weight", L) == "layers.2.attn.qkv.weight"
    assert canonical_name("5.norm.weight", L) == "norm.weight"
    assert canonical_name("6.lm_head.weight", L) == "lm_head.weight"
    assert canonical_name("tied_modules.embed.pos_embed.weight", L) == "pos_embed.weight"
    assert canonical_name("layers.1.mlp.down.weight", L) == "layers.1.mlp.down.weight"


def test_safetensors_written_one_tensor_at_a_time_load_with_the_library(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4, 2)}
    path = str(tmp_path / "m.safetensors")
    w = SafetensorsWriter(path, [(k, tuple(v.shape), torch.bfloat16 if k == "c" else v.dtype) for k, v in tensors.items()],
                          metadata={"format": "pt"})
    with pytest.raises(ValueError, match="expected a"):
        w.write("b", tensors["b"])  # out of order
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    back = load_file(path)
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    assert back["c"].dtype == torch.bfloat16 and torch.equal(back["c"], tensors["c"].bfloat16())
    header, start = read_header(path)
    assert start % 8 == 0 and set(header) == {"a", "b", "c"}
    with open(path, "r+b") as f:  # cut short: refused, with the sizes
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(ValueError, match="truncated"):
        read_header(path)


def test_a_writer_closed_early_says_what_is_missing(tmp_path):
    w = SafetensorsWriter(str(tmp_path / "x.safetensors"), [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors were never written"):
        w.close()
    w.abort()


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_hf_name_maps_are_inverse_and_cover_every_parameter(cfg):
    from megatrain.checkpoint.hf import family_of, from_hf_tensor, to_hf_tensors

    fam = family_of(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg)
    hf = {}
    vocab = 90  # the last 6 rows are padding: dropped on the way out, zeros on the way back
    for name, p in model.named_parameters():
        for n, t in to_hf_tensors(name, p.detach(), cfg, fam, vocab):
            assert n not in hf
            hf[n] = t.clone()
    for name, p in model.named_parameters():
        back = from_hf_tensor(name, cfg, fam, hf.__getitem__)
        if name in ("embed.weight", "lm_head.weight"):
            assert torch.equal(back[:vocab], p.detach()[:vocab]) and not back[vocab:].any()
        else:
            assert torch.equal(back, p.detach()), name
    n_hf = sum(math.prod(t.shape) for t in hf.values())
    assert n_hf == model.num_params() - 6 * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def test_models_transformers_cannot_represent_are_refused_in_one_line():
    import dataclasses

    from megatrain.checkpoint.reader import CheckpointError
    from megatrain.checkpoint.hf import family_of

    with pytest.raises(CheckpointError, match="masked LM"):
        family_of(dataclasses.replace(LLAMA, objective="mlm"))
    with pytest.raises(CheckpointError, match="no transformers class computes this model"):
        family_of(dataclasses.replace(LLAMA, norm="layernorm"))
    with pytest.raises(CheckpointError, match="no transformers class"):
        family_of(dataclasses.replace(GPT2, n_kv_heads=2))  # GPT-2 has no GQA


def test_max_shard_size_parses_like_transformers():
    from megatrain.checkpoint.reader import CheckpointError
    from megatrain.convert.hf import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 100_000 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    with pytest.raises(CheckpointError, match="expected a size"):
        parse_size("lots")


def test_exported_tokenizers_give_the_same_ids(tmp_path, docs):
    """byte, sentencepiece BPE and unigram, and an HF tokenizer: AutoTokenizer on the export encodes as megatrain."""
    import random

    from transformers import AutoTokenizer

    from conftest import write_jsonl
    from megatrain.data import build_tokenizer
    from megatrain.data.tokenizer import save_hf_tokenizer
    from megatrain.data.train_tokenizer import train_tokenizer

    rng = random.Random(0)  # words of random letters: enough distinct pieces for a unigram vocabulary
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    corpus = write_jsonl(tmp_path / "c.jsonl", [" ".join(rng.choice(words) for _ in range(60)) for _ in range(400)] + docs)
    train_tokenizer([corpus], str(tmp_path / "bpe"), vocab_size=400, model_type="bpe")
    train_tokenizer([corpus], str(tmp_path / "uni"), vocab_size=400, model_type="unigram")
    texts = docs[:200] + ["  two  spaces\nnewline\ttab 12345", " leading", "trailing ", "", "ünïcödé 😀 東京"]
    for spec in ("byte", str(tmp_path / "bpe"), str(tmp_path / "uni")):
        tok = build_tokenizer(spec)
        out = tmp_path / f"hf-{os.path.basename(spec)}"
        save_hf_tokenizer(tok, str(out), 64)
        hf = AutoTokenizer.from_pretrained(str(out))
        for t in texts:
            ids = tok.encode(t)
            assert hf.encode(t, add_special_tokens=False) == ids, (spec, t)
            assert hf.decode(ids) == tok.decode(ids), (spec, t)
        assert hf.eos_token_id == tok.eod_id and len(hf) == tok.vocab_size
    # an HF tokenizer folder saves itself: the sentencepiece export, read as `hf:` and exported again
    tok = build_tokenizer(f"hf:{tmp_path / 'hf-bpe'}")
    save_hf_tokenizer(tok, str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "again")).encode(texts[0], add_special_tokens=False) == \
        build_tokenizer(str(tmp_path / "bpe")).encode(texts[0])
