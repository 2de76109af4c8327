"""Evaluation beside the validation loss: more validation sets (train.eval_sets), and lm-eval tasks on each saved
checkpoint (train.eval_tasks) in a background process while training goes on.

    evals = CheckpointEvals(cfg, logger, enabled=rank0)
    evals.landed(tag, step)     # after each save: queued, started when the one before it is done
    evals.poll()                # at log steps: a finished evaluation's scores logged at its checkpoint's step
    evals.finish(wait=True)     # the end of training: waits for the rest (a stop does not: it says what is left)

The background process is `megatrain lm-eval --checkpoint DIR --tag TAG ...` on rank 0's node (the model on its
CPU, so it takes nothing from the training's accelerators); its output and log go to DIR/lm_eval/TAG.{json,log}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from megatrain.checkpoint.manifest import MANIFEST_FILE
from megatrain.config import Config
from megatrain.training.dist_env import log0

# the launcher's variables: the evaluation is a plain single process, not a rank of the job
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                  "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


def evaluate_sets(run, engine, task, sets: dict) -> dict:
    """train.eval_sets: each set's loss and perplexity as val_loss/NAME and val_ppl/NAME."""
    row = {}
    for name, dataset in sets.items():
        r = task.evaluate(run, engine, dataset)
        row[f"val_loss/{name}"], row[f"val_ppl/{name}"] = r["val_loss"], r["val_ppl"]
    return row


def scores(results: dict) -> dict:
    """lm-eval's results ({task: {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}}) as lm_eval/TASK/METRIC."""
    return {f"lm_eval/{task}/{key.split(',')[0]}": float(v) for task, metrics in results.items()
            for key, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and "stderr" not in key}


class CheckpointEvals:
    def __init__(self, cfg: Config, logger, enabled: bool):
        t = cfg.train
        self.cfg, self.logger = cfg, logger
        self.on = enabled and bool(t.eval_tasks.strip())
        self.queue: list[tuple[str, int]] = []
        self.running: tuple[subprocess.Popen, str, int, float] | None = None  # (process, tag, step, started)
        self.dir = os.path.join(cfg.checkpoint.dir, "lm_eval")

    def landed(self, tag: str, step: int) -> None:
        if self.on:
            self.queue.append((tag, step))
            self.poll()

    def poll(self) -> None:
        if not self.on:
            return
        if self.running is not None and self.running[0].poll() is not None:
            self._collect()
        while self.running is None and self.queue:
            tag, step = self.queue[0]
            folder = os.path.join(self.cfg.checkpoint.dir, tag)
            if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, MANIFEST_FILE)):
                return  # still being written (checkpoint.async_save): its turn comes once it is complete
            self.queue.pop(0)
            self._start(tag, step)

    def finish(self, wait: bool) -> None:
        """The end of training (wait: every queued checkpoint evaluated and logged), or a stop (the running one
        stopped; what is left is said, with the command that evaluates it by hand)."""
        if not self.on:
            return
        if wait:  # (every save is complete by now: the loop waits for a background one first)
            while self.running is not None or self.queue:
                if self.running is not None:
                    log0(f"waiting for lm-eval of {self.running[1]} (train.eval_tasks)")
                    self.running[0].wait()
                self.poll()
                if self.running is None and self.queue:  # the head never completed (a failed save): not scored
                    log0(f"lm-eval of {self.queue.pop(0)[0]} skipped: the checkpoint is incomplete")
            return
        left = ([self.running[1]] if self.running else []) + [tag for tag, _ in self.queue]
        self.close()
        if left:
            log0(f"lm-eval not run on {', '.join(left)} (the run stopped); evaluate by hand: {self._command('TAG')}")

    def close(self) -> None:
        if self.running is not None:
            self.running[0].kill()
            self.running[0].wait()
            self.running = None
        self.queue = []

    def _command(self, tag: str) -> list[str] | str:
        t = self.cfg.train
        cmd = ["megatrain", "lm-eval", "--checkpoint", self.cfg.checkpoint.dir, "--tag", tag, "--tasks",
               t.eval_tasks.strip()]
        if t.eval_tasks_include:
            cmd += ["--include-path", t.eval_tasks_include]
        if t.eval_tasks_limit:
            cmd += ["--limit", f"{t.eval_tasks_limit:g}"]
        return cmd if tag != "TAG" else " ".join(cmd)

    def _start(self, tag: str, step: int) -> None:
        if not os.path.isdir(os.path.join(self.cfg.checkpoint.dir, tag)):
            log0(f"lm-eval of {tag} skipped: the checkpoint was removed (checkpoint.keep_last) before its turn")
            return
        os.makedirs(self.dir, exist_ok=True)
        out = os.path.join(self.dir, f"{tag}.json")
        if os.path.exists(out):  # a resumed run evaluating the same checkpoint again
            os.remove(out)
        cmd = [sys.executable, "-m", "megatrain.cli", *self._command(tag)[1:], "--output", out]
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        with open(os.path.join(self.dir, f"{tag}.log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        self.running = (proc, tag, step, time.perf_counter())

    def _collect(self) -> None:
        proc, tag, step, started = self.running
        self.running = None
        out = os.path.join(self.dir, f"{tag}.json")
        if proc.returncode != 0 or not os.path.isfile(out):
            log0(f"lm-eval of {tag} failed (exit {proc.returncode}); its log: {os.path.join(self.dir, tag + '.log')}")
            return
        with open(out) as f:
            row = scores(json.load(f))
        shown = " | ".join(f"{k} {v:.4f}" for k, v in row.items())
        self.logger.log(dict(step=step, kind="eval", **row),
                        f"step {step:>6} | {shown} ({tag}, {time.perf_counter() - started:.0f} s in the background)")
