"""Weights that start a run (checkpoint.init, finetune.init): a megatrain checkpoint of any layout, a `convert`
output, or a Hugging Face folder (read through checkpoint/hf.py's maps, as `convert from-hf` does).

    src = WeightSource(path)            # nothing loaded yet: the model's shape and tokenizer spec are known
    weights, new = src.weights(model)   # model built on the meta device; weights(name) reads one full tensor, for
    run.engine(model, weights,          # parallelize.fill to keep this rank's slice of; `new`: the parameters the
               release=src.close)       # source lacks (a task head, LoRA adapters), valued by new_value(name, shape);
                                        # the files close once every slice is placed
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

from megatrain.checkpoint.hf import HFWeights, from_hf_tensor, read_hf_config
from megatrain.checkpoint.io import STATE_FILE
from megatrain.checkpoint.reader import CheckpointError, CheckpointReader
from megatrain.config import ModelConfig
from megatrain.model import Transformer

NEW_PARTS = ("score.", "tagger.", "span.", "lora_")  # what a fine-tuning model adds to a pretrained one


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, STATE_FILE)) \
        and not os.path.isfile(os.path.join(path, "latest"))


class WeightSource:
    def __init__(self, path: str, tp: int = 1, tag: str | None = None, verify: str = "size"):
        """`verify`: how a megatrain checkpoint's files are compared with its manifest here (every rank builds a
        source, so by default sizes only; Run.verify_init then shares the CRC-32s over the ranks)."""
        self.path, self.reader, self.hf = path, None, None
        if is_hf_folder(path):
            self.family, m, vocab, arch = read_hf_config(path)
            step = math.lcm(m.pad_vocab_multiple, tp)  # rows TP can split; the padding is zeros, never sampled
            m.vocab_size, m.true_vocab_size = -(-vocab // step) * step, vocab
            self.model, self.tokenizer = m, f"hf:{os.path.abspath(path)}"
            self.hf = HFWeights(path)
            self.where = f"{path} ({arch})"
        elif any(os.path.isfile(os.path.join(path, f)) for f in ("latest", STATE_FILE)):
            self.reader = CheckpointReader(path, tag, verify=verify)
            self.model, self.tokenizer = self.reader.cfg.model, self.reader.cfg.data.tokenizer
            self.where = self.reader.where
        else:
            why = "no such directory" if not os.path.isdir(path) else "no latest, megatrain.json or config.json"
            raise CheckpointError(f"{path}: neither a megatrain checkpoint nor a Hugging Face model folder ({why})")

    @property
    def model_config(self) -> ModelConfig:
        return self.model

    def _names(self) -> set[str]:
        if self.reader:
            return set(self.reader.names())
        with torch.device("meta"):
            return set(dict(Transformer(dataclasses.replace(self.model, fused_kernels="off")).named_parameters()))

    def _tensor(self, name: str) -> torch.Tensor:
        if self.reader:
            return self.reader.tensor(name)
        return from_hf_tensor(name, self.model, self.family, self.hf.get)

    def weights(self, model: torch.nn.Module, new_value=None):
        """(weights, new) for `model` as built, before any split (on the meta device: shapes only): weights(name) is
        the full tensor of a parameter, the source's, or new_value(name, shape) for one of the parts a fine-tuning
        model adds (a task head, LoRA adapters), listed in `new`. A model with any other parameter the source lacks
        is refused here, before anything is read; a tensor of another shape when it is read."""
        have = self._names()
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        new = [n for n in shapes if n not in have]
        missing = [n for n in new if new_value is None or not any(part in n for part in NEW_PARTS)]
        if missing:
            raise CheckpointError(f"{self.where}: has no {missing[0]} (and {len(missing) - 1} more); it is not a model "
                                  f"of this shape")

        def weights(name: str) -> torch.Tensor:
            if name not in have:
                return new_value(name, shapes[name])
            t = self._tensor(name)
            if tuple(t.shape) != shapes[name]:
                raise CheckpointError(f"{self.where}: {name} has shape {tuple(t.shape)}, the model {shapes[name]}")
            return t

        return weights, new

    def close(self) -> None:
        if self.reader:
            self.reader.close()
        if self.hf:
            self.hf.close()
