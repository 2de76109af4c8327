"""The task interface, and what every fine-tuning task shares.

A task says how sample ids become a micro-batch, the loss on it and how many targets that loss averages, the FLOPs
per token, and what an evaluation reports. The training loop knows only this interface; it normalises each step's
loss by the targets of the whole global batch (every micro-batch of every data-parallel rank), so 1 rank and N
ranks, and any accumulation, give the same loss and the same update.

Fine-tuning tasks add: reading and encoding their files (`encode`), padding a list of encoded examples into a
micro-batch (`collate`), and `evaluate`: a pass over a whole file, spread over the data-parallel ranks, that
reports the loss and the task's metrics (the same numbers on every rank, so every rank agrees on the best step).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megatrain.config import Config, ModelConfig
from megatrain.flops import train_flops_per_token
from megatrain.model import IGNORE_INDEX


@dataclass
class Batch:
    """One micro-batch on its device: what the model reads and what the loss compares against."""

    tokens: torch.Tensor  # [B, T] input ids
    labels: torch.Tensor  # the task's targets; IGNORE_INDEX where a position has none
    segments: torch.Tensor | None = None  # [B, T] example of each token (packing, padding); None: one per row
    extra: dict = field(default_factory=dict)  # what else a task's loss or decoding needs
    # (rank, n): tokens and labels hold slice `rank` of n of each row (context parallelism); segments stay whole
    shard: tuple[int, int] = (0, 1)

    def context_slice(self, rank: int, n: int) -> "Batch":
        """This context-parallel rank's slice of every row: tokens and labels [B, T/n]; the segments stay whole
        (attention runs over the whole sequence, and positions are global)."""
        T = self.tokens.shape[1] // n
        cut = slice(rank * T, (rank + 1) * T)
        return dataclasses.replace(self, tokens=self.tokens[:, cut], labels=self.labels[:, cut], shard=(rank, n))

    def shortened(self, length: int, keep_tokens: bool) -> "Batch":
        """Every row at sequence length `length` (a sequence-length warmup step): reshaped to [B*T/length, length]
        rows, sample b's chunk k being row b*T/length + k (keep_tokens: every token stays), or each row cut to its
        first `length` tokens. Labels are already shifted (labels[t] is the token after tokens[t]), so tokens, labels
        and segments are cut alike; document segments are per row, so a chunk that starts mid-document starts a row
        of its own. For a whole pretraining micro-batch (no slice taken, nothing in `extra`)."""
        B, T = self.tokens.shape

        def cut(x):
            if x is None:
                return None
            if keep_tokens:
                if T % length:
                    raise ValueError(f"sequence-length warmup: {length} does not divide the sample length {T}")
                return x.reshape(B * T // length, length)
            return x[:, :length].contiguous()

        return dataclasses.replace(self, tokens=cut(self.tokens), labels=cut(self.labels), segments=cut(self.segments))

    def real_tokens(self) -> int:
        """Tokens of this batch that are not padding."""
        if self.segments is None:
            return self.tokens.numel()
        rank, n = self.shard
        T = self.segments.shape[1] // n
        return int((self.segments[:, rank * T:(rank + 1) * T] > 0).sum())

    def model_inputs(self, labels: bool = True) -> tuple:
        """The positional arguments of the engine's forward (tokens, labels, cache, pos, segments)."""
        y = self.labels if labels else None
        return (self.tokens, y) if self.segments is None else (self.tokens, y, None, 0, self.segments)


def micro_batch_ids(step: int, micro: int, cfg: Config, dp: int, dp_rank: int) -> np.ndarray:
    """Sample ids are global: step s consumes samples [s*G, (s+1)*G) (G = train.global_batch_size), and micro-batch m
    of data-parallel rank r takes s*G + m*(b*dp) + r*b + [0, b) (b = micro batch): every world size sees the same
    global batch, and a resumed run continues from its consumed samples."""
    b, G = cfg.train.micro_batch_size, cfg.train.global_batch_size
    start = step * G + micro * b * dp + dp_rank * b
    return np.arange(start, start + b)


