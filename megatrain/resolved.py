"""What a run derives from its config (Resolved), and how a checkpoint's config and derivations are read back.

The user's Config is read-only once validated; the values a run works out for itself (the model's shape from an
init, the padded vocabulary, the built-in corpus, labels found in a file, steps from epochs) live here, are saved
beside the config in every checkpoint, and are laid over it to give the run's effective config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatrain.config import Config, ModelConfig, config_from_dict


@dataclass(frozen=True)
class Resolved:
    """What a run derives from its config and its inputs: the values the run uses where the config leaves them to it.
    Saved with every checkpoint (megatrain.json's `resolved`) beside the config as the user asked it (`config`);
    `apply` lays them over that config to give the run's effective one."""

    model: ModelConfig  # the model's shape: the config's, or checkpoint.init's/finetune.init's; vocab_size padded
    tokenizer: str  # data.tokenizer, or the init's tokenizer, or the built-in corpus's
    data_path: str | list | None  # data.path, or the built-in corpus's files
    seq_len: int  # data.seq_len, or cut to the init's max_seq_len
    labels: list  # finetune.labels, or the training file's labels, sorted
    max_steps: int  # train.max_steps, or computed from finetune.epochs
    warmup_steps: int  # train.warmup_steps, or capped at a tenth of an epochs-long run
    zero_stage: int | None = None  # parallel.zero_stage, or 0 where ZeRO has nothing to partition (Run.start sets it
    # for the run's layout: engine.effective_zero_stage); None: the config's

    def __post_init__(self):
        model = dataclasses.replace(self.model)  # its own copy, read-only like the rest (`but` makes changed ones)
        model.__dict__["_frozen"] = True
        object.__setattr__(self, "model", model)

    @classmethod
    def of(cls, cfg: Config) -> "Resolved":
        """Nothing derived yet: the config's own values."""
        return cls(dataclasses.replace(cfg.model), cfg.data.tokenizer, cfg.data.path, cfg.data.seq_len,
                   list(cfg.finetune.labels), cfg.train.max_steps, cfg.train.warmup_steps)

    def but(self, **changes) -> "Resolved":
        return dataclasses.replace(self, **changes)

    def apply(self, cfg: Config) -> Config:
        """The effective config: `cfg` with these values in place of its own (a new Config; cfg stays as it is)."""
        zero = {} if self.zero_stage is None else {"parallel.zero_stage": self.zero_stage}
        return cfg.replaced({"model": self.model, "data.tokenizer": self.tokenizer, "data.path": self.data_path,
                             "data.seq_len": self.seq_len, "finetune.labels": list(self.labels),
                             "train.max_steps": self.max_steps, "train.warmup_steps": self.warmup_steps, **zero})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, tree: dict) -> "Resolved":
        return cls(config_from_dict({"model": tree["model"]}).model, **{k: v for k, v in tree.items() if k != "model"})


def saved_resolved(state: dict) -> Resolved:
    """A checkpoint's Resolved (megatrain.json's `resolved`); for a checkpoint saved without one, its config's
    values (such a checkpoint wrote what the run derived into its config)."""
    if "resolved" in state:
        return Resolved.from_dict(state["resolved"])
    return Resolved.of(config_from_dict(state["config"]))


def saved_config(state: dict) -> Config:
    """The effective config a checkpoint's run trained with: its config with its Resolved laid over it."""
    return saved_resolved(state).apply(config_from_dict(state["config"]))
