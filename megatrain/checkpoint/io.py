"""Checkpoints in DeepSpeed's native layout, directly in checkpoint.dir:

    DIR/latest                     the newest *complete* tag (written last, atomically, by rank 0)
    DIR/step00000100/              DeepSpeed's files (mp_rank_*_model_states.pt, zero shards, ...)
    DIR/step00000100/megatrain.json  megatrain's config, step and samples consumed
    DIR/step00000100/rng_rank{r}.pt  each rank's RNG states
    DIR/zero_to_fp32.py            DeepSpeed's consolidation script

so DeepSpeed's own `zero_to_fp32` and `get_fp32_state_dict_from_zero_checkpoint(DIR)` work on it.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megatrain.config import Config, ConfigError, config_from_dict
from megatrain.fileio import write_atomic

STATE_FILE = "megatrain.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def read_latest(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not os.path.isfile(os.path.join(ckpt_dir, tag, STATE_FILE)):
        raise ConfigError(f"{path} names {tag!r}, which is incomplete or missing; point latest at a complete step "
                          f"folder")
    return tag


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": torch.tensor(np_state[2]), "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    py = tuple(int(x) for x in state["python"].tolist())
    random.setstate((3, py, None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, cfg: Config, step: int, consumed_samples: int, layout: dict, extra: dict | None = None) -> str:
    """Save on every rank; `latest` moves to this tag only once every rank's files are on disk. `extra` goes into
    megatrain.json beside the step (the fine-tuning loop keeps its best metric there)."""
    ckpt_dir = cfg.checkpoint.dir
    tag = tag_for(step)
    state = dict(step=step, consumed_samples=consumed_samples, config=cfg.to_dict(), layout=layout, **(extra or {}))
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"megatrain": state}, save_latest=False)
    rank = dist.get_rank()
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        write_atomic(os.path.join(ckpt_dir, tag, STATE_FILE), json.dumps(state, indent=1))
        write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        _prune(ckpt_dir, cfg.checkpoint.keep_last, keep=tag)
    dist.barrier()
    return tag


def _prune(ckpt_dir: str, keep_last: int, keep: str) -> None:
    """Remove all but the newest keep_last step folders; never the one just saved or the one `best` names."""
    if keep_last <= 0:
        return
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, t)))
    best = read_pointer(ckpt_dir, "best")
    for t in tags[:-keep_last]:
        if t not in (keep, best):
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def read_pointer(ckpt_dir: str, name: str) -> str | None:
    """The tag a pointer file (latest, best) names, or None."""
    path = os.path.join(ckpt_dir, name)
    return open(path).read().strip() if os.path.isfile(path) else None


def mark_best(ckpt_dir: str, tag: str) -> None:
    """DIR/best names the checkpoint with the best evaluation metric (written like latest: atomically, by rank 0)."""
    write_atomic(os.path.join(ckpt_dir, "best"), tag)


def check_compatible(cfg: Config, saved: dict, where: str, layout: dict | None = None) -> None:
    """Resuming needs the same model, batch shape and parallel layout; name the first key that differs."""
    if layout is not None and "layout" in saved:
        for k in ("tp", "pp", "dp", "zero_stage"):
            if k in saved["layout"] and saved["layout"][k] != layout[k]:
                raise ConfigError(f"{where}: saved with {k}={saved['layout'][k]} ({_fmt(saved['layout'])}) but this "
                                  f"run has {k}={layout[k]} ({_fmt(layout)}); resume with the saved layout, or convert "
                                  f"it: {reshard_command(os.path.dirname(where), layout)}")
    saved_cfg = config_from_dict(saved["config"])
    pairs = [("model", cfg.model, saved_cfg.model), ("data", cfg.data, saved_cfg.data)]
    for section, now, then in pairs:
        for k, v in vars(now).items():
            if k in ("path", "cache_dir"):
                continue
            if getattr(then, k) != v:
                raise ConfigError(f"{where}: checkpoint has {section}.{k}={getattr(then, k)!r} but this run has {v!r}; "
                                  f"use the same value, or a new checkpoint.dir")
    if saved_cfg.train.global_batch_size != cfg.train.global_batch_size:
        raise ConfigError(f"{where}: checkpoint has train.global_batch_size={saved_cfg.train.global_batch_size} but "
                          f"this run has {cfg.train.global_batch_size}; use the same value to continue the same run")


def reshard_command(ckpt_dir: str, layout: dict) -> str:
    """The `megatrain convert reshard` line that makes `ckpt_dir` resumable under `layout`."""
    out = f"{ckpt_dir.rstrip('/')}-tp{layout['tp']}-pp{layout['pp']}-zero{layout['zero_stage']}"
    return (f"megatrain convert reshard {ckpt_dir} --output {out} --set parallel.tp={layout['tp']} "
            f"--set parallel.pp={layout['pp']} --set parallel.zero_stage={layout['zero_stage']} "
            f"--world-size {layout['world_size']}, then run with --set checkpoint.dir={out}")


def _fmt(layout: dict) -> str:
    return f"tp {layout.get('tp')}, pp {layout.get('pp')}, dp {layout.get('dp')}, ZeRO-{layout.get('zero_stage')}"


def resume(engine, cfg: Config, layout: dict | None = None) -> dict | None:
    """Load checkpoint.dir/latest if there is one; returns megatrain's saved state (step, samples)."""
    ckpt_dir = cfg.checkpoint.dir
    if not cfg.checkpoint.resume:
        return None
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    with open(os.path.join(ckpt_dir, tag, STATE_FILE)) as f:
        saved = json.load(f)
    check_compatible(cfg, saved, os.path.join(ckpt_dir, tag), layout)
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"{ckpt_dir}/{tag}: DeepSpeed could not load it (different world size or ZeRO stage?)")
    rng = os.path.join(ckpt_dir, tag, f"rng_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=True))
    return saved
