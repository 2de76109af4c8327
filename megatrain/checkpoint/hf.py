"""Hugging Face transformers models, read and mapped: the one table per family that names, for every megatrain
parameter, the HF tensors it fuses, and the reader of HF folders (config.json + safetensors).

Two families, each the transformers class that computes the same function as megatrain's model:
    llama  rmsnorm + rope + swiglu, causal; GQA, tied or untied, biases on every linear or on none
           <-> LlamaForCausalLM (MistralForCausalLM reads the same: the same weights and layers)
    gpt2   layernorm + learned positions + tanh-GeLU + biases, multi-head attention, causal <-> GPT2LMHeadModel

Fused megatrain tensors (q|k|v, gate|up) are cut at the sharding table's part sizes; GPT-2 keeps its Conv1D weights
transposed. `megatrain convert to-hf / from-hf` (convert/hf.py) are the commands; `checkpoint.init` and
`finetune.init` read HF folders through here too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from megatrain.checkpoint.io import why_unreadable
from megatrain.checkpoint.reader import CheckpointError
from megatrain.config import ModelConfig, kv_heads
from megatrain.model import Transformer
from megatrain.parallel.sharding import split_of


@dataclass(frozen=True)
class Family:
    architecture: str
    top: dict  # megatrain name -> HF name, outside the blocks
    layer: dict  # megatrain name after "layers.N." -> HF names after layer_prefix (fused parts, in row order)
    layer_prefix: str
    transposed: tuple[str, ...] = ()  # HF weights stored [in, out] (GPT-2's Conv1D)


LLAMA = Family(
    "LlamaForCausalLM",
    {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
     "lm_head.weight": "lm_head.weight"},
    {"attn_norm.weight": ("input_layernorm.weight",),
     "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
     "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
     "attn.o_proj.weight": ("self_attn.o_proj.weight",), "attn.o_proj.bias": ("self_attn.o_proj.bias",),
     "mlp_norm.weight": ("post_attention_layernorm.weight",),
     "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
     "mlp.gate_up.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
     "mlp.down.weight": ("mlp.down_proj.weight",), "mlp.down.bias": ("mlp.down_proj.bias",)},
    "model.layers.{}.")
GPT2 = Family(
    "GPT2LMHeadModel",
    {"embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
     "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
     "lm_head.weight": "lm_head.weight"},
    {"attn_norm.weight": ("ln_1.weight",), "attn_norm.bias": ("ln_1.bias",),
     "attn.qkv.weight": ("attn.c_attn.weight",), "attn.qkv.bias": ("attn.c_attn.bias",),
     "attn.o_proj.weight": ("attn.c_proj.weight",), "attn.o_proj.bias": ("attn.c_proj.bias",),
     "mlp_norm.weight": ("ln_2.weight",), "mlp_norm.bias": ("ln_2.bias",),
     "mlp.up.weight": ("mlp.c_fc.weight",), "mlp.up_bias": ("mlp.c_fc.bias",),
     "mlp.down.weight": ("mlp.c_proj.weight",), "mlp.down.bias": ("mlp.c_proj.bias",)},
    "transformer.h.{}.",
    transposed=("attn.qkv.weight", "attn.o_proj.weight", "mlp.up.weight", "mlp.down.weight"))
READS = {"LlamaForCausalLM": LLAMA, "MistralForCausalLM": LLAMA, "GPT2LMHeadModel": GPT2}
VOCAB_ROWS = ("embed.weight", "lm_head.weight")


def family_of(m: ModelConfig) -> Family:
    """The transformers class that computes megatrain's model, or one line on why none does."""
    if m.objective != "causal":
        raise CheckpointError(f"model.objective={m.objective}: transformers has no causal-LM class for a masked LM; "
                              f"use `megatrain convert consolidate` for its weights")
    shape = (m.norm, m.position, m.mlp)
    if shape == ("rmsnorm", "rope", "swiglu"):
        return LLAMA
    if shape == ("layernorm", "learned", "gelu") and m.bias and kv_heads(m) == m.n_heads:
        return GPT2
    raise CheckpointError(f"model.norm={m.norm}, position={m.position}, mlp={m.mlp}, bias={m.bias}, "
                          f"n_kv_heads={kv_heads(m)}: no transformers class computes this model (LlamaForCausalLM: "
                          f"rmsnorm+rope+swiglu; GPT2LMHeadModel: layernorm+learned+gelu with biases and no GQA)")


