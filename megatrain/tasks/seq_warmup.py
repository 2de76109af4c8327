"""Sequence-length warmup (train.seq_len_warmup_*): the first steps of a pretraining run train on shorter sequences.

The length of optimizer step s (counting from 0, as the sample ids do) is a pure function of s and the config, so a
resumed run trains each step at the length the uninterrupted one did. It grows linearly from
train.seq_len_warmup_start at step 0 to data.seq_len at step train.seq_len_warmup_steps, rounded down to a valid
length (config.seq_len_warmup_lengths): a multiple of 8 and, when the tokens are kept, a divisor of data.seq_len.

The batch keeps its samples (train.global_batch_size per step, the same sample ids), so the sample accounting and
consumed_samples are those of a run without warmup; Batch.shortened then either keeps every token (each [b, T]
micro-batch reshaped to [b*T/L, L] rows) or truncates each sample to its first L tokens. tasks.base.rank_micro_batch
shortens a sample before a context-parallel rank takes its slice of it.
"""
from __future__ import annotations

from megatrain.config import Config, seq_len_warmup_lengths


def warmup_length(cfg: Config, step: int) -> int:
    """The sequence length optimizer step `step` (0 for the first) trains on: data.seq_len when the warmup is off or
    over; before, the largest valid length at most the linear ramp's start + (seq_len - start) * step / steps (never
    below start, which config.validate checks is itself valid)."""
    t, seq_len = cfg.train, cfg.data.seq_len
    steps = t.seq_len_warmup_steps
    if steps <= 0 or step >= steps:
        return seq_len
    ramp = t.seq_len_warmup_start + (seq_len - t.seq_len_warmup_start) * step // steps  # integer: no float drift
    return max(n for n in seq_len_warmup_lengths(seq_len, t.seq_len_warmup_keep_tokens) if n <= ramp)


def step_length(cfg: Config, step: int) -> int | None:
    """The length to cut step `step`'s micro-batches to; None when the warmup is off or over (a batch stays as it is
    made: a fine-tuning batch is as long as its examples)."""
    return warmup_length(cfg, step) if step < cfg.train.seq_len_warmup_steps else None
