"""Hugging Face transformers models, read and mapped: the reader of HF folders (config.json + safetensors) and the
tensor maps of the family tables (checkpoint/hf_families.py: Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3,
OLMo 2, GPT-2, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, each the transformers class that computes the same function as
megatrain's model).

Fused megatrain tensors (q|k|v, gate|up) are cut at the sharding table's part sizes (Phi-3 stores them fused as
they are); GPT-2 keeps its Conv1D weights transposed; a MoE layer's stacked experts are one HF tensor per expert.
`megatrain convert to-hf / from-hf` (convert/hf.py) are the commands; `checkpoint.init` and `finetune.init` read HF
folders through here too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open

from megatrain.checkpoint.hf_families import (FAMILIES, GPT2, LLAMA, READS, Family, config_count,  # noqa: F401
                                              family_of, model_config_of)
from megatrain.checkpoint.hf_moe import EXPERT, refuse_architecture
from megatrain.checkpoint.io import why_unreadable
from megatrain.checkpoint.reader import CheckpointError
from megatrain.config import ModelConfig
from megatrain.model import Transformer
from megatrain.parallel.sharding import split_of


VOCAB_ROWS = ("embed.weight", "lm_head.weight")


def hf_names(name: str, fam: Family, experts: int = 0) -> tuple[str, ...]:
    """The HF tensors of megatrain's `name`, in row order (per-expert ones expert by expert, of `experts`)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        prefix, names = fam.layer_prefix.format(m.group(1)), fam.layer[m.group(2)]
        if is_per_expert(names):
            return tuple(prefix + n.replace(EXPERT, str(e)) for e in range(experts) for n in names)
        return tuple(prefix + n for n in names)
    return (fam.top[name],)


def is_per_expert(names: tuple[str, ...]) -> bool:
    return EXPERT in names[0]


def _layer_key(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", name)


def _is_stacked(name: str, fam: Family) -> bool:
    """Whether megatrain's `name` stacks one HF tensor (or fused group) per expert."""
    key = _layer_key(name)
    return key != name and key in fam.layer and is_per_expert(fam.layer[key])


def to_hf_tensors(name: str, t: torch.Tensor, cfg: ModelConfig, fam: Family, vocab: int
                  ) -> list[tuple[str, torch.Tensor]]:
    """One megatrain tensor -> its HF tensors (fused parts cut, Conv1D weights transposed, vocab padding dropped)."""
    names = hf_names(name, fam, cfg.moe_experts)
    if name in VOCAB_ROWS:
        t = t[:vocab]
    if _is_stacked(name, fam):  # [E, rows, in]: each expert's rows cut into its fused parts
        sizes = split_of(name, cfg).parts or (t.shape[1],)
        return list(zip(names, (p for e in range(t.shape[0]) for p in t[e].split(sizes, dim=0))))
    parts = [t] if len(names) == 1 else list(t.split(split_of(name, cfg).parts, dim=0))
    if _layer_key(name) in fam.transposed:
        parts = [p.t() for p in parts]
    return list(zip(names, parts))


def from_hf_tensor(name: str, cfg: ModelConfig, fam: Family, get) -> torch.Tensor:
    """A megatrain tensor from the HF tensors `get(hf_name)` returns (the inverse of to_hf_tensors; vocab rows past
    the HF vocabulary are zero padding)."""
    parts = [get(n) for n in hf_names(name, fam, cfg.moe_experts)]
    if _is_stacked(name, fam):
        k = len(fam.layer[_layer_key(name)])  # fused parts per expert
        return torch.stack([torch.cat(parts[e:e + k], dim=0) for e in range(0, len(parts), k)])
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
    refuse_architecture(c, path, arch)
    fam = READS.get(arch)
    if fam is None:
        raise CheckpointError(f"{path}: architecture {arch} is not supported; supported: {', '.join(READS)}")
    m = model_config_of(c, path, fam)
    return fam, m, m.vocab_size, arch


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
