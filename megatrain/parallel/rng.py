"""Dropout under tensor parallelism: which random stream each dropout draws from (Megatron's model-parallel RNG).

The TP ranks of one replica hold replicas of the activations between their split layers, so dropout there must draw
alike on every TP rank: it uses the default stream, which Run.start_rng seeds alike across a TP group. Where a TP
rank holds its own part, the masks must differ, or every rank would drop the same pattern on different heads (or
tokens): attention (each rank's heads) and, under sequence parallelism, the residual and embedding dropout (each
rank's tokens) draw from a second stream seeded per TP rank, DeepSpeed's model-parallel RNG tracker. DeepSpeed's
activation checkpointing saves and restores that tracker around a recomputed block, so the recomputed masks are the
forward's; checkpoints save it with the other RNG states (checkpoint/io.py).
"""
from __future__ import annotations

import functools
import sys

import torch.nn as nn

TRACKER_NAME = "model-parallel-rng"  # DeepSpeed's name for it (deepspeed.checkpointing forks it by this name)


def _tracker():
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def tp_stream_seed(seed: int, replica: int, tp_rank: int) -> int:
    """The model-parallel stream's seed: its own per TP rank and per replica (pipeline stage x data-parallel rank)."""
    return seed * 1_000_003 + 7919 * replica + 2718 + 104_729 * (tp_rank + 1)


def seed_tp_stream(seed: int) -> None:
    """Start this rank's model-parallel stream from `seed` (distinct per TP rank)."""
    tracker = _tracker()
    tracker.reset()
    tracker.add(TRACKER_NAME, seed)


def tp_stream_state() -> dict:
    """The stream's state to save with a checkpoint ({} when there is none)."""
    if "deepspeed" not in sys.modules:
        return {}
    return dict(_tracker().get_states())


def set_tp_stream_state(states: dict) -> None:
    if states:
        _tracker().set_states(dict(states))


def _forked(forward, module: nn.Module):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not module.training:
            return forward(*args, **kwargs)
        with _tracker().fork(TRACKER_NAME):
            return forward(*args, **kwargs)

    return run


def apply_tp_dropout_streams(model, sequence_parallel: bool, seed: int) -> None:
    """Route the model's rank-local dropout through the per-TP-rank stream (seeded with `seed` until Run.start_rng
    seeds it for the run or restores it from a checkpoint). Only with dropout > 0: otherwise nothing draws."""
    if model.cfg.dropout == 0:
        return
    seed_tp_stream(seed)
    local = [block.attn for block in model.layers]
    if sequence_parallel:  # the residual branches and the embedding hold this rank's tokens
        local += [block.drop for block in model.layers] + [model.drop]
    for module in local:
        module.forward = _forked(module.forward, module)
