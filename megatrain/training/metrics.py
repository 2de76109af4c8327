"""What a researcher watches: FLOPs and MFU, console lines, metrics.jsonl, TensorBoard, wandb."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from megatrain.config import Config, ModelConfig, ffn_width, kv_heads

# Dense bf16 peak TFLOP/s per GPU (no sparsity), for MFU when logging.peak_tflops is 0.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "V100": 125.0}


def block_flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True) -> tuple[float, float, float]:
    """Forward FLOPs per token of one block (2 per multiply-add): (attention's projections, the MLP, attention's own).

    Projections: QKV (GQA: fewer K/V columns) and the output projection. MLP: three matrices for SwiGLU, two for GELU.
    Attention: the scores QK^T and the weighted sum AV over seq_len keys (halved when causal: on average a token
    attends to half the sequence)."""
    d, hd = m.d_model, m.d_model // m.n_heads
    q_dim, kv_dim = m.n_heads * hd, kv_heads(m) * hd
    attn_proj = 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d
    mlp = 2 * d * ffn_width(m) * (3 if m.mlp == "swiglu" else 2)
    attn_mix = 2 * 2 * seq_len * q_dim * (0.5 if causal else 1.0)
    return attn_proj, mlp, attn_mix


def forward_flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward-pass FLOPs per token: every block plus the LM head (embedding lookups excluded)."""
    return m.n_layers * sum(block_flops_per_token(m, seq_len, causal)) + 2 * m.d_model * m.vocab_size


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward + backward (twice the forward): 3x."""
    return 3 * forward_flops_per_token(m, seq_len, causal=m.objective == "causal")


def measured_matmul_tflops(n: int = 1024, repeat: int = 5) -> float:
    """This device's fp32 torch.mm throughput, the CPU's 'peak' for MFU."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeat):
        torch.mm(a, b)
    return 2 * n**3 * repeat / (time.perf_counter() - t0) / 1e12


def peak_tflops(cfg: Config) -> tuple[float, str]:
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops, "logging.peak_tflops"
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf, f"{name} bf16 peak"
        return 0.0, f"unknown GPU {name}: set logging.peak_tflops"
    return measured_matmul_tflops(), "measured fp32 torch.mm"


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
    import secrets

    from megatrain.fileio import write_atomic

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
        show = cfg.logging.progress_bar
        if show == "on" or (show == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

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
