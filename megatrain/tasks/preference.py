"""Preference tuning: Direct Preference Optimization (finetune.task=dpo) on pairs of responses to one prompt.

    {"prompt": "...", "chosen": "...", "rejected": "..."}                       jsonl, one pair a line
    {"messages": [{"role": "user", ...}, ...], "chosen": ..., "rejected": ...}   the conversation so far; chosen and
                                                                               rejected a text or [{"role": "assistant",
                                                                               "content": ...}]

Each response is rendered after its prompt exactly as sft renders an assistant turn (the tokenizer's chat template,
or megatrain's plain format ending in the end-of-document token), and its log-probability is the sum over the
tokens sft's loss would cover. With the policy's log-probabilities pi and the reference model's ref (beta =
finetune.dpo_beta, eps = finetune.dpo_label_smoothing):

    h = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)                (Rafailov et al. 2023; eps: cDPO)

The reference model is the policy before its first step (finetune.init, LoRA adapters at zero). With
finetune.dpo_reference=precompute its log-probabilities are computed in one pass over every file before training
(one model in memory) and stored in checkpoint.dir/dpo_reference.safetensors, which a resumed run reads; =hold
keeps the reference in memory and scores each micro-batch with it, under no_grad: under LoRA the policy itself with
its adapters off (no second model), else a frozen copy of finetune.init's model (Run.frozen_engine: the same TP cut
and ZeRO-3 partitioning); =none drops the reference (ref = 0: the reference-free variant). A micro-batch holds its pairs' chosen rows, then their
rejected rows; the mean is over pairs. Evaluation reports the loss, the reward accuracy (how often the chosen
response's reward beta * (pi - ref) beats the rejected one's), both mean rewards and their margin, and how often
the policy, and the reference, give the chosen response the higher log-probability (logp_accuracy,
reference_logp_accuracy: the reference's is what the policy started from, where every reward is 0); each training
log line the first four over the pairs its steps trained on (from the training forward, summed on the device).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.data.readers import InputError
from megatrain.data.task_files import read_records
from megatrain.heads import adapters_off
from megatrain.model import IGNORE_INDEX
from megatrain.tasks.base import Batch, Examples, FinetuneTask, pad_rows
from megatrain.tasks.lm import SFT

REFERENCE_FILE = "dpo_reference.safetensors"
ADAPTERS_OFF = "adapters off"  # DPO.held under LoRA: the policy with its adapters off is the reference


def sequence_logps(module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its targets (labels != IGNORE_INDEX), [R] in fp32. Under tensor
    parallelism the logits are split along the vocabulary and the model's own loss_fn (a collective) reads them, one
    row at a time (it returns a mean: times the row's target count)."""
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is None:
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none")
        return -nll.view(labels.shape).sum(1)
    rows = []
    for i in range(labels.shape[0]):
        n = int((labels[i] != IGNORE_INDEX).sum())
        rows.append(-loss_fn(logits[i], labels[i]).float() * n if n else logits.new_zeros((), dtype=torch.float32))
    return torch.stack(rows)


def dpo_loss(pi: torch.Tensor, ref: torch.Tensor, beta: float, smoothing: float) -> tuple[torch.Tensor, ...]:
    """pi, ref [P, 2] (chosen, rejected) log-probabilities -> per-pair loss [P], chosen and rejected rewards [P]."""
    chosen, rejected = beta * (pi[:, 0] - ref[:, 0]), beta * (pi[:, 1] - ref[:, 1])
    h = chosen - rejected
    loss = -(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)
    return loss, chosen, rejected


