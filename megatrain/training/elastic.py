"""Elastic resume: checkpoint.dir/latest was saved under another layout (tp, pp, ZeRO stage, expert split, world
size; train.micro_batch_size follows), and checkpoint.elastic is on. The run resharding it is this run itself:

    reshard = find(run)                      # collective: latest's state, checked and verified; None: same layout
    weights, _ = reshard.source.weights(model)   # the full weights, each rank keeping its slices (as for an init)
    engine = run.engine(model, weights)
    saved = load(run, engine, reshard)       # AdamW's moments, step count and LR schedule; saved as a new step folder

The optimizer state goes in through the same code as `megatrain convert reshard` (checkpoint/optimizer_state.py),
so the result is what that command would write; it is saved at once under `stepNNNNNNNN-<layout>` beside the
original (which stays as it was), and `latest` names it. The global batch and the sample order do not depend on the
layout (tasks/base.micro_batch_ids), so the run continues with the samples the original would have served next.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from megatrain.checkpoint import io as checkpoint
from megatrain.checkpoint.optimizer_state import layout_words, set_optimizer_state
from megatrain.checkpoint.source import WeightSource
from megatrain.training.dist_env import log0

STATE_KEYS = ("step", "consumed_samples", "config", "resolved", "layout")  # the rest of megatrain.json: the loop's


@dataclass
class Reshard:
    tag: str  # latest's step folder
    saved: dict  # its megatrain.json
    source: WeightSource  # its weights and optimizer state, read as full tensors


def layout_tag(layout: dict) -> str:
    """A layout in a folder name: tp2-pp1-dp4-zero2 (-ep2 when experts are split)."""
    ep = f"-ep{layout['ep']}" if layout.get("ep", 1) > 1 else ""
    return f"tp{layout['tp']}-pp{layout['pp']}-dp{layout['dp']}{ep}-zero{layout['zero_stage']}"


def find(run) -> Reshard | None:
    """latest, when it was saved under another layout than `run`'s and checkpoint.elastic is on (checked like any
    resume, then verified against its manifest). Collective."""
    cfg = run.cfg
    latest = checkpoint.latest_state(cfg)
    if latest is None:
        return None
    tag, saved = latest
    checkpoint.check_compatible(cfg, saved, os.path.join(cfg.checkpoint.dir, tag), run.record)
    if checkpoint.layout_change(saved, run.record) is None:
        return None  # the same layout: DeepSpeed loads it as it is (io.resume)
    checkpoint.verify_or_refuse(cfg.checkpoint.dir, tag, cfg.checkpoint.verify)
    return Reshard(tag, saved, WeightSource(cfg.checkpoint.dir, run.layout.tp, tag=tag, verify="none"))


def load(run, engine, reshard: Reshard) -> dict:
    """The source's optimizer state into `engine` (its weights are in already), then saved as this layout's step
    folder; returns the saved state as io.resume does (no RNG states: another layout draws its own)."""
    t0 = time.perf_counter()
    reader, saved = reshard.source.reader, reshard.saved
    if reader.has_optimizer_state():
        set_optimizer_state(engine, run, reader)
    else:
        log0(f"note: {reader.where} has no optimizer state; AdamW starts afresh")
    step, consumed = saved["step"], saved["consumed_samples"]
    engine.global_steps, engine.global_samples = step, consumed
    extra = {k: v for k, v in saved.items() if k not in STATE_KEYS}
    tag = f"{checkpoint.tag_for(checkpoint.step_of(reshard.tag))}-{layout_tag(run.record)}"
    ckpt_dir = run.cfg.checkpoint.dir
    checkpoint.save(engine, run.asked, run.resolved, step, consumed, run.record, extra, tag=tag)
    where = reader.where
    reshard.source.close()
    log0(f"resharded {where} for this run's layout ({layout_words(run.cfg, run.world)}) into {ckpt_dir}/{tag} in "
         f"{time.perf_counter() - t0:.1f} s (checkpoint.elastic; {reshard.tag} stays as it was)")
    return dict(saved, rng=None)
