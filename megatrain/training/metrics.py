"""What a researcher watches: FLOPs and MFU, console lines, metrics.jsonl, TensorBoard, wandb."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

from megatrain.config import Config, ModelConfig, ffn_width, kv_heads
from megatrain.hostinfo import cpu_cores, cpu_model
from megatrain.training.dist_env import log0

# Dense peak TFLOP/s per GPU (vendors' data sheets, SXM parts unless named, no sparsity), for MFU when
# logging.peak_tflops is 0, by what the matmuls run in: bf16/fp16 on tensor cores; an fp32 run's matmuls as TF32 when
# torch allows it (torch.backends.cuda.matmul.allow_tf32), else plain fp32. More specific names first.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": dict(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.2),
    "H200": dict(bf16=989.0, fp16=989.0, tf32=494.7, fp32=66.9),
    "H100": dict(bf16=989.0, fp16=989.0, tf32=494.7, fp32=66.9),
    "A100": dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
    "L40S": dict(bf16=362.0, fp16=362.0, tf32=183.0, fp32=91.6),
    "V100": dict(fp16=125.0, fp32=15.7),
}


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


def train_flops_per_token(m: ModelConfig, seq_len: int, whole_attention: bool = False) -> float:
    """Forward + backward (twice the forward): 3x. Causal attention is counted halved (the FLOPs a causal kernel
    does); whole_attention counts it whole, as PaLM's MFU, nanoGPT and Megatron do (the comparable figure)."""
    return 3 * forward_flops_per_token(m, seq_len, causal=m.objective == "causal" and not whole_attention)


def frozen_flops_adjustment(model, m: ModelConfig, seq_len: int, causal: bool = True, head: bool = True) -> float:
    """FLOPs per token to add to the 3x count of a model with frozen parameters (LoRA, finetune.freeze), so that the
    count is what autograd computes (tested against torch's FlopCounterMode): less a frozen matrix's weight gradient
    (its forward FLOPs again); less the whole backward (twice the forward) of a block with nothing trainable in it or
    before it; less the first projection's input gradient when nothing before it trains; plus LoRA's adapters (3x
    their forward). `head`: the count includes the LM head (pretraining, sft), a frozen one spares its weight gradient.
    0 for a model with nothing frozen, or that is not the plain Transformer (a pipeline's stages)."""
    from megatrain.model import Transformer
    from megatrain.training.engine import ndim, numel

    params = dict(model.named_parameters())
    if not isinstance(model, Transformer) or all(p.requires_grad for p in params.values()):
        return 0.0

    def trains(prefix: str) -> bool:
        return any(p.requires_grad for n, p in params.items() if n.startswith(prefix))

    def adapter(name: str) -> int:  # a LoRA matrix's elements: its forward FLOPs per token / 2 (this rank's slice)
        return numel(params[name]) if name in params else 0

    def frozen_share(prefix: str) -> float:
        mats = [p for n, p in params.items() if n.startswith(prefix) and n.endswith(".weight") and ndim(p) == 2]
        total = sum(numel(p) for p in mats)
        return sum(numel(p) for p in mats if not p.requires_grad) / total if total else 0.0

    attn_proj, mlp, attn_mix = block_flops_per_token(m, seq_len, causal)
    hd = m.d_model // m.n_heads
    qkv = 2 * m.d_model * (m.n_heads + 2 * kv_heads(m)) * hd  # forward FLOPs of the first projection
    change, upstream = 0.0, trains("embed.") or trains("pos_embed.")
    for i in range(m.n_layers):
        pre = f"layers.{i}."
        if not upstream and not trains(pre):
            change -= 2 * (attn_proj + mlp + attn_mix)
            continue
        if not upstream and not trains(pre + "attn_norm."):  # qkv's input needs no gradient: that matmul is spared
            change -= qkv + 2 * adapter(pre + "attn.qkv.lora_A")
        upstream = True
        change -= attn_proj * frozen_share(pre + "attn.") + mlp * frozen_share(pre + "mlp.")
        change += 3 * 2 * sum(adapter(n) for n in params if n.startswith(pre) and ".lora_" in n)  # x A^T, then B
    lm_head = params.get("lm_head.weight", params.get("embed.weight"))  # tied: the embedding is the head
    if head and m.vocab_size and lm_head is not None and not lm_head.requires_grad:
        change -= 2 * m.d_model * m.vocab_size
    return change


