"""Checkpoints in DeepSpeed's native layout, directly in checkpoint.dir:

    DIR/latest                     the newest *complete* tag (written last, atomically, by rank 0)
    DIR/step00000100/              DeepSpeed's files (mp_rank_*_model_states.pt, zero shards, ...)
    DIR/step00000100/megatrain.json  the config as asked, what the run derived (resolved), step, samples consumed
    DIR/step00000100/rng_rank{r}.pt  each rank's RNG states
    DIR/zero_to_fp32.py            DeepSpeed's consolidation script

so DeepSpeed's own `zero_to_fp32` and `get_fp32_state_dict_from_zero_checkpoint(DIR)` work on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import json
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatrain import faults
from megatrain.checkpoint import async_save, manifest
from megatrain.config import LM_TASKS, Config, ConfigError, RunStopped
from megatrain.resolved import Resolved, saved_config
from megatrain.fileio import read_json, write_atomic
from megatrain.parallel.rng import set_tp_stream_state, tp_stream_state

STATE_FILE = "megatrain.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    """The step a tag names: step00000100 -> 100 (also a resharded step00000100-tp2-pp1-dp1-zero2)."""
    return int(tag[4:12])


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
    tp = tp_stream_state()
    if tp:  # the per-TP-rank dropout stream (parallel/rng.py)
        state["tp_stream"] = tp
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    py = tuple(int(x) for x in state["python"].tolist())
    random.setstate((3, py, None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "tp_stream" in state:
        set_tp_stream_state(state["tp_stream"])


def save(engine, cfg: Config, resolved: Resolved, step: int, consumed_samples: int, layout: dict,
         extra: dict | None = None, tag: str | None = None, best: bool = False, background: bool = False) -> str:
    """Save on every rank; `latest` moves to this tag only once every rank's files are on disk. megatrain.json holds
    `cfg` as the user asked it (`config`), what the run derived (`resolved`: the model's shape and the rest; readers
    take the model from there), the step, and `extra` (the fine-tuning loop keeps its best metric there). `best`:
    point DIR/best at it too (after `latest`).

    A write that fails on any rank (a full disk, a quota, an I/O error) does not stop that rank inside DeepSpeed's
    collectives: its remaining files are skipped (see harden), every rank learns of it afterwards, the partial step
    folder is removed, `latest` keeps naming the previous complete checkpoint, and RunStopped says what happened.

    `background` (checkpoint.async_save): the files are copied to host memory and written by a thread while training
    goes on; the commit comes later (async_save.poll / wait, which the training loop calls). The save in flight, if
    any, is waited for and committed first."""
    ckpt_dir = cfg.checkpoint.dir
    tag = tag or tag_for(step)
    state = dict(step=step, consumed_samples=consumed_samples, config=cfg.to_dict(), resolved=resolved.to_dict(),
                 layout=layout, **(extra or {}))
    ce = engine.checkpoint_engine
    background = background and hasattr(ce, "megatrain_queue")  # (another checkpoint engine: saved as before)
    if background:
        async_save.wait(engine, f"saving {tag}")
        ce.megatrain_queue = []
    if dist.get_rank() == 0 and read_pointer(ckpt_dir, "latest") != tag:  # (DeepSpeed's barriers follow)
        for name in (STATE_FILE, manifest.MANIFEST_FILE):  # a folder an interrupted save left: not complete while
            with contextlib.suppress(OSError):  # its files are rewritten
                os.remove(os.path.join(ckpt_dir, tag, name))
    if faults.fires("enospc", step):
        ce.megatrain_inject = True
    with _experts_as_parameters(engine):
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"megatrain": state}, save_latest=False)
    faults.kill_here("kill_mid_save", step)
    rank = dist.get_rank()
    error = getattr(ce, "megatrain_error", None)
    rng = rng_state()  # (fresh tensors)
    files = [(os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"),
              async_save.torch_writer(rng) if background else lambda p: torch.save(rng, p))]
    frozen = _frozen_experts(engine)
    if frozen and frozen[1] == 0:
        experts = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in frozen[3]}
        files.append((os.path.join(ckpt_dir, tag, frozen_experts_file(frozen[0], frozen[2])),
                      lambda p: save_file(experts, p)))
    if background:
        queued, ce.megatrain_queue = ce.megatrain_queue, None
        async_save.start(ce, async_save.Pending(ckpt_dir, tag, step, state, cfg.checkpoint.keep_last, best,
                                                queued + files, error=error, inject=bool(ce.megatrain_inject),
                                                guard=_write, commit=commit))
        ce.megatrain_error = ce.megatrain_inject = None
        return tag
    for path, write in files:
        if error is None:
            error = _write(write, path)
    ce.megatrain_error = ce.megatrain_inject = None
    commit(ckpt_dir, tag, state, error, cfg.checkpoint.keep_last, best)
    return tag


def commit(ckpt_dir: str, tag: str, state: dict, error: str | None, keep_last: int, best: bool = False,
           hashes: dict | None = None) -> None:
    """Once each rank has written its files (`error`: this rank's failure, or None): megatrain.json (rank 0), the
    manifest (collective: the ranks share the hashing; `hashes`: entries this rank's writer already made), then
    `latest`, `best` if asked, and pruning. A failure anywhere: io.failed on every rank. Collective."""
    rank = dist.get_rank()
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if rank == 0 and not any(errors):
        errors[0] = _write(lambda p: write_atomic(p, json.dumps(state, indent=1)), os.path.join(ckpt_dir, tag, STATE_FILE))
    box = [next((e for e in errors if e), None)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:  # every file is written: the manifest (collective: the ranks share the hashing), then latest
        box[0] = manifest.write_manifest(os.path.join(ckpt_dir, tag), known=hashes)
        if rank == 0 and box[0] is None:
            box[0] = _write(lambda p: write_atomic(p, tag), os.path.join(ckpt_dir, "latest"))
            if box[0] is None and best:
                box[0] = _write(lambda p: mark_best(ckpt_dir, tag), os.path.join(ckpt_dir, "best"))
            if box[0] is None:
                _prune(ckpt_dir, keep_last, keep=tag)
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        failed(ckpt_dir, tag, box[0], quiet=rank != 0)


@contextlib.contextmanager
def _experts_as_parameters(engine):
    """Save and load a MoE model's experts as every other parameter. Under expert parallelism DeepSpeed's engine knows
    the model has MoE layers (parallel/expert.py), and would then write its own per-expert files, which expect its
    own expert modules; megatrain's experts live in each rank's ZeRO optimizer partition (fp32 weights and moments,
    every rank writes its own file) and load back from there."""
    moe = getattr(engine, "has_moe_layers", False)
    engine.has_moe_layers = False
    try:
        yield
    finally:
        engine.has_moe_layers = moe


def frozen_experts_file(ep_rank: int, mp_rank: int) -> str:
    return f"frozen_experts_ep{ep_rank}_mp_rank_{mp_rank:02d}.safetensors"


def _frozen_experts(engine) -> tuple[int, int, int, list] | None:
    """Under expert parallelism, the expert parameters no optimizer holds (LoRA's base experts, finetune.freeze) as
    (EP rank, expert-data-parallel rank, mp rank, [(module name, tensor)]); None when there are none.

    NOTE: DeepSpeed writes the module from data-parallel rank 0 only, which holds EP rank 0's experts; the trained
    ones are in every rank's ZeRO partition, but frozen ones are nowhere else. So save() writes each EP rank's frozen
    experts to frozen_experts_file(e, mp) (from its first replica), resume() loads them back and the reader reads
    them from there."""
    from deepspeed.utils import groups

    from megatrain.parallel.expert import GROUP_NAME

    named = [(n, p) for n, p in engine.module.named_parameters()
             if getattr(p, "group_name", None) == GROUP_NAME and not p.requires_grad]
    if not named:
        return None
    mp = engine.mpu.get_model_parallel_rank() if engine.mpu is not None else 0  # as DeepSpeed names its files
    return (dist.get_rank(groups._EXPERT_PARALLEL_GROUP[GROUP_NAME]),
            dist.get_rank(groups._EXPERT_DATA_PARALLEL_GROUP[GROUP_NAME]), mp, named)


def _write(write, path: str) -> str | None:
    """Run write(path); on failure remove what it left and return the reason."""
    try:
        write(path)
        return None
    except Exception as e:  # torch.save reports a full disk as a RuntimeError ("file write failed"), not OSError
        try:
            os.remove(path)
        except OSError:
            pass
        return f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"


def failed(ckpt_dir: str, tag: str, error: str, quiet: bool) -> None:
    """After a failed save (every rank has returned from DeepSpeed's): remove the step folder, then RunStopped."""
    dist.barrier()
    folder = os.path.join(ckpt_dir, tag)
    previous = read_pointer(ckpt_dir, "latest")
    need = _bytes(os.path.join(ckpt_dir, previous)) if previous and previous != tag else _bytes(folder)
    if not quiet:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    free = shutil.disk_usage(ckpt_dir).free
    e = RunStopped(f"saving checkpoint {tag} in {ckpt_dir} failed ({error}); {free:,} bytes are free there and a "
                   f"checkpoint of this run takes about {need:,}. The partial {tag} was removed and latest still names "
                   f"{previous or 'no checkpoint'}: free space (or set checkpoint.keep_last, or move checkpoint.dir), "
                   f"then rerun to resume")
    e.quiet = quiet  # every rank raises it; rank 0 says it
    raise e


def _bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _prune(ckpt_dir: str, keep_last: int, keep: str) -> None:
    """Remove all but the newest keep_last step folders; never the one just saved or the one `best` names."""
    if keep_last <= 0:
        return
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, t)))
    best = read_pointer(ckpt_dir, "best")
    for t in tags[:-keep_last]:
        if t not in (keep, best):
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def complete_tags(ckpt_dir: str) -> list[str]:
    """The step folders of `ckpt_dir` that hold megatrain.json (a save that finished), oldest first."""
    return sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step") and os.path.isfile(
        os.path.join(ckpt_dir, t, STATE_FILE)))


