"""Faults injected on purpose, for the reliability tests (tests/test_reliability.py), through one environment
variable so that the real training path runs around them:

    MEGATRAIN_FAULTS="nan_loss@step=3@rank=1,enospc@step=4"

Each entry is a fault point, then conditions (`step=N`: at optimizer step N, counting from 1; `rank=R`: only on
global rank R; `restart=K`: only in the K-th restart of the job, as torchrun (TORCHELASTIC_RESTART_COUNT) or Slurm
(SLURM_RESTART_COUNT) counts them, 0 the first start). A point with no conditions fires every time. The points:
    nan_loss     this rank's loss of that step becomes NaN (as from a corrupt batch)
    inf_grad     one gradient element on this rank becomes inf after the backward (an overflow)
    enospc       the checkpoint save of that step fails with ENOSPC (a full disk), after writing part of its files
                 (under checkpoint.async_save, in the background writer after its first file)
    raise        the code at a fault point raises (a rank failing before a collective)
    kill         the rank kills itself (SIGKILL) after that step, as a lost node would go
    stop         the run stops after that step as on SIGUSR1 (saves, exits 0): a run cut short at a chosen step
    kill_before_index         preprocess (IndexedDatasetWriter) is killed (SIGKILL) between renaming its .bin and .idx
    kill_mid_save             the checkpoint save of that step is killed (SIGKILL) after DeepSpeed wrote its files,
                              before megatrain.json and `latest`: the rerun resumes from the checkpoint before
    kill_before_sample_meta   the sample-index build is killed after saving its arrays, before the .json that marks it
    kill_mid_async_write      a background save (checkpoint.async_save) of that step is killed (SIGKILL) in its writer
                              thread after the first file: `latest` still names the checkpoint before
    slow_async_write          a background save of that step takes 2 s more after its first file (a slow disk)
Unset (the normal case), every check is one dictionary lookup.
"""
from __future__ import annotations

import functools
import os
import signal


@functools.lru_cache(maxsize=1)
def _parse(spec: str) -> dict[str, list[dict[str, int]]]:
    faults: dict[str, list[dict[str, int]]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, *conds = entry.split("@")
        faults.setdefault(point, []).append({k: int(v) for k, v in (c.split("=", 1) for c in conds)})
    return faults


def kill_here(point: str, step: int | None = None) -> None:
    """SIGKILL this process at fault point `point` (of optimizer step `step`) when it is injected (no cleanup runs, as
    with kill -9)."""
    if os.environ.get("MEGATRAIN_FAULTS") and fires(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def fires(point: str, step: int | None = None) -> bool:
    """Whether fault `point` is injected here (this rank, this step)."""
    spec = os.environ.get("MEGATRAIN_FAULTS")
    if not spec:
        return False
    import torch.distributed as dist  # only with faults injected: preprocess imports this module, and never torch

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or 0)
    return any(c.get("step", step) == step and c.get("rank", rank) == rank and c.get("restart", restart) == restart
               for c in _parse(spec).get(point, []))
