"""The one writer of native checkpoints for a layout a run did not train under: `reshard` and `from-hf`.

Rather than writing DeepSpeed's files by hand (flat groups, paddings, partitions that differ by version and ZeRO
stage), the target run is stood up for real: N ranks with the target layout build the model through the same path
as training (full weights -> parallelize's TP/PP split, the sharding table -> deepspeed.initialize), the optimizer
state is written into the engine (DeepSpeed's public safe_set_full_* fragment API, TP-sliced by the same table),
and the engine saves itself. So the result is exactly what `megatrain pretrain` under that layout resumes from.

The N ranks are local CPU processes over gloo (spawned here), or the ranks of a launcher that started this
command (`deepspeed --num_gpus N --module megatrain.convert reshard ...`): then the target's own GPUs do it.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatrain.checkpoint import io as checkpoint
from megatrain.checkpoint.hf import load_hf_weights
from megatrain.checkpoint.optimizer_state import layout_words, set_optimizer_state
from megatrain.checkpoint.reader import CheckpointReader
from megatrain.config import (Config, ConfigError, apply_overrides, config_from_dict, parse_set, validate,
                              validate_world)
from megatrain.convert.consolidate import WEIGHT_SUFFIXES, check_output
from megatrain.resolved import Resolved
from megatrain.generate import load_weights
from megatrain.model import Transformer
from megatrain.parallel.topology import check_layout
from megatrain.training.dist_env import end_distributed, free_port
from megatrain.training.engine import effective_zero_stage
from megatrain.training.runtime import Run

# What a reshard may change: the layout, and the micro-batch that has to fit it (the global batch stays).
RESHARDABLE = ("parallel.", "train.micro_batch_size")


@dataclass
class Job:
    """What every rank of the writer needs (plain data: it crosses to spawned processes)."""

    cfg: dict  # the target config (a reshard's: the source's config as its run was given it, with the new layout)
    source: str | None  # a megatrain checkpoint folder (reshard), or None
    tag: str | None
    hf_dir: str | None  # a Hugging Face folder (from-hf), or None
    trust_pickle: bool
    tmp: str  # where the ranks write; renamed to the output when every rank is done (and checked)
    step: int
    consumed_samples: int
    tokenizer_from: str | None = None  # a folder whose tokenizer files go to tmp/tokenizer (from-hf)
    resolved: dict | None = None  # what the source's run derived (Resolved.to_dict()); None: the values of cfg


def target_config(base: Config, sets: list[str], world: int | None) -> tuple[Config, int]:
    """A copy of `base` with the --set layout changes, validated for `world` ranks (default tp x pp)."""
    overrides = dict(parse_set(s) for s in sets)
    bad = [k for k in overrides if not k.startswith(RESHARDABLE)]
    if bad:
        raise ConfigError(f"--set {bad[0]}: only the layout can change here (parallel.*, train.micro_batch_size); "
                          f"the model and the run's other settings come from the checkpoint")
    cfg = apply_overrides(config_from_dict(base.to_dict()), overrides)
    validate(cfg)
    if world is not None and world < 1:  # checked before the default: 0 is a mistake, not "tp x pp"
        raise ConfigError(f"--world-size {world}: must be at least 1 (the target run's ranks; leave it out for "
                          f"tp x pp = {cfg.parallel.tp * cfg.parallel.pp})")
    world = world or cfg.parallel.tp * cfg.parallel.pp
    check_layout(cfg, world)
    validate_world(cfg, world)
    return cfg, world


def reshard_target(reader: CheckpointReader, sets: list[str], world: int | None) -> tuple[Config, int, Config]:
    """The target run's config and world size (its layout checked against the source's model), and the config to
    save as the run was asked: the source's, with the new layout. The ZeRO stage starts from the one the source's
    run was asked for, not the one it ran: a one-rank ZeRO-1 run runs as ZeRO-0, and resharded onto several ranks it
    is ZeRO-1 again (each run works out its own stage: engine.effective_zero_stage)."""
    base = reader.cfg.replaced({"parallel.zero_stage": reader.asked.parallel.zero_stage})
    cfg, world = target_config(base, sets, world)
    asked = reader.asked.replaced({"parallel": cfg.parallel, "train.micro_batch_size": cfg.train.micro_batch_size})
    return cfg, world, asked


def reshard(src: str, out: str, sets: list[str], world: int | None, tag: str | None = None,
            force: bool = False) -> None:
    check_output(out, force, checkpoint.checkpoint_inputs(src, tag))
    with CheckpointReader(src, tag, verify="full") as reader:
        cfg, world, asked = reshard_target(reader, sets, world)
        resolved = reader.resolved.to_dict()  # what the source's run derived (the writer's run redoes the stage)
        if not reader.has_optimizer_state():
            print(f"note: {reader.where} has no optimizer state; the new checkpoint starts AdamW afresh",
                  file=sys.stderr)
        where, step, consumed = reader.where, reader.state.get("step", 0), reader.state.get("consumed_samples", 0)
    t0 = time.perf_counter()
    job = Job(asked.to_dict(), src, tag, None, False, f"{os.path.abspath(out)}.partial", step, consumed,
              resolved=resolved)
    if not write(job, world):
        return
    finish(job.tmp, out, force)
    p = cfg.parallel
    ran = cfg.replaced({"parallel.zero_stage": effective_zero_stage(cfg, world // (p.tp * p.pp), p.pp)})
    print(f"resharded {where} -> {out} ({layout_words(ran, world)}), step {step}, {time.perf_counter() - t0:.1f} s; "
          f"resume it with --set checkpoint.dir={out} --set parallel.tp={p.tp} --set parallel.pp={p.pp} "
          f"--set parallel.zero_stage={p.zero_stage}{f' --set parallel.ep={p.ep}' if p.ep > 1 else ''} on {world} "
          f"ranks")


def write(job: Job, world: int) -> bool:
    """Write `job` with `world` ranks: the ranks of the launcher that started this command, or local processes
    spawned for it. True in the one process that should check and finish the output (rank 0, or the parent)."""
    launched = int(os.environ.get("WORLD_SIZE", "0"))
    if launched > 1 or os.environ.get("RANK") is not None:
        if launched != world:
            raise ConfigError(f"--world-size {world}, but the launcher started {launched} ranks; make them agree")
        write_rank(job)
        # NOTE: here, not only in cli.main: ranks > 0 then leave at once, rather than wait at a barrier through rank
        # 0's parity check and rename (cli.main's own call finds nothing left to end)
        end_distributed()
        return int(os.environ["RANK"]) == 0
    try:
        if world == 1:  # this process is the one rank: no interpreter to start
            saved = dict(os.environ)
            try:
                _spawned_rank(0, 1, free_port(), job)
            finally:
                if dist.is_initialized():  # _spawned_rank ends it, unless it failed
                    dist.destroy_process_group()
                os.environ.clear()
                os.environ.update(saved)
        else:
            mp.start_processes(_spawned_rank, args=(world, free_port(), job), nprocs=world, join=True,
                               start_method="spawn")
    except BaseException:
        shutil.rmtree(job.tmp, ignore_errors=True)
        raise
    return True


def finish(tmp: str, out: str, force: bool) -> None:
    """Move the complete output into place (replacing `out` only with --force)."""
    if os.path.exists(out) and force:
        shutil.rmtree(out)
    os.replace(tmp, out)


def _spawned_rank(rank: int, world: int, port: int, job: Job) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    write_rank(job)
    end_distributed()  # else a rank can die of SIGABRT after writing everything, and the parent drops the output


def write_rank(job: Job) -> None:
    """One rank of the writer: build the target run, load the weights (and optimizer state), save."""
    asked = config_from_dict(job.cfg).replaced({"checkpoint.dir": job.tmp})
    run = Run.start(asked, Resolved.from_dict(job.resolved) if job.resolved else None)
    cfg = run.cfg
    if run.rank == 0:  # the others write nothing before the barrier below
        shutil.rmtree(job.tmp, ignore_errors=True)
        os.makedirs(job.tmp)
        if job.tokenizer_from:
            _copy_tokenizer(job.tokenizer_from, os.path.join(job.tmp, "tokenizer"))
    model = Transformer(cfg.model)
    reader = CheckpointReader(job.source, job.tag, verify="none") if job.source else None  # (verified in reshard)
    if reader:
        load_weights(model, reader)
    else:
        load_hf_weights(model, job.hf_dir, job.trust_pickle)
    engine = run.engine(model, log_ranks=False)
    if reader and reader.has_optimizer_state():
        set_optimizer_state(engine, run, reader)
        _restore_rng(reader, run.rank)
    engine.global_steps, engine.global_samples = job.step, job.consumed_samples
    dist.barrier()
    checkpoint.save(engine, run.asked, run.resolved, job.step, job.consumed_samples, run.record)
    if reader:
        reader.close()


def _copy_tokenizer(src: str, dst: str) -> None:
    os.makedirs(dst)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)) and not name.endswith(WEIGHT_SUFFIXES) and not name.startswith(
                ("config.json", "generation_config.json")):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def _restore_rng(reader: CheckpointReader, rank: int) -> None:
    """The source rank's RNG states (rank 0's where the source had fewer ranks), saved with the new checkpoint."""
    for r in (rank, 0):
        path = os.path.join(reader.folder, f"rng_rank{r}.pt")
        if os.path.isfile(path):
            checkpoint.set_rng_state(torch.load(path, weights_only=True))
            return