def earlier_complete(ckpt_dir: str, tag: str) -> str | None:
    """The newest complete step folder of `ckpt_dir` before `tag` (what to fall back on when `tag` is damaged)."""
    earlier = [t for t in complete_tags(ckpt_dir) if t < tag]
    return earlier[-1] if earlier else None


def fall_back(ckpt_dir: str, tag: str, verb: str) -> str:
    """What to do when step folder `tag` failed its manifest check: `verb` ("read", "start from") the complete
    checkpoint before it, named by its path, or that there is none."""
    earlier = earlier_complete(ckpt_dir, tag)
    return f"{verb} the complete checkpoint before it, {os.path.join(ckpt_dir, earlier)}" if earlier else \
        "no earlier complete checkpoint is beside it"


def read_pointer(ckpt_dir: str, name: str) -> str | None:
    """The tag a pointer file (latest, best) names, or None."""
    path = os.path.join(ckpt_dir, name)
    return open(path).read().strip() if os.path.isfile(path) else None


def checkpoint_inputs(path: str, tag: str | None = None) -> list[tuple[str, str]]:
    """What reading checkpoint `path` reads, as fileio.check_output_path's inputs: the folder of its weights (the
    `tag`, or those `latest` and `best` name; `path` itself when it holds them: a step folder or a consolidated
    checkpoint) and the pointer files."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return [("the checkpoint", path)]
    tags = [tag] if tag else [t for t in (read_pointer(path, "latest"), read_pointer(path, "best")) if t]
    return [("the checkpoint", os.path.join(path, t)) for t in tags] + \
        [("the checkpoint's pointer", os.path.join(path, name)) for name in ("latest", "best")]


def mark_best(ckpt_dir: str, tag: str) -> None:
    """DIR/best names the checkpoint with the best evaluation metric (written like latest: atomically, by rank 0)."""
    write_atomic(os.path.join(ckpt_dir, "best"), tag)


def check_kind(cfg: Config, saved: dict, where: str) -> None:
    """Resuming needs a checkpoint of the same kind of run: a pretraining run, or a fine-tune of the same
    finetune.task (another's model has another head, so its weights would not load)."""
    theirs, mine = saved_config(saved).finetune.task, cfg.finetune.task
    if theirs == mine:
        return
    kind = lambda task: f"a finetune.task={task} run" if task else "a pretraining run"  # noqa: E731
    ckpt_dir = os.path.dirname(where)
    hint = ""
    if theirs in LM_TASKS:  # a language model's weights: a start for any run
        hint = f", or start from its weights with {'finetune.init' if mine else 'checkpoint.init'}={ckpt_dir}"
    raise ConfigError(f"checkpoint.dir {ckpt_dir} holds {kind(theirs)} ({os.path.basename(where)}), not {kind(mine)} "
                      f"to resume; choose another checkpoint.dir{hint}")


def check_resumable(cfg: Config) -> None:
    """Before anything starts: checkpoint.dir holds no other kind of run (the rest of check_compatible needs what
    the run derives once it has started)."""
    tag = read_latest(cfg.checkpoint.dir) if cfg.checkpoint.resume else None
    if tag is not None:
        where = os.path.join(cfg.checkpoint.dir, tag)
        check_kind(cfg, read_json(os.path.join(where, STATE_FILE), f"point {cfg.checkpoint.dir}/latest at an earlier "
                                  f"complete step"), where)


LAYOUT_KEYS = ("tp", "pp", "dp", "ep", "zero_stage")  # what DeepSpeed's rank files depend on (cp is within dp)


def layout_change(saved: dict, layout: dict) -> str | None:
    """The first LAYOUT_KEYS key whose value differs between a checkpoint's megatrain.json and `layout`, or None."""
    for k in LAYOUT_KEYS:
        then = saved.get("layout", {}).get(k, 1 if k == "ep" else None)  # (no "ep": saved without expert parallelism)
        if then is not None and k in layout and then != layout[k]:
            return k
    return None


def check_compatible(cfg: Config, saved: dict, where: str, layout: dict | None = None) -> None:
    """Resuming needs the same kind of run, model, batch shape and (unless checkpoint.elastic reshards it) parallel
    layout; name the first key that differs."""
    check_kind(cfg, saved, where)
    changed = layout_change(saved, layout) if layout is not None else None
    if changed and not cfg.checkpoint.elastic:
        k = changed
        raise ConfigError(f"{where}: saved with {k}={saved['layout'].get(k, 1)} ({_fmt(saved['layout'])}) but this "
                          f"run has {k}={layout[k]} ({_fmt(layout)}); resume with the saved layout, set "
                          f"checkpoint.elastic=true to reshard it here, or convert it: "
                          f"{reshard_command(os.path.dirname(where), layout, saved['layout'])}")
    saved_cfg = saved_config(saved)  # the effective config it trained with, as `cfg` is this run's
    pairs = [("model", cfg.model, saved_cfg.model), ("data", cfg.data, saved_cfg.data)]
    for section, now, then in pairs:
        for f in dataclasses.fields(now):
            k, v = f.name, getattr(now, f.name)
            if k in ("path", "cache_dir"):
                continue
            if getattr(then, k) != v:
                raise ConfigError(f"{where}: checkpoint has {section}.{k}={getattr(then, k)!r} but this run has {v!r}; "
                                  f"use the same value, or a new checkpoint.dir")
    if saved_cfg.train.seed != cfg.train.seed:
        raise ConfigError(f"{where}: checkpoint has train.seed={saved_cfg.train.seed} but this run has "
                          f"{cfg.train.seed}; the seed orders the data, so a new one would serve samples again and skip "
                          f"others: keep it, or start a new checkpoint.dir")
    if saved_cfg.train.global_batch_size != cfg.train.global_batch_size:
        raise ConfigError(f"{where}: checkpoint has train.global_batch_size={saved_cfg.train.global_batch_size} but "
                          f"this run has {cfg.train.global_batch_size}; use the same value to continue the same run")


def reshard_command(ckpt_dir: str, layout: dict, saved: dict | None = None) -> str:
    """The `megatrain convert reshard` line that makes `ckpt_dir` (saved under `saved`) resumable under `layout`."""
    ep = layout.get("ep", 1)
    ep_set = ep > 1 or (saved or {}).get("ep", 1) > 1  # (the expert split is named when either side has one)
    tag = f"tp{layout['tp']}-pp{layout['pp']}{f'-ep{ep}' if ep > 1 else ''}-zero{layout['zero_stage']}"
    out = f"{ckpt_dir.rstrip('/')}-{tag}"
    return (f"megatrain convert reshard {ckpt_dir} --output {out} --set parallel.tp={layout['tp']} "
            f"--set parallel.pp={layout['pp']} {f'--set parallel.ep={ep} ' if ep_set else ''}"
            f"--set parallel.zero_stage={layout['zero_stage']} --world-size {layout['world_size']}, then run with "
            f"--set checkpoint.dir={out}")


def _fmt(layout: dict) -> str:
    ep = f", ep {layout['ep']}" if layout.get("ep", 1) > 1 else ""
    return f"tp {layout.get('tp')}, pp {layout.get('pp')}, dp {layout.get('dp')}{ep}, ZeRO-{layout.get('zero_stage')}"


# The only classes a DeepSpeed rank file may name besides tensors and containers: a loss scaler, the ZeRO stage, a
# fragment address. safe_globals() allows these classes; checkpoint/reader.py reads each into a plain stand-in.
DEEPSPEED_RECORDS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def safe_globals() -> list:
    """What a DeepSpeed rank file may hold beyond tensors and containers: DEEPSPEED_RECORDS and numpy scalars.
    Nothing else is unpickled: no code runs."""
    classes = [getattr(importlib.import_module(module), name) for module, name in (r.rsplit(".", 1) for r in DEEPSPEED_RECORDS)]
    return [*classes, *numpy_scalars()]


def numpy_scalars() -> list:
    """numpy scalars (a metric in a client state, as older checkpoints have): data, safe to allow."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType") if hasattr(np, "dtypes")]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def load_rank_file(path: str, map_location=None):
    """torch.load with weights_only on and only safe_globals() allowed; any other pickled global is refused. A file
    that is missing, damaged or refused is a ConfigError (one line); any other error is raised as it is."""
    allowed = safe_globals()  # outside the try: a DeepSpeed without these classes is not a damaged file
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        why = why_unreadable(path, e)
        if why is None:
            raise
        raise ConfigError(f"{path}: not loaded: {why}") from None


def why_unreadable(path: str, error: Exception) -> str | None:
    """One line on why torch.load(path, weights_only=True) raised `error` when the file is the cause: it cannot be
    opened, it is damaged, or it names a global outside the allow-list. None when the file is intact and the error
    is something else (a torch or DeepSpeed incompatibility, a bug): the caller raises it as it is.

    torch reads the pickle inside its zip archive without checking it, so a garbled byte there can surface as almost
    any exception (UnicodeDecodeError, KeyError, TypeError, ...). Whether the file is damaged is therefore decided
    by checking the archive (its directory, and every record against its CRC-32), not by the exception's type; this
    reads the whole file, on this failure path only."""
    try:
        damage = _archive_damage(path)
    except OSError as e:  # missing, a directory, no permission: the same error as torch's
        return f"cannot be read ({e.strerror or e})"
    if damage:
        return f"the file is damaged: {damage}"
    if isinstance(error, pickle.UnpicklingError):  # an intact file: weights_only refused what it names
        return (f"{_refused(error)}; megatrain loads only tensors and DeepSpeed's records from a checkpoint, never "
                f"pickled code (a file not written by megatrain, or by another DeepSpeed?)")
    if isinstance(error, OSError):
        return f"cannot be read ({error})"
    return None


def _archive_damage(path: str) -> str | None:
    """What is wrong with a torch.save zip archive, or None when it is whole and every record matches its CRC."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError) as e:
        return f"not a whole zip archive ({e}): cut short, overwritten, or not written by torch.save"
    return f"its record {bad} fails its CRC check (overwritten bytes)" if bad else None


def _refused(error: Exception) -> str:
    """What weights_only refused, from torch's message (the rest of it is advice on loading the file anyway)."""
    text = str(error)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"it names {named.group(1)}, which weights_only refused"
    marker = "WeightsUnpickler error:"
    detail = [line.split(marker)[1] for line in text.splitlines() if marker in line]
    detail = (detail or text.strip().splitlines() or [type(error).__name__])[0].strip()[:200]
    return f"weights_only refused it ({detail})"


def harden(engine) -> None:
    """Two changes to how the engine reads and writes checkpoint files (every module, optimizer, ZeRO and pipeline
    file goes through its checkpoint_engine):
    - loads: DeepSpeed unpickles rank files with weights_only off, which runs whatever code a pickle names, so a
      checkpoint handed over by someone else could; here it goes through load_rank_file instead;
    - saves: a write that fails is recorded (megatrain_error) and the rank's remaining files are skipped, so the rank
      still reaches DeepSpeed's barriers with the others; save() then stops every rank together. While a background
      save collects its files (megatrain_queue is a list) each is copied to host memory and queued instead."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ce = engine.checkpoint_engine
    if type(ce) is not TorchCheckpointEngine:  # another engine (Nebula, decoupled) is the user's choice: left alone
        return
    ce.megatrain_error = ce.megatrain_inject = ce.megatrain_queue = None
    ce.load = lambda path, map_location=None: load_rank_file(path, map_location)
    plain_save = ce.save

    def save(state_dict, path: str):
        if ce.megatrain_queue is not None:  # checkpoint.async_save: a host copy now, written in the background
            if ce.megatrain_error is None:
                try:
                    ce.megatrain_queue.append((path, async_save.torch_writer(async_save.host_copy(state_dict))))
                except Exception as e:  # (out of host memory): the save fails on every rank, as a failed write
                    ce.megatrain_error = f"{path}: copying it to host memory failed ({type(e).__name__}: {e})"
        elif ce.megatrain_error is None:
            ce.megatrain_error = _write(lambda p: _save_or_inject(plain_save, state_dict, p), path)

    def _save_or_inject(write, state_dict, path):
        write(state_dict, path)
        if ce.megatrain_inject:  # faults: the disk fills after this file (the first of the checkpoint) is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ce.save = save
    copy_script = engine._copy_recovery_script  # rank 0 copies zero_to_fp32.py beside the step folders

    def copy_recovery_script(save_path):
        if ce.megatrain_error is None:
            ce.megatrain_error = _write(lambda p: copy_script(save_path), os.path.join(save_path, "zero_to_fp32.py"))

    engine._copy_recovery_script = copy_recovery_script


def _latest_from_rank0(ckpt_dir: str) -> str | None:
    """`latest` as rank 0 reads it, on every rank (ranks on a network filesystem can see different versions of a
    file just replaced); its error, if any, raised on every rank (said once, by rank 0)."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("tag", read_latest(ckpt_dir))]
        except ConfigError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        e = ConfigError(value)
        e.quiet = dist.get_rank() != 0
        raise e
    return value


def latest_state(cfg: Config) -> tuple[str, dict] | None:
    """checkpoint.dir/latest's tag and megatrain.json, as rank 0 reads the pointer (None: nothing to resume, or
    checkpoint.resume is off). Collective."""
    if not cfg.checkpoint.resume:
        return None
    tag = _latest_from_rank0(cfg.checkpoint.dir)
    if tag is None:
        return None
    return tag, read_json(os.path.join(cfg.checkpoint.dir, tag, STATE_FILE),
                          f"point {cfg.checkpoint.dir}/latest at an earlier complete step")


def verify_or_refuse(ckpt_dir: str, tag: str, mode: str) -> None:
    """Check step folder `tag` against its manifest (checkpoint.verify's `mode`; collective: the ranks share the
    files); a difference is refused in one line that names the file and the complete checkpoint before it."""
    problem = manifest.verify(os.path.join(ckpt_dir, tag), mode)
    if problem:
        earlier = earlier_complete(ckpt_dir, tag)
        fix = (f"point {ckpt_dir}/latest at {earlier} (the complete checkpoint before it) to resume from there"
               if earlier else "no earlier complete checkpoint is there: start afresh in a new checkpoint.dir")
        raise ConfigError(f"{problem}; {tag} cannot be resumed: {fix}")


def resume(engine, cfg: Config, layout: dict | None = None) -> dict | None:
    """Load checkpoint.dir/latest if there is one; returns megatrain's saved state (step, samples) and, under "rng",
    this rank's saved RNG states (the caller restores them last, right before the first step: anything drawn from
    the generators in between would shift every dropout mask after a resume)."""
    ckpt_dir = cfg.checkpoint.dir
    latest = latest_state(cfg)
    if latest is None:
        return None
    tag, saved = latest
    check_compatible(cfg, saved, os.path.join(ckpt_dir, tag), layout)
    verify_or_refuse(ckpt_dir, tag, cfg.checkpoint.verify)
    with _experts_as_parameters(engine):
        path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is not None and getattr(engine, "has_moe_layers", False):
        # NOTE: DeepSpeed loads the module's weights from data-parallel rank 0's file, which holds only its own
        # experts; each rank's are in its ZeRO partition (just restored): copy them into the module
        engine.optimizer.update_lp_params()
        frozen = _frozen_experts(engine)
        if frozen:  # and the frozen ones from their own file (see _frozen_experts)
            experts_path = os.path.join(ckpt_dir, tag, frozen_experts_file(frozen[0], frozen[2]))
            if not os.path.isfile(experts_path):
                raise ConfigError(f"{experts_path}: missing; this checkpoint's frozen expert weights cannot be "
                                  f"restored; resume from a checkpoint that has it")
            saved_experts = load_file(experts_path)
            with torch.no_grad():
                for name, p in frozen[3]:
                    p.copy_(saved_experts[name])
    if path is None:
        raise ConfigError(f"{ckpt_dir}/{tag}: DeepSpeed could not load it (different world size or ZeRO stage?)")
    rng = os.path.join(ckpt_dir, tag, f"rng_rank{dist.get_rank()}.pt")
    saved["rng"] = load_rank_file(rng) if os.path.isfile(rng) else None
    return saved
