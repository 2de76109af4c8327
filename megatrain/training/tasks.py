"""What an objective is, in one place: how sample ids become a micro-batch, the loss on it and how many targets
that loss averages, the FLOPs per token, and what an evaluation reports.

    causal   next-token prediction on packed pretraining samples (every position is a target)
    mlm      BERT-style masked LM: a seeded 15% of the positions, the mask a function of (seed, sample id)

Fine-tuning tasks (finetune/tasks.py) are more of the same interface. The training loop knows only this interface:
it normalises a step's loss by the number of targets in the whole global batch (all micro-batches of all
data-parallel ranks), so 1 rank and N ranks, and any accumulation, give the same loss and the same update.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megatrain.config import Config, ModelConfig
from megatrain.model import IGNORE_INDEX, mlm_mask


@dataclass
class Batch:
    """One micro-batch on its device: what the model reads and what the loss compares against."""

    tokens: torch.Tensor  # [B, T] input ids
    labels: torch.Tensor  # the task's targets; IGNORE_INDEX where a position has none
    segments: torch.Tensor | None = None  # [B, T] example of each token (packing, padding); None: one per row
    extra: dict = field(default_factory=dict)  # anything else a task's loss needs (e.g. pooling positions)

    def model_inputs(self) -> tuple:
        """The positional arguments of the engine's forward."""
        return (self.tokens, self.labels) if self.segments is None else (self.tokens, self.labels, None, 0, self.segments)


class Task:
    """The interface; see CausalLM for the simplest one."""

    name = "task"
    constant_targets = False  # every micro-batch has the same number of targets (no count to all-reduce)

    def make(self, dataset, ids: np.ndarray, device) -> Batch:
        raise NotImplementedError

    def targets(self, batch: Batch) -> int:
        """How many terms the micro-batch's mean loss averages."""
        return int((batch.labels != IGNORE_INDEX).sum())

    def loss(self, engine, batch: Batch) -> torch.Tensor:
        """The mean loss over the micro-batch's targets (through the engine, so DeepSpeed's hooks run)."""
        return engine(*batch.model_inputs())

    def flops_per_token(self, m: ModelConfig, seq_len: int) -> float:
        from megatrain.training.metrics import train_flops_per_token

        return train_flops_per_token(m, seq_len)


class CausalLM(Task):
    name = "causal"
    constant_targets = True

    def make(self, dataset, ids: np.ndarray, device) -> Batch:
        tokens = torch.from_numpy(np.stack([dataset[int(i)] for i in ids]))
        return Batch(tokens[:, :-1].to(device), tokens[:, 1:].contiguous().to(device))

    def targets(self, batch: Batch) -> int:
        return batch.labels.numel()


@dataclass
class MaskedLM(Task):
    """BERT masking of pretraining samples; the mask of a sample depends only on (seed, sample id), like the sample."""

    seed: int
    mask_id: int
    vocab_size: int
    probability: float = 0.15
    special_ids: tuple = ()
    name = "mlm"

    def make(self, dataset, ids: np.ndarray, device) -> Batch:
        inputs, labels = [], []
        for i in ids:
            row = torch.from_numpy(dataset[int(i)])[:-1]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            x, y = mlm_mask(row, self.mask_id, self.vocab_size, self.probability, g, self.special_ids)
            inputs.append(x)
            labels.append(y)
        return Batch(torch.stack(inputs).to(device), torch.stack(labels).to(device))


def pretraining_task(cfg: Config, tokenizer) -> Task:
    if cfg.model.objective == "causal":
        return CausalLM()
    return MaskedLM(cfg.train.seed, tokenizer.mask_id, tokenizer.vocab_size, cfg.data.mlm_probability,
                    tuple(i for i in (tokenizer.eod_id, tokenizer.pad_id, tokenizer.bos_id) if i is not None))
