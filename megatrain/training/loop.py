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

import numpy as np
import torch
import torch.distributed as dist

from megatrain.config import Config
from megatrain.fileio import write_atomic
from megatrain.model import mlm_mask
from megatrain.training.engine import grad_norm, rank_mean
from megatrain.training.metrics import MetricsLogger
from megatrain.training.runtime import Run, TrainState


@dataclass
class BatchMaker:
    """Turns sample ids into (inputs, labels) tensors for the configured objective."""

    objective: str
    seed: int
    mask_id: int | None = None
    vocab_size: int = 0
    mlm_probability: float = 0.15
    special_ids: tuple = ()

    def __call__(self, dataset, ids: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(np.stack([dataset[int(i)] for i in ids]))
        if self.objective == "causal":
            return tokens[:, :-1].to(device), tokens[:, 1:].contiguous().to(device)
        # Masked LM: the mask of a sample depends only on (seed, sample id), like the sample itself.
        inputs, labels = [], []
        for row, i in zip(tokens[:, :-1], ids):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            x, y = mlm_mask(row, self.mask_id, self.vocab_size, self.mlm_probability, g, self.special_ids)
            inputs.append(x)
            labels.append(y)
        return torch.stack(inputs).to(device), torch.stack(labels).to(device)


class StopRequest:
    """SIGUSR1/SIGTERM (e.g. Slurm's --signal=USR1@120) or a time limit -> save and exit cleanly."""

    TIME_LIMIT = "time limit (train.exit_duration_minutes)"
    # What a stop can be, in the order that wins when ranks disagree; ranks all-reduce the index (MAX).
    REASONS = (None, TIME_LIMIT, "SIGUSR1", "SIGTERM")

    def __init__(self, minutes: float):
        self.deadline = time.time() + minutes * 60 if minutes > 0 else None
        self.signalled = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def reason(self, device) -> str | None:
        """The same on every rank, though one may get the signal before the others (srun signals each task)."""
        local = self.signalled or (self.TIME_LIMIT if self.deadline and time.time() > self.deadline else None)
        code = torch.tensor([self.REASONS.index(local)], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return self.REASONS[int(code.item())]


def note_stop(why: str, step: int) -> None:
    """Tell the job script that this run stopped before max_steps (it requeues the job): MEGATRAIN_STOP_FILE."""
    path = os.environ.get("MEGATRAIN_STOP_FILE")
    if path:
        write_atomic(path, f"{why} at step {step}\n")


def micro_batch_ids(step: int, micro: int, cfg: Config, dp: int, dp_rank: int) -> np.ndarray:
    b, G = cfg.train.micro_batch_size, cfg.train.global_batch_size
    start = step * G + micro * b * dp + dp_rank * b
    return np.arange(start, start + b)


@torch.no_grad()
def evaluate(engine, valid, cfg: Config, make: BatchMaker, grad_accum: int, dp: int, dp_rank: int) -> float:
    """Mean loss over the first train.eval_iters global batches of the validation set (the same
    samples, in the same micro-batches, whatever the layout)."""
    engine.eval()
    n_iters = min(cfg.train.eval_iters, len(valid) // cfg.train.global_batch_size)
    if is_pipeline(engine):
        losses = [float(engine.eval_batch(micro_batches(valid, it, cfg, make, grad_accum, dp, dp_rank, engine.device)))
                  for it in range(n_iters)]
    else:
        losses = [float(engine(*make(valid, micro_batch_ids(it, m, cfg, dp, dp_rank), engine.device)))
                  for it in range(n_iters) for m in range(grad_accum)]
    engine.train()
    return rank_mean(float(np.mean(losses)) if losses else float("nan"), engine.device)


def is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def micro_batches(dataset, step: int, cfg: Config, make: BatchMaker, grad_accum: int, dp: int, dp_rank: int, device):
    """The (inputs, labels) micro-batches of one step, as DeepSpeed's pipeline engine pulls them."""
    for m in range(grad_accum):
        yield make(dataset, micro_batch_ids(step, m, cfg, dp, dp_rank), device)


def drift_check(engine, cfg: Config, grid, step: int) -> None:
    import deepspeed

    from megatrain.parallel.parallelize import check_tp_drift, replicated_parameters

    params = [p for _, p in replicated_parameters(engine.module)]
    with deepspeed.zero.GatheredParameters(params, enabled=cfg.parallel.zero_stage == 3):
        check_tp_drift(engine.module, grid.get_slice_parallel_group(), step)


def train(run: Run, engine, train_ds, valid_ds, make: BatchMaker, state: TrainState, flops_per_token: float,
          peak: float) -> TrainState:
    cfg, layout, grad_accum, dp_rank = run.cfg, run.layout, run.grad_accum, run.dp_rank
    rank0 = run.rank == 0
    dp = layout.dp
    pipeline = is_pipeline(engine)
    t = cfg.train
    logger = MetricsLogger(cfg, cfg.checkpoint.dir, t.max_steps, state.step, enabled=rank0)
    stop = StopRequest(t.exit_duration_minutes)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
    last_saved = state.step
    stage0, norm0 = cfg.parallel.zero_stage == 0, float("nan")
    engine.train()
    try:
        while state.step < t.max_steps:
            step_loss = torch.zeros((), dtype=torch.float64)
            if pipeline:  # 1F1B over this step's micro-batches; the loss comes back averaged
                step_loss += float(engine.train_batch(micro_batches(train_ds, state.step, cfg, make, grad_accum, dp,
                                                                     dp_rank, engine.device))) * grad_accum
            for micro in range(0 if pipeline else grad_accum):
                ids = micro_batch_ids(state.step, micro, cfg, dp, dp_rank)
                inputs, labels = make(train_ds, ids, engine.device)
                loss = engine(inputs, labels)
                engine.backward(loss)
                if micro == grad_accum - 1 and stage0:
                    # DeepSpeed keeps no grad norm without ZeRO: measure the (reduced) gradients before the step
                    norm0 = float(torch.nn.utils.get_total_norm(
                        [p.grad for p in engine.module.parameters() if p.grad is not None]))
                engine.step()
                step_loss += loss.detach().double().cpu()
            state.step += 1
            state.consumed_samples += t.global_batch_size
            window_loss += float(step_loss) / grad_accum
            window_steps += 1
            logger.advance()
            every = cfg.parallel.drift_check_interval
            if layout.tp > 1 and every and (state.step % every == 0 or state.step == 1):
                drift_check(engine, cfg, run.grid, state.step)
            if state.step % t.log_interval == 0 or state.step == t.max_steps:
                secs = time.perf_counter() - window_t0
                loss_avg = rank_mean(window_loss / window_steps, engine.device)
                tps = tokens_per_step * window_steps / secs
                tflops = tps * flops_per_token / dist.get_world_size() / 1e12
                row = dict(step=state.step, loss=loss_avg, lr=engine.get_lr()[0], grad_norm=norm0 if stage0 else grad_norm(engine),
                           tokens_per_s=tps, tflops_per_device=tflops, mfu=tflops / peak if peak else float("nan"),
                           consumed_samples=state.consumed_samples, seconds_per_step=secs / window_steps)
                logger.log(row, f"step {state.step:>6}/{t.max_steps} | loss {loss_avg:.4f} | lr {row['lr']:.2e} | "
                                f"grad norm {row['grad_norm']:.3f} | {tps:,.0f} tokens/s | {tflops:.3f} TFLOP/s/device"
                                + (f" | MFU {row['mfu']:.1%}" if peak else ""))
                logger.advance(0, f"loss {loss_avg:.3f}")
                window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
            if valid_ds is not None and t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.max_steps):
                vloss = evaluate(engine, valid_ds, cfg, make, grad_accum, dp, dp_rank)
                logger.log(dict(step=state.step, kind="eval", val_loss=vloss, val_ppl=float(np.exp(min(vloss, 50)))),
                           f"step {state.step:>6} | validation loss {vloss:.4f} | perplexity {np.exp(min(vloss, 50)):.2f}")
                window_t0 = time.perf_counter()  # don't count evaluation time as training throughput
            interval = cfg.checkpoint.interval
            if interval and state.step % interval == 0 and state.step < t.max_steps:
                run.save(engine, state)
                last_saved = state.step
                window_t0 = time.perf_counter()
            why = stop.reason(engine.device)
            if why:
                if last_saved != state.step:
                    run.save(engine, state)
                logger.log(dict(step=state.step, kind="stop", reason=why), f"stopping at step {state.step}: {why}; "
                                                                            f"checkpoint saved, rerun to resume")
                if rank0:
                    note_stop(why, state.step)
                return state
        if last_saved != state.step:
            run.save(engine, state)
    finally:
        logger.close()
    return state

