"""Tasks: what an objective or a fine-tuning task is, each in one place (see base.py for the interface).

    causal, mlm         pretraining (lm.py)
    sft                 supervised fine-tuning on conversations (lm.py)
    dpo                 preference tuning on pairs of responses (preference.py)
    classify            sequence classification (classify.py)
    tokens              token classification / NER (tagging.py)
    qa                  extractive question answering (qa.py)

seq_warmup.py is the sequence-length warmup's schedule (train.seq_len_warmup_*); Batch.shortened cuts the batches.
"""
from __future__ import annotations

from megatrain.config import Config
from megatrain.tasks.base import Batch, Examples, FinetuneTask, Task
from megatrain.tasks.classify import Classify
from megatrain.tasks.lm import SFT, CausalLM, MaskedLM
from megatrain.tasks.preference import DPO
from megatrain.tasks.qa import QA
from megatrain.tasks.tagging import Tokens


def pretraining_task(cfg: Config, tokenizer) -> Task:
    if cfg.model.objective == "causal":
        return CausalLM(tokenizer.eod_id if cfg.data.document_attention else None)
    return MaskedLM(cfg.train.seed, tokenizer.mask_id, tokenizer.vocab_size, cfg.data.mlm_probability,
                    tuple(i for i in (tokenizer.eod_id, tokenizer.pad_id, tokenizer.bos_id) if i is not None))


def finetune_task(cfg: Config, tokenizer) -> FinetuneTask:
    return {"sft": SFT, "dpo": DPO, "classify": Classify, "tokens": Tokens, "qa": QA}[cfg.finetune.task](cfg, tokenizer)


__all__ = ["Batch", "Examples", "Task", "FinetuneTask", "CausalLM", "MaskedLM", "SFT", "pretraining_task",
           "finetune_task"]