class DPO(SFT):
    name = "dpo"
    metric = "val_loss"
    metrics = ("val_loss", "val_reward_accuracy", "val_reward_margin", "val_chosen_reward", "val_rejected_reward",
               "val_logp_accuracy")

    # -- data -------------------------------------------------------------------------------------------------------

    def _response(self, rec, key: str) -> list[dict]:
        value = rec.fields.get(key)
        if isinstance(value, str):
            return [{"role": "assistant", "content": value}]
        if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
                and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
            return value
        has = ", ".join(repr(k) for k in list(rec.fields)[:6]) or "none"
        raise InputError(f"{rec.where}: {key!r} must be the response text or [{{\"role\": \"assistant\", \"content\": "
                         f"text}}] (the row has {has}); a finetune.task=dpo row is {{\"prompt\" or \"messages\", "
                         f"\"chosen\", \"rejected\"}}")

    def encode(self, path: str, train: bool, labeled: bool = True) -> Examples:
        items, truncated = [], 0
        for rec in read_records(path, self.cfg.finetune.format):
            prompt = self.prompt_messages(rec)
            pair = {}
            for key in ("chosen", "rejected"):
                ids, target = self.tokens(prompt + self._response(rec, key))
                if len(ids) > self.max_len + 1:
                    ids, target, truncated = ids[: self.max_len + 1], target[: self.max_len + 1], truncated + 1
                pair[key] = (ids[:-1], [t if k else IGNORE_INDEX for t, k in zip(ids[1:], target[1:])])
            if all(any(y != IGNORE_INDEX for y in pair[k][1]) for k in pair):
                items.append(dict(chosen=pair["chosen"], rejected=pair["rejected"], ref=None))
        if not items:
            raise InputError(f"{path}: no pair has a response token left in both responses (empty, or cut by "
                             f"max_seq_len)")
        return Examples(items, self.cfg.train.seed, shuffle=train, truncated=truncated)

    def collate(self, items: list, device) -> Batch:
        rows = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        tokens, segments = pad_rows([x for x, _ in rows], self.pad)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        for b, (_, y) in enumerate(rows):
            labels[b, : len(y)] = torch.tensor(y)
        ref = torch.tensor([it["ref"] or (0.0, 0.0) for it in items], dtype=torch.float32)
        return Batch(tokens.to(device), labels.to(device), segments.to(device), extra={"ref": ref.to(device)})

    # -- loss -------------------------------------------------------------------------------------------------------

    def drop_items(self, batch: Batch, keep: int) -> None:
        P = batch.tokens.shape[0] // 2  # (a pair's rows: its chosen row in the first half, its rejected in the second)
        batch.labels[keep:P] = IGNORE_INDEX
        batch.labels[P + keep:] = IGNORE_INDEX

    def targets(self, batch: Batch) -> int:
        """The pairs of the micro-batch (a padding repeat in evaluation has its labels ignored: not a pair)."""
        P = batch.tokens.shape[0] // 2
        return int((batch.labels[:P] != IGNORE_INDEX).any(1).sum())

    def logps(self, engine, batch: Batch) -> torch.Tensor:
        """The policy's log-probabilities of the micro-batch's responses, [P, 2] (chosen, rejected)."""
        logits = engine(*batch.model_inputs(labels=False))
        lp = sequence_logps(engine.module, logits, batch.labels)
        return torch.stack(lp.chunk(2), dim=1)

    # finetune.dpo_reference=hold: what scores the reference during the run (finetune.run sets it): a frozen engine of
    # finetune.init's model, or ADAPTERS_OFF (the policy's own engine with its LoRA adapters off). None: the
    # log-probabilities precomputed into each pair (batch.extra["ref"]), as `megatrain evaluate` reads them too
    held = None

    def reference_logps(self, engine, batch: Batch) -> torch.Tensor:
        """The reference's log-probabilities of the micro-batch's responses, [P, 2]."""
        if self.held is None:
            return batch.extra["ref"]
        if self.held is not ADAPTERS_OFF:
            with torch.no_grad():
                return self.logps(self.held, batch)
        was_training = engine.module.training
        engine.eval()  # (as the precomputed pass: no dropout)
        try:
            with torch.no_grad(), adapters_off(engine.module):
                return self.logps(engine, batch)
        finally:
            if was_training:
                engine.train()

    def pair_losses(self, engine, batch: Batch) -> tuple[torch.Tensor, ...]:
        f = self.cfg.finetune
        ref = self.reference_logps(engine, batch)
        pi = self.logps(engine, batch)
        loss, chosen, rejected = dpo_loss(pi, ref, f.dpo_beta, f.dpo_label_smoothing)
        real = (batch.labels[: pi.shape[0]] != IGNORE_INDEX).any(1)
        return loss, chosen, rejected, real, pi, ref

    def loss(self, engine, batch: Batch) -> torch.Tensor:
        return self.train_loss(engine, batch)[0]

    def train_loss(self, engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss over the micro-batch's pairs, and [pairs, pairs ranked right, chosen rewards, rejected
        rewards] summed over them (fp64, on the device: the training log's reward figures, read once a log line)."""
        loss, chosen, rejected, real, _, _ = self.pair_losses(engine, batch)
        real = real.to(chosen.dtype)
        sums = torch.stack([real.sum(), ((chosen > rejected) * real).sum(), (chosen * real).sum(),
                            (rejected * real).sum()])
        return (loss * real).sum() / real.sum().clamp(min=1), sums.detach().double()

    def train_metrics(self, sums: torch.Tensor) -> dict:
        """The same figures as an evaluation's (`score`), over the pairs of a log line's steps."""
        pairs, right, chosen, rejected = sums.tolist()
        n = max(pairs, 1.0)
        return dict(reward_accuracy=right / n, reward_margin=(chosen - rejected) / n, chosen_reward=chosen / n,
                    rejected_reward=rejected / n)

    # -- evaluation -------------------------------------------------------------------------------------------------

    evaluate = FinetuneTask.evaluate  # (not sft's: a perplexity of the DPO loss means nothing)

    def forward_eval(self, engine, batch: Batch):
        loss, chosen, rejected, real, pi, ref = self.pair_losses(engine, batch)
        return (loss * real).sum() / real.sum().clamp(min=1), (chosen, rejected, pi, ref)

    def outputs(self, raw, batch: Batch, items: list) -> list:
        chosen, rejected, pi, ref = raw
        return [dict(chosen=float(c), rejected=float(r), logps=(float(a), float(b)), ref=(float(x), float(y)))
                for c, r, (a, b), (x, y) in zip(chosen, rejected, pi.tolist(), ref.tolist())]

    def score(self, examples: Examples, results: list) -> dict:
        if not results:
            return {}
        n = len(results)
        chosen = sum(r["chosen"] for r in results) / n
        rejected = sum(r["rejected"] for r in results) / n
        out = dict(reward_accuracy=sum(r["chosen"] > r["rejected"] for r in results) / n,
                   reward_margin=chosen - rejected, chosen_reward=chosen, rejected_reward=rejected,
                   logp_accuracy=sum(r["logps"][0] > r["logps"][1] for r in results) / n)
        if self.cfg.finetune.dpo_reference != "none":  # (reference-free: none to compare)
            out["reference_logp_accuracy"] = sum(r["ref"][0] > r["ref"][1] for r in results) / n
        return out

    # -- the reference --------------------------------------------------------------------------------------------

    def set_reference(self, run, engine, examples: Examples) -> torch.Tensor:
        """`engine`'s log-probabilities of every pair of `examples` as their reference, [N, 2]. Collective."""
        results = self.run_items(run, engine, examples)[1]
        values = torch.tensor([r["logps"] for r in results], dtype=torch.float32).reshape(-1, 2)
        for item, ref in zip(examples.items, values.tolist()):
            item["ref"] = tuple(ref)
        return values

    def prepare_reference(self, run, engine, sets: dict[str, Examples | None], resuming: bool) -> str | None:
        """The reference log-probabilities of every example of `sets` (by name: train, valid, test) into the items,
        from checkpoint.dir's file or (before the first step) computed with `engine`'s weights and saved there.
        Collective. Returns a line for the log."""
        if self.cfg.finetune.dpo_reference == "none":
            return "dpo: reference-free (finetune.dpo_reference=none)"
        if self.cfg.finetune.dpo_reference == "hold":
            what = ("the policy with its LoRA adapters off" if self.held is ADAPTERS_OFF else
                    "a frozen copy of finetune.init's model")
            return f"dpo: reference held in memory ({what}), scoring each micro-batch"
        from safetensors.torch import load_file, save_file

        from megatrain.fileio import atomic_path

        sets = {k: v for k, v in sets.items() if v is not None}
        path = os.path.join(self.cfg.checkpoint.dir, REFERENCE_FILE)
        stamp = json.dumps({k: len(v.items) for k, v in sets.items()}, sort_keys=True)
        if os.path.isfile(path):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                saved_stamp = (f.metadata() or {}).get("examples")
            if saved_stamp == stamp:
                values = load_file(path)
                for name, examples in sets.items():
                    for item, ref in zip(examples.items, values[name].tolist()):
                        item["ref"] = tuple(ref)
                return f"dpo: reference log-probabilities read from {path}"
            if resuming:
                raise InputError(f"{path} holds the reference log-probabilities of other files ({saved_stamp} "
                                 f"examples, these have {stamp}); resume with the files the run started with, or "
                                 f"start afresh in a new checkpoint.dir")
        elif resuming:
            raise InputError(f"{path}: missing; this run's reference log-probabilities (of finetune.init's weights) "
                             f"are gone; start afresh in a new checkpoint.dir")
        values = {name: self.set_reference(run, engine, examples) for name, examples in sets.items()}
        if run.rank == 0:
            os.makedirs(self.cfg.checkpoint.dir, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(values, tmp, metadata={"examples": stamp})
        if dist.is_initialized():
            dist.barrier()
        return f"dpo: reference log-probabilities of {sum(len(v.items) for v in sets.values())} pairs computed " \
               f"with finetune.init's weights into {path}"