@dataclass
class Throughput:
    """What turns a step's tokens and seconds into TFLOP/s and MFU."""

    flops_per_token: float  # training FLOPs per token, causal attention halved (this project's convention)
    flops_per_token_whole: float  # the same with attention counted whole (PaLM, nanoGPT, Megatron): comparable MFU
    peak: float  # TFLOP/s one rank can reach (its share of the node on CPU); 0: unknown, no MFU

    @classmethod
    def of(cls, run, task, seq_len: int, model=None) -> "Throughput":
        """The run's FLOP counts (less what `model`'s frozen parameters spare) and MFU peak, and a line saying what
        they are (a collective on CPU: see peak_tflops)."""
        m = run.cfg.model
        peak, where = peak_tflops(run.cfg, run.precision, run.ranks_on_node)
        counts, changes = [], []
        for whole in (False, True):
            changes.append(0.0 if model is None else frozen_flops_adjustment(
                model, m, seq_len, causal=m.objective == "causal" and not whole, head=task.counts_lm_head))
            counts.append(task.flops_per_token(m, seq_len, whole_attention=whole) + changes[-1])
        t = cls(*counts, peak)
        frozen = ", frozen weights: no gradients" if changes[0] else ""
        log0(f"FLOPs/token (train) {t.flops_per_token:,.0f} ({t.flops_per_token_whole:,.0f} counting causal attention "
             f"whole{frozen}) | MFU peak {peak:.3f} TFLOP/s per rank ({where})")
        return t


def measured_matmul_tflops(n: int = 2048, trials: int = 5, repeat: int = 3) -> float:
    """This process's fp32 torch.mm throughput with its current threads: the best of `trials` timings of `repeat`
    n x n products (the best, so a moment of other load on the machine does not lower it). Draws from a generator
    of its own, not from torch's global RNG (the run's seeds stay untouched)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(repeat):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t0) / 1e12)
    return best


def cpu_node_peak_tflops() -> tuple[float, str]:
    """The node's fp32 torch.mm rate on all its cores, measured once per machine and cached in
    $MEGATRAIN_CACHE/cpu-peak.json (~/.cache/megatrain) with the conditions it was measured under; delete the file to
    measure again. Returns (TFLOP/s, where it comes from)."""
    import torch

    from megatrain.fileio import cache_dir, write_atomic

    cores = cpu_cores()
    path = os.path.join(cache_dir(), "cpu-peak.json")
    key = f"{cpu_model()} | {cores} cores | torch {torch.__version__.split('+')[0]}"
    table = {}
    try:
        with open(path) as f:
            table = json.load(f)
        hit = table[key]
        where = f"this node's fp32 torch.mm, measured {hit['measured']}, cached in {path}"
        if hit.get("load_average_1min", 0) > cores / 2:  # other work shared the cores: a low peak, a high MFU
            where += f"; the machine was busy then (load {hit['load_average_1min']}): delete the file to measure again"
        return float(hit["tflops"]), where
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or a damaged file: measure (and rewrite it)
        table = table if isinstance(table, dict) else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        tflops = measured_matmul_tflops()
    finally:
        torch.set_num_threads(threads)
    when = time.strftime("%Y-%m-%d %H:%M")
    table[key] = dict(tflops=round(tflops, 4), measured=when, load_average_1min=round(os.getloadavg()[0], 2),
                      how=f"fp32 torch.mm of 2048 x 2048 matrices on {cores} threads, the best of 5 timings of 3")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(table, indent=1) + "\n")
    except OSError:  # a read-only cache: measure again next time
        return tflops, f"this node's fp32 torch.mm, measured now (not cached: cannot write {path})"
    return tflops, f"this node's fp32 torch.mm, measured now, cached in {path}"


def peak_tflops(cfg: Config, precision: str, ranks_on_node: int = 1) -> tuple[float, str]:
    """The MFU denominator for one rank: logging.peak_tflops; on a GPU, the table for the run's precision; on CPU the
    node's measured torch.mm rate divided among the ranks that share its cores. A collective on CPU (one rank per
    node measures while the others wait, so the cores are its own): every rank calls it at the same point."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops, "logging.peak_tflops"
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        kind = precision
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            kind = "tf32"
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name and kind in peaks:
                return peaks[kind], f"{name} dense {kind} peak"
        return 0.0, f"no {precision} peak known for {name}: set logging.peak_tflops"
    import torch.distributed as dist

    together = dist.is_initialized() and dist.get_world_size() > 1
    if together and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        cpu_node_peak_tflops()  # measured (or found) first, the node's other ranks waiting at the barrier
    if together:
        dist.barrier()
    node, where = cpu_node_peak_tflops()
    if ranks_on_node == 1:
        return node, where
    return node / ranks_on_node, f"{node:.3f} for the node, shared by its {ranks_on_node} ranks; {where}"


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
