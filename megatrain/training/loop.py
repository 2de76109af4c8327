"""The training loop: micro-batches for this data-parallel rank, steps, evaluation, logs, saves, exits.

Sample ids are global: optimizer step s consumes samples [s*G, (s+1)*G) of the shuffled training
set (G = train.global_batch_size), and micro-batch m of data-parallel rank r takes
s*G + m*(b*dp) + r*b + [0, b) (b = micro batch). Any world size thus sees the same global batch, and
a resumed run continues from `consumed_samples`.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatrain import faults
from megatrain.checkpoint.io import read_latest
from megatrain.config import Config, RunStopped
from megatrain.fileio import write_atomic
from megatrain.moe import AuxLoss
from megatrain.parallel.parallelize import check_tp_drift, replicated_parameters
from megatrain.tasks import Batch, Task
from megatrain.tasks.base import is_pipeline, rank_micro_batch
from megatrain.tasks.seq_warmup import step_length, warmup_length
from megatrain.training.checkpoint_evals import CheckpointEvals, evaluate_sets
from megatrain.training.engine import grad_norm, rank_mean
from megatrain.training.metrics import MetricsLogger
from megatrain.training.moe_metrics import moe_row
from megatrain.training.profiling import profiled_step
from megatrain.training.runtime import Run, TrainState
from megatrain.training.throughput import Throughput


class StopRequest:
    """SIGUSR1/SIGTERM (e.g. Slurm's --signal=USR1@120) or a time limit -> save and exit cleanly.

    Ranks must agree on the step they stop at, which takes a collective, and a collective is a host sync on GPU: so
    they compare notes only at log steps and every ~CHECK_SECONDS of steps between them (agreed at each check, from
    the slowest rank's step time), not every step. One rank needs no collective and looks every step."""

    TIME_LIMIT = "time limit (train.exit_duration_minutes)"
    # What a stop can be, in the order that wins when ranks disagree; ranks all-reduce the index (MAX).
    REASONS = (None, TIME_LIMIT, "SIGUSR1", "SIGTERM")
    CHECK_SECONDS = 20.0  # longest wait between checks: well inside Slurm's usual --signal=USR1@120

    def __init__(self, minutes: float):
        self.deadline = time.time() + minutes * 60 if minutes > 0 else None
        self.signalled = None
        self.next_check, self.checked_step, self.checked_at = 1, 0, time.perf_counter()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def _local(self) -> str | None:
        return self.signalled or (self.TIME_LIMIT if self.deadline and time.time() > self.deadline else None)

    def reason(self, step: int, device, log_step: bool) -> str | None:
        """Why to stop after `step`, the same on every rank (one may get the signal before the others: srun signals
        each task); None when it is not a check step (`log_step`, or the step agreed at the last check)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self._local()
        if not log_step and step < self.next_check:
            return None
        now = time.perf_counter()
        per_step = (now - self.checked_at) / max(1, step - self.checked_step)
        every = max(1, int(self.CHECK_SECONDS / max(per_step, 1e-6)))
        # One all-reduce: the stop (MAX of the index) and the next check (MIN of the ranks' intervals, as -MAX of -).
        code = torch.tensor([self.REASONS.index(self._local()), -every], dtype=torch.int64, device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        why, every = code.tolist()
        self.next_check, self.checked_step, self.checked_at = step - every, step, now
        return self.REASONS[why]


def note_stop(why: str, step: int) -> None:
    """Tell the job script that this run stopped before max_steps (it requeues the job): MEGATRAIN_STOP_FILE."""
    path = os.environ.get("MEGATRAIN_STOP_FILE")
    if path:
        write_atomic(path, f"{why} at step {step}\n")


def micro_batches(run: Run, task: Task, dataset, step: int, device) -> list[Batch]:
    """This rank's micro-batches of global batch `step`."""
    length = step_length(run.cfg, step)  # train.seq_len_warmup_*: shorter sequences early on; None: as made
    return [rank_micro_batch(run, task, dataset, step, m, device, length) for m in range(run.grad_accum)]


def global_targets(run: Run, task: Task, batches: list[Batch]) -> int:
    """Targets in the whole global batch: every micro-batch of every data-parallel rank."""
    local = sum(task.targets(b) for b in batches)
    if task.constant_targets or run.layout.dp == 1:
        return max(1, local * run.layout.dp)
    n = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(n, group=run.grid.get_data_parallel_group())
    return max(1, int(n))


def train_step(run: Run, engine, task: Task, dataset,
               step: int) -> tuple[torch.Tensor | float, tuple[int, int], torch.Tensor | None]:
    """One optimizer step over global batch `step`. Returns this rank's share of the step's loss (summed over the
    data-parallel ranks it is the loss: the mean over every target of the global batch; a tensor on the device, read
    only when a line is logged, so a step waits for no device-to-host copy), the tokens the global batch held
    (padding not counted) and how many of them have a label, and the task's sums over this rank's micro-batches
    (Task.train_loss; on the device too, or None)."""
    batches = micro_batches(run, task, dataset, step, engine.device)
    # MoE's auxiliary losses reach the gradients in the backward, past DeepSpeed's scaling of the loss: scale them
    # as it scales the loss (1 / accumulation steps, times fp16's loss scale)
    AuxLoss.scale = loss_scale(engine) / run.grad_accum
    tokens = run.layout.dp * sum(b.real_tokens() for b in batches)
    if is_pipeline(engine):  # 1F1B; DeepSpeed returns the mean over micro-batches and data-parallel ranks
        share = float(engine.train_batch(iter([b.model_inputs() for b in batches]))) / run.layout.dp
        return share, (tokens, tokens), None
    total = global_targets(run, task, batches)
    scale = run.grad_accum * run.layout.dp / total  # DeepSpeed divides by both; each micro-batch weighs its targets
    share = torch.zeros((), dtype=torch.float64, device=engine.device)
    sums = None
    for m, batch in enumerate(batches):
        n = task.targets(batch)
        loss, more = task.train_loss(engine, batch)
        if more is not None:
            sums = more if sums is None else sums + more
        if faults.fires("nan_loss", step + 1):
            loss = loss * float("nan")
        hook = _inject_inf_grad(engine) if m == len(batches) - 1 and faults.fires("inf_grad", step + 1) else None
        engine.backward(loss * (n * scale))
        if hook is not None:
            hook.remove()
        engine.step()
        share += loss.detach().double() * (n / total)
    return share, (tokens, total), sums


def loss_scale(engine) -> float:
    """fp16's current loss scale (the factor DeepSpeed multiplies the loss by before the backward); 1 otherwise."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", None) or opt.loss_scale)


def _inject_inf_grad(engine):
    """faults: an inf in the first trainable parameter's gradient, as it flows into DeepSpeed's accumulation."""
    p = next(p for p in engine.module.parameters() if p.requires_grad)
    return p.register_hook(lambda g: g.flatten().index_fill(0, torch.tensor([0]), float("inf")).view_as(g))


def note_bad_step(logger, cfg: Config, step: int, bad: "BadSteps") -> None:
    """Log a skipped update; raise RunStopped once train.max_bad_steps came in a row."""
    limit = cfg.train.max_bad_steps
    logger.log(dict(step=step, kind="skipped", reason="non-finite loss or gradient norm", skipped_steps=bad.total),
               f"step {step:>6}: non-finite loss or gradient norm, update skipped ({bad.in_a_row} in a row; "
               f"train.max_bad_steps={limit})")
    if bad.in_a_row >= limit:
        latest = read_latest(cfg.checkpoint.dir)
        where = f"{cfg.checkpoint.dir}/{latest}" if latest else "none yet (nothing saved)"
        raise RunStopped(f"step {step}: {bad.in_a_row} steps in a row had a non-finite loss or gradient norm "
                         f"(train.max_bad_steps={limit}); the weights are those of the last good step; last complete "
                         f"checkpoint: {where}. Lower train.lr or check the data of those steps, then rerun")


class BadSteps:
    """Updates skipped for a non-finite loss or gradient norm (DeepSpeed's optimizers, or SkipNonFinite under
    ZeRO-0, skip them on every rank alike and hold the LR schedule): counted for metrics.jsonl, and
    train.max_bad_steps in a row stop the run."""

    def __init__(self, engine, limit: int):
        self.engine, self.limit = engine, limit
        self.total, self.in_a_row, self.before = 0, 0, engine.skipped_steps

    def after_step(self) -> bool:
        """Whether the step just taken was skipped."""
        skipped = self.engine.skipped_steps > self.before
        self.before = self.engine.skipped_steps
        self.total += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        return skipped


def drift_check(engine, cfg: Config, grid, step: int) -> None:
    import deepspeed

    params = [p for _, p in replicated_parameters(engine.module)]
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.parallel.zero_stage == 3):
        check_tp_drift(engine.module, grid.get_slice_parallel_group(), step)


class Best:
    """finetune.metric_for_best: the best evaluation so far (DIR/best names its checkpoint), and how many evaluations
    have passed without a better one (finetune.patience stops the run). Kept in every checkpoint's megatrain.json, so
    a resumed run goes on counting."""

    def __init__(self, run: Run, task: Task):
        f = run.cfg.finetune
        self.metric = f.metric_for_best or getattr(task, "metric", "val_loss")
        self.lower = self.metric.endswith(("loss", "ppl"))
        self.patience = f.patience
        saved = (run.saved or {}).get("best", {})
        self.value, self.step, self.since = saved.get("value"), saved.get("step"), saved.get("since", 0)

    def update(self, row: dict, step: int) -> bool:
        v = float(row[self.metric])  # a name the task reports (finetune.py checks it before training)
        better = self.value is None or (v < self.value if self.lower else v > self.value)
        if better:
            self.value, self.step, self.since = v, step, 0
        else:
            self.since += 1
        return better

    def exhausted(self) -> bool:
        return bool(self.patience) and self.since >= self.patience

    def state(self) -> dict:
        return {"best": dict(metric=self.metric, value=self.value, step=self.step, since=self.since)}


def _eval_line(step: int, row: dict) -> str:
    shown = [f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k not in ("step",)]
    return f"step {step:>6} | " + " | ".join(shown)


@dataclass
class Window:
    """What passed since the last log line, started afresh as one unit: the steps, the summed loss shares and task
    sums of those not skipped, the tokens the steps held and the seconds spent in them (not evaluating or saving:
    those are not steps)."""

    steps: int = 0
    good: int = 0
    loss: torch.Tensor | float = 0.0
    sums: torch.Tensor | None = None  # Task.train_loss's, this rank's
    tokens: int = 0
    labeled: int = 0  # of the tokens, those with a label
    seconds: float = 0.0

    def add(self, share: torch.Tensor | float, sums: torch.Tensor | None) -> None:
        """A step that was not skipped."""
        self.loss += share
        self.good += 1
        if sums is not None:
            self.sums = sums if self.sums is None else self.sums + sums

    def task_row(self, run: Run, task: Task) -> dict:
        """The task's own figures over the window (every rank calls it: one all-reduce of the sums over the
        data-parallel ranks; TP replicas hold the same sums)."""
        if self.sums is None:
            return {}
        if run.layout.dp > 1:
            dist.all_reduce(self.sums, group=run.grid.get_data_parallel_group())
        return task.train_metrics(self.sums)

    def row(self, run: Run, engine, throughput: Throughput) -> dict:
        """The window's loss (averaged over the ranks), tokens/s, TFLOP/s per rank and MFU (both FLOP conventions)."""
        # the shares of the data-parallel ranks add up to the loss; TP/PP replicas hold equal shares
        loss = rank_mean(float(self.loss) / self.good if self.good else float("nan"), engine.device) * run.layout.dp
        tps = self.tokens / self.seconds
        tflops, whole = (throughput.flops(self.tokens, self.labeled, w) / self.seconds / run.world / 1e12
                         for w in (False, True))
        peak = throughput.peak or float("nan")
        return dict(loss=loss, tokens_per_s=tps, tflops_per_device=tflops, mfu=tflops / peak,
                    mfu_whole_attention=whole / peak, seconds_per_step=self.seconds / self.steps)


def logged(t, step: int) -> bool:
    """Whether step `step` writes a log line: every train.log_interval steps, the last, and step 1 (log_first_step)."""
    return step % t.log_interval == 0 or step == t.max_steps or (step == 1 and t.log_first_step)


def train(run: Run, engine, train_ds, valid_ds, task: Task, state: TrainState, throughput: Throughput,
          eval_sets: dict | None = None) -> TrainState:
    """Train from `state` to train.max_steps: log, evaluate (valid_ds, and train.eval_sets's `eval_sets` by name),
    save, stop on request; returns the state reached."""
    cfg, layout = run.cfg, run.layout
    rank0 = run.rank == 0
    t = cfg.train
    logger = MetricsLogger(cfg, cfg.checkpoint.dir, t.max_steps, state.step, enabled=rank0)
    stop = StopRequest(t.exit_duration_minutes)
    window = Window()
    bad = BadSteps(engine, t.max_bad_steps)
    last_saved = state.step
    best = Best(run, task) if cfg.finetune.task else None
    extra = (lambda: best.state()) if best is not None else (lambda: None)  # noqa: E731
    evals = CheckpointEvals(cfg, logger, enabled=rank0)  # train.eval_tasks on each checkpoint, in the background

    def save(best: bool = False) -> str:
        tag = run.save(engine, state, extra(), best=best)
        evals.landed(tag, state.step)
        return tag
    engine.train()
    run.start_rng()  # NOTE: last before the first step
    try:
        while state.step < t.max_steps:
            t0 = time.perf_counter()
            with profiled_step(state.step + 1, cfg.logging.profile_step, cfg.checkpoint.dir, run.rank, logger):
                share, (tokens, labeled), sums = train_step(run, engine, task, train_ds, state.step)
            if engine.device.type == "cuda" and logged(t, state.step + 1):
                torch.cuda.synchronize()  # the steps queue on the GPU unread until a line is logged: count their time
            window.seconds += time.perf_counter() - t0
            window.tokens += tokens
            window.labeled += labeled
            window.steps += 1
            state.step += 1
            state.consumed_samples += t.global_batch_size
            if bad.after_step():
                note_bad_step(logger, cfg, state.step, bad)
            else:
                window.add(share, sums)
            logger.advance()
            every = cfg.parallel.drift_check_interval
            if layout.tp > 1 and every and (state.step % every == 0 or state.step == 1):
                drift_check(engine, cfg, run.grid, state.step)
            log_step = logged(t, state.step)
            if log_step:
                row = dict(step=state.step, lr=engine.get_lr()[0], grad_norm=grad_norm(engine),
                           consumed_samples=state.consumed_samples, skipped_steps=bad.total,
                           **window.row(run, engine, throughput), **window.task_row(run, task))
                if cfg.model.moe_experts:
                    row.update(moe_row(engine.module, run.grid, window.steps))
                if t.seq_len_warmup_steps:  # the length of the window's last step
                    row["seq_len"] = warmup_length(cfg, state.step - 1)
                logger.log(row, f"step {state.step:>6}/{t.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                                f"grad norm {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tokens/s | "
                                f"{row['tflops_per_device']:.3f} TFLOP/s/device"
                                + (f" | MFU {row['mfu']:.1%}" if throughput.peak else "")
                                + (f" | aux {row['moe_aux']:.3f} | load cv {row['moe_load_cv']:.2f}"
                                   if "moe_aux" in row else "")
                                + (f" | reward acc {row['reward_accuracy']:.2f} | margin {row['reward_margin']:.3f}"
                                   if "reward_accuracy" in row else ""))
                logger.advance(0, f"loss {row['loss']:.3f}")
                window = Window()
            if valid_ds is not None and t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.max_steps):
                row = task.evaluate(run, engine, valid_ds)
                row.update(evaluate_sets(run, engine, task, eval_sets or {}))
                logger.log(dict(step=state.step, kind="eval", **row), _eval_line(state.step, row))
                if best is not None and best.update(row, state.step):
                    save(best=True)
                    last_saved = state.step
                if best is not None and best.exhausted():
                    if last_saved != state.step:
                        save()
                    run.finish_saves(engine)
                    logger.log(dict(step=state.step, kind="stop", reason="early stopping"),
                               f"stopping at step {state.step}: no better {best.metric} in {best.since} evaluations "
                               f"(finetune.patience); the best, {best.value:.4f} at step {best.step}, is in "
                               f"{cfg.checkpoint.dir}/best")
                    evals.finish(wait=True)
                    return state
            run.poll_save(engine)  # a background save written by every rank: committed
            evals.poll()  # (a committed checkpoint's lm-eval may start)
            interval = cfg.checkpoint.interval
            if interval and state.step % interval == 0 and state.step < t.max_steps:
                save()
                last_saved = state.step
            if faults.fires("raise", state.step):
                raise RuntimeError(f"injected fault at step {state.step} (MEGATRAIN_FAULTS)")
            faults.kill_here("kill", state.step)
            why = stop.reason(state.step, engine.device, log_step) or (
                "stop injected (MEGATRAIN_FAULTS)" if faults.fires("stop", state.step) else None)
            if why:
                if last_saved != state.step:
                    save()
                run.finish_saves(engine, "stopping")
                logger.log(dict(step=state.step, kind="stop", reason=why), f"stopping at step {state.step}: {why}; "
                                                                            f"checkpoint saved, rerun to resume")
                if rank0:
                    note_stop(why, state.step)
                evals.finish(wait=False)
                return state
        if last_saved != state.step:
            save()
        run.finish_saves(engine)
        evals.finish(wait=True)
    except RuntimeError as e:  # torch's DistBackendError is one
        if not _lost_peer(e):
            raise
        latest = read_latest(cfg.checkpoint.dir)
        where = f"{cfg.checkpoint.dir}/{latest}" if latest else "the start (nothing saved yet)"
        raise RunStopped(f"rank {run.rank} lost contact with the other ranks at step {state.step} "
                         f"({str(e).strip().splitlines()[0][:160]}): another rank died or hung, so this one stops too "
                         f"(the launcher's log names it); rerun to resume from {where}") from None
    finally:
        evals.close()
        logger.close()
    return state


def _lost_peer(e: BaseException) -> bool:
    """A collective that failed because a peer went away (gloo/NCCL connection errors, parallel.timeout_minutes)."""
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "timed out", "Timed out", "NCCL communicator was aborted", "Connection refused"))