def rank_micro_batch(run, task: "Task", dataset, step: int, micro: int, device, length: int | None = None) -> Batch:
    """Micro-batch `micro` of global batch `step` as this rank holds it: its data-parallel replica's samples, at
    sequence length `length` when given (a sequence-length warmup step, tasks.seq_warmup), and under context
    parallelism its slice of each row."""
    layout = run.layout
    ids = micro_batch_ids(step, micro, run.cfg, layout.replicas, layout.replica(run.dp_rank))
    batch = task.make(dataset, ids, device)
    if length is not None and length < batch.tokens.shape[1]:
        batch = batch.shortened(length, run.cfg.train.seq_len_warmup_keep_tokens)
    return batch if layout.cp == 1 else batch.context_slice(layout.cp_rank(run.dp_rank), layout.cp)


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


class Task:
    """The interface; see lm.CausalLM for the simplest one."""

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

    def train_loss(self, engine, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A training micro-batch's mean loss, and what else the task logs about it from the same forward: sums on
        the device that the loop adds up unread over the micro-batches and ranks of the logged steps and hands to
        `train_metrics` once per log line (None: nothing)."""
        return self.loss(engine, batch), None

    def train_metrics(self, sums: torch.Tensor) -> dict:
        """The metrics.jsonl keys of `train_loss`'s sums, added up over a log line's steps, micro-batches and ranks."""
        return {}

    counts_lm_head = True  # flops_per_token includes the LM head

    def flops_per_token(self, m: ModelConfig, seq_len: int, whole_attention: bool = False) -> float:
        return train_flops_per_token(m, seq_len, whole_attention)

    @torch.no_grad()
    def evaluate(self, run, engine, valid, prefix: str = "val") -> dict:
        """The mean loss over every target of the first train.eval_iters global batches of the validation set (the
        same samples, in the same micro-batches, whatever the layout), and its perplexity."""
        cfg = run.cfg
        engine.eval()
        n_iters = min(cfg.train.eval_iters, len(valid) // cfg.train.global_batch_size)
        batches = [[rank_micro_batch(run, self, valid, it, m, engine.device) for m in range(run.grad_accum)]
                   for it in range(n_iters)]
        if is_pipeline(engine):  # already the mean over micro-batches and data-parallel ranks
            losses = [float(engine.eval_batch(iter([b.model_inputs() for b in step]))) for step in batches]
            value = float(np.mean(losses)) if losses else float("nan")
        else:
            sums = torch.zeros(2, dtype=torch.float64)  # loss x targets, targets (TP replicas count alike)
            for batch in (b for step in batches for b in step):
                n = self.targets(batch)
                sums += torch.tensor([float(self.loss(engine, batch)) * n, n], dtype=torch.float64)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(sums)
            value = float(sums[0] / sums[1]) if sums[1] else float("nan")
        engine.train()
        return {f"{prefix}_loss": value, f"{prefix}_ppl": float(math.exp(min(value, 50)))}


class Examples:
    """Encoded examples of one file. Sample id i is always the same example (so a run resumes anywhere): epoch
    i // n is a permutation of the examples drawn from (seed, epoch), or the file order without shuffling."""

    def __init__(self, items: list, seed: int, shuffle: bool = True, truncated: int = 0):
        self.items, self.seed, self.shuffle, self.truncated = items, seed, shuffle, truncated
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        epoch, j = divmod(int(i), len(self.items))
        if not self.shuffle:
            return self.items[j]
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return self.items[int(self._perm[j])]


def pad_rows(rows: list[list[int]], pad: int, value_rows: list[list[int]] | None = None) -> tuple[torch.Tensor, ...]:
    """Right-pad token rows to the longest: (tokens [B, T], segments [B, T] with 1 on real tokens and 0 on padding)."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad, dtype=torch.long)
    segments = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        segments[b, : len(r)] = 1
    return tokens, segments


class FinetuneTask(Task):
    """A fine-tuning task: its files, its micro-batches, its evaluation."""

    metric = "val_loss"  # the default metric_for_best
    metrics = ("val_loss",)  # what an evaluation reports that metric_for_best may name

    def __init__(self, cfg: Config, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.labels = list(cfg.finetune.labels)  # classify/tokens: the label names in id order (prepare finds them)
        self.max_len = cfg.finetune.max_seq_len or cfg.model.max_seq_len
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eod_id

    # -- data -------------------------------------------------------------------------------------------------------

    def prepare(self, train_file: str) -> None:
        """Learn what the training file defines (the label set, into self.labels unless finetune.labels names
        it); called before the model exists. The run records it in its Resolved."""

    def encode(self, path: str, train: bool, labeled: bool = True) -> Examples:
        """A file's examples, encoded; labeled=False reads a file to predict (its labels may be missing)."""
        raise NotImplementedError

    def present(self, examples: Examples, results: list) -> list[dict]:
        """Predictions a person reads, one dict per input record (megatrain predict)."""
        raise NotImplementedError

    def collate(self, items: list, device) -> Batch:
        raise NotImplementedError

    def make(self, dataset: Examples, ids: np.ndarray, device) -> Batch:
        return self.collate([dataset[int(i)] for i in ids], device)

    def rows_per_epoch(self, train: Examples) -> int:
        return len(train)

    @property
    def counts_lm_head(self) -> bool:
        return self.name in ("sft", "dpo")

    def flops_per_token(self, m: ModelConfig, seq_len: int, whole_attention: bool = False) -> float:
        """A task head replaces the LM head (whose FLOPs are most of a small model's): count the blocks only."""
        blocks = m if self.counts_lm_head else dataclasses.replace(m, vocab_size=0)
        return train_flops_per_token(blocks, seq_len, whole_attention)

    # -- evaluation -------------------------------------------------------------------------------------------------

    def drop_items(self, batch: Batch, keep: int) -> None:
        """Ignore the labels of every item of the micro-batch from `keep` on (evaluation's padding repeats)."""
        batch.labels[keep:] = IGNORE_INDEX

    def outputs(self, logits_or_loss, batch: Batch, items: list) -> list:
        """Per-item results of one evaluated micro-batch (predictions the metrics need)."""
        return [None] * len(items)

    def forward_eval(self, engine, batch: Batch) -> tuple[torch.Tensor, object]:
        """(mean loss of the micro-batch, what `outputs` decodes)."""
        loss = self.loss(engine, batch)
        return loss, loss

    def score(self, examples: Examples, results: list) -> dict:
        """Metrics from every item's result (in file order)."""
        return {}

    def evaluate(self, run, engine, examples: Examples, prefix: str = "val") -> dict:
        """Loss and metrics over a whole file."""
        sums, results = self.run_items(run, engine, examples)
        loss = float(sums[0] / sums[1]) if sums[1] else float("nan")
        return {f"{prefix}_loss": loss, **{f"{prefix}_{k}": v for k, v in self.score(examples, results).items()}}

    @torch.no_grad()
    def run_items(self, run, engine, examples: Examples) -> tuple[torch.Tensor, list]:
        """Every item of a file through the model in evaluation mode: (loss x targets and targets summed over every
        rank, each item's `outputs` in file order). Each data-parallel rank takes every dp-th item; all ranks run
        the same number of micro-batches (ZeRO-3 gathers weights collectively), the last ones padded with repeats
        whose labels are ignored and whose results are dropped."""
        dp, r, micro = run.layout.dp, run.dp_rank, run.cfg.train.micro_batch_size
        n = len(examples.items)
        mine = list(range(r, n, dp))
        real = len(mine)
        mine += [mine[-1] if mine else 0] * (math.ceil(n / dp) - real)
        engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        results = []
        for start in range(0, len(mine), micro):
            idx = mine[start: start + micro]
            items = [examples.items[i] for i in idx]
            batch = self.collate(items, engine.device)
            n_real = max(0, min(len(idx), real - start))
            self.drop_items(batch, n_real)  # the padding repeats count in no loss
            t = self.targets(batch)
            loss, raw = self.forward_eval(engine, batch)
            results += list(zip(idx[:n_real], self.outputs(raw, batch, items)[:n_real]))
            if t:
                sums += torch.tensor([float(loss) * t, t], dtype=torch.float64)
        engine.train()
        if dist.is_initialized() and dp > 1:
            dist.all_reduce(sums, group=run.grid.get_data_parallel_group())
        return sums, in_file_order(run, results)


def in_file_order(run, results: list[tuple[int, object]]) -> list:
    """Every data-parallel rank's (item index, result) pairs, on every rank: the results in index order."""
    dp = run.layout.dp
    if dist.is_initialized() and dp > 1:
        gathered = [None] * dp
        dist.all_gather_object(gathered, results, group=run.grid.get_data_parallel_group())
        results = [x for part in gathered for x in part]
    return [o for _, o in sorted(results, key=lambda x: x[0])]