def hf_names(name: str, fam: Family) -> tuple[str, ...]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return tuple(fam.layer_prefix.format(m.group(1)) + n for n in fam.layer[m.group(2)])
    return (fam.top[name],)


def _layer_key(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", name)


def to_hf_tensors(name: str, t: torch.Tensor, cfg: ModelConfig, fam: Family, vocab: int
                  ) -> list[tuple[str, torch.Tensor]]:
    """One megatrain tensor -> its HF tensors (fused parts cut, Conv1D weights transposed, vocab padding dropped)."""
    names = hf_names(name, fam)
    if name in VOCAB_ROWS:
        t = t[:vocab]
    parts = [t] if len(names) == 1 else list(t.split(split_of(name, cfg).parts, dim=0))
    if _layer_key(name) in fam.transposed:
        parts = [p.t() for p in parts]
    return list(zip(names, parts))


def from_hf_tensor(name: str, cfg: ModelConfig, fam: Family, get) -> torch.Tensor:
    """A megatrain tensor from the HF tensors `get(hf_name)` returns (the inverse of to_hf_tensors; vocab rows past
    the HF vocabulary are zero padding)."""
    parts = [get(n) for n in hf_names(name, fam)]
    if _layer_key(name) in fam.transposed:
        parts = [p.t() for p in parts]
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if name in VOCAB_ROWS and t.shape[0] < cfg.vocab_size:
        t = torch.cat([t, t.new_zeros(cfg.vocab_size - t.shape[0], *t.shape[1:])])
    return t


class HFWeights:
    """The tensors of a Hugging Face model folder, read one at a time: model.safetensors or its sharded index;
    pytorch_model.bin only when trusted (and even then with weights_only=True)."""

    def __init__(self, hf_dir: str, trust_pickle: bool = False):
        self.dir, self.files = hf_dir, {}
        st_index = os.path.join(hf_dir, "model.safetensors.index.json")
        bin_index = os.path.join(hf_dir, "pytorch_model.bin.index.json")
        if os.path.isfile(st_index) or os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            self.kind = "safetensors"
            self.map = self._index(st_index, "model.safetensors")
        elif os.path.isfile(bin_index) or os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
            if not trust_pickle:
                raise CheckpointError(f"{hf_dir}: its weights are only in pytorch_model.bin, a pickle that can run "
                                      f"code; pass --trust-pickle if you trust where it came from (read with "
                                      f"weights_only=True)")
            self.kind = "bin"
            self.map = self._index(bin_index, "pytorch_model.bin")
        else:
            raise CheckpointError(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json) holding the "
                                  f"weights")

    def _index(self, index: str, single: str) -> dict[str, str]:
        if not os.path.isfile(index):
            return {k: single for k in self._open(single).keys()}
        try:
            with open(index) as f:
                return json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid weight index ({e})") from None

    def _open(self, file: str):
        if file not in self.files:
            path = os.path.join(self.dir, file)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: named by the weight index but missing")
            if self.kind == "safetensors":
                try:
                    self.files[file] = safe_open(path, "pt")
                except (SafetensorError, OSError) as e:  # a header that does not describe the file, an I/O error
                    raise CheckpointError(f"{path}: unreadable ({str(e).strip()[:200]})") from None
            else:
                try:
                    self.files[file] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    why = why_unreadable(path, e)  # None: an intact file and another error, raised as it is
                    if why is None:
                        raise
                    raise CheckpointError(f"{path}: unreadable: {why}") from None
        return self.files[file]

    def close(self) -> None:
        """Unmap the files (their pages read so far count in this process's resident memory until then)."""
        self.files.clear()

    def key(self, name: str) -> str | None:
        """The stored name of `name` (some files drop the model./transformer. prefix)."""
        for k in (name, name.split(".", 1)[1]):
            if k in self.map:
                return k
        return None

    def get(self, name: str) -> torch.Tensor:
        k = self.key(name)
        if k is None:
            raise CheckpointError(f"{self.dir}: weight {name} missing (an incomplete checkpoint, or not the "
                                  f"architecture config.json names)")
        f = self._open(self.map[k])
        return (f.get_tensor(k) if self.kind == "safetensors" else f[k]).float()

    def shape(self, name: str) -> tuple[int, ...]:
        k = self.key(name)
        if k is None:
            self.get(name)  # raises the missing-weight line
        f = self._open(self.map[k])
        return tuple(f.get_slice(k).get_shape()) if self.kind == "safetensors" else tuple(f[k].shape)


REQUIRED = object()  # config_count's default for a key every config.json of the family has


