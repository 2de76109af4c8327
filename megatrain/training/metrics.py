"""What a researcher watches, written by rank 0 every log_interval steps: console lines (or a progress bar),
metrics.jsonl, TensorBoard and wandb (these two imported only when the config turns them on)."""
from __future__ import annotations

import json
import math
import os
import secrets
import sys

from tqdm import tqdm

from megatrain.config import Config
from megatrain.fileio import write_atomic


def _drop_partial_line(path: str) -> None:
    """A run killed while writing a row leaves half a line; cut it, so the resumed run's rows start on their own."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # back from the end, a block at a time, to the last complete line
            start = max(0, pos - 65536)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


def _wandb_id(run_dir: str) -> str:
    """One W&B run for one checkpoint.dir, across resumes and requeues: its id is kept in run_dir/wandb_id."""
    path = os.path.join(run_dir, "wandb_id")
    if os.path.isfile(path):
        return open(path).read().strip()
    run_id = secrets.token_hex(6)  # W&B ids are lowercase letters and digits
    write_atomic(path, run_id)
    return run_id


class MetricsLogger:
    """Rank 0 only: a console line, metrics.jsonl, TensorBoard and wandb, every log_interval steps."""

    def __init__(self, cfg: Config, run_dir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.jsonl = self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        _drop_partial_line(path)
        self.jsonl = open(path, "a")
        if start_step > 0:  # where a resumed run picks up (megatrain plot marks it)
            self.jsonl.write(json.dumps({"step": start_step, "kind": "resume"}) + "\n")
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.logging.wandb_project, mode=cfg.logging.wandb_mode,
                                    dir=run_dir, config=cfg.to_dict(), id=_wandb_id(run_dir), resume="allow")
            self.wandb.define_metric("eval/lm_eval/*", step_metric="eval/checkpoint_step")
        show = cfg.logging.progress_bar
        if show == "on" or (show == "auto" and sys.stderr.isatty()):
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def log(self, row: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        step = row["step"]
        prefix = "eval/" if row.get("kind") == "eval" else "train/"
        scalars = {prefix + k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"
                   and not (isinstance(v, float) and math.isnan(v))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            if any(k.startswith("eval/lm_eval/") for k in scalars):
                # background scores of an earlier checkpoint: W&B drops a step below its last one, so these go
                # against their own axis (defined in __init__)
                self.wandb.log({**scalars, "eval/checkpoint_step": step}, commit=False)
            else:
                self.wandb.log(scalars, step=step)
        if console:
            if self.bar is not None:
                self.bar.write(console)
            else:
                print(console, flush=True)

    def advance(self, steps: int = 1, postfix: str = "") -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