def config_count(c: dict, key: str, path: str, default=REQUIRED):
    """config.json's `key`, a whole number above 0; `default` where the key is absent or null (transformers' own
    default). One line naming the file and the key when a required one is missing or a value is not such a number."""
    v = c.get(key)
    if v is None:
        if default is REQUIRED:
            raise CheckpointError(f"{path}: no {key}; a Hugging Face config.json of this architecture names it "
                                  f"(add it, or save the model again with transformers' save_pretrained)")
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CheckpointError(f"{path}: {key} {v!r} is not a whole number above 0")
    return v


def read_hf_config(hf_dir: str) -> tuple[Family, ModelConfig, int, str]:
    """config.json -> (family, megatrain ModelConfig, the HF vocabulary size, the architecture); one line for what
    megatrain cannot run."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{hf_dir}: no config.json; not a Hugging Face model folder")
    try:
        with open(path) as f:
            c = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: not a JSON object of settings; not a Hugging Face model config")
    arch = (c.get("architectures") or [None])[0]
    fam = READS.get(arch)
    if fam is None:
        raise CheckpointError(f"{path}: architecture {arch} is not supported; supported: {', '.join(READS)}")

    def refuse(what: str):
        raise CheckpointError(f"{path}: {what}, which megatrain's model does not compute")

    def count(key: str, default=REQUIRED):
        return config_count(c, key, path, default)

    V = count("vocab_size")
    if fam is LLAMA:
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            refuse(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
        if c.get("hidden_act", "silu") != "silu":
            refuse(f"hidden_act {c['hidden_act']!r} (not silu)")
        d, nh = count("hidden_size"), count("num_attention_heads")
        if c.get("head_dim") not in (None, d // nh):
            refuse(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads")
        bias = bool(c.get("attention_bias", False))
        if bool(c.get("mlp_bias", bias)) != bias:
            refuse("biases on attention but not the MLP (or the reverse)")
        max_len = count("max_position_embeddings", 2048)
        window = count("sliding_window", None)
        if window and window < max_len:
            print(f"note: {arch} attends within a {window}-token sliding window; megatrain reads at most that many "
                  f"tokens (model.max_seq_len={window})", file=sys.stderr)
            max_len = window
        m = ModelConfig(vocab_size=V, n_layers=count("num_hidden_layers"), n_heads=nh,
                        n_kv_heads=count("num_key_value_heads", nh), d_model=d, d_ff=count("intermediate_size"),
                        max_seq_len=max_len, norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6), position="rope",
                        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), mlp="swiglu", bias=bias,
                        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                        init_std=c.get("initializer_range", 0.02))
    else:
        act = c.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            refuse(f"activation_function {act!r} (megatrain's GeLU is gelu_new's tanh form or the exact gelu)")
        if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True) \
                or c.get("add_cross_attention"):
            refuse("attention scaled by layer, unscaled or with cross-attention")
        d = count("n_embd", 768)
        m = ModelConfig(vocab_size=V, n_layers=count("n_layer", 12), n_heads=count("n_head", 12), d_model=d,
                        d_ff=count("n_inner", 4 * d), max_seq_len=count("n_positions", 1024), norm="layernorm",
                        norm_eps=c.get("layer_norm_epsilon", 1e-5), position="learned", mlp="gelu",
                        gelu="erf" if act == "gelu" else "tanh", bias=True,
                        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
                        init_std=c.get("initializer_range", 0.02))
    return fam, m, V, arch


def check_hf_weights(weights: HFWeights, m: ModelConfig, fam: Family, vocab: int) -> None:
    """Every tensor the model needs is there with the shape config.json implies (one line for the first that isn't)."""
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(m, fused_kernels="off"))
    for name, p in model.named_parameters():
        for n, t in to_hf_tensors(name, torch.empty(p.shape, device="meta"), m, fam, vocab):
            have = weights.shape(n)
            if tuple(have) != tuple(t.shape):
                raise CheckpointError(f"{weights.dir}: {n} has shape {tuple(have)}, but config.json makes it "
                                      f"{tuple(t.shape)}; the weights do not fit the config")


def load_hf_weights(model, hf_dir: str, trust_pickle: bool = False) -> None:
    """Fill a full megatrain model from a Hugging Face folder, one tensor at a time."""
    fam = read_hf_config(hf_dir)[0]
    weights = HFWeights(hf_dir, trust_pickle)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(from_hf_tensor(name, model.cfg, fam, weights.get))


def has_tokenizer(hf_dir: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return any(os.path.isfile(os.path.join(hf_dir, f)) for f in names)
