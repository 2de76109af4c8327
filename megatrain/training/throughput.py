"""A run's throughput: its FLOPs per token (the formulas of megatrain/flops.py, for its task and frozen weights) and
the peak its MFU divides by (a GPU's data sheet, or this CPU node's measured fp32 matmul rate)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatrain import cpu_linear
from megatrain.config import Config
from megatrain.fileio import cache_dir, write_atomic
from megatrain.flops import frozen_flops_adjustment, last_block_tail_flops
from megatrain.hostinfo import cpu_cores, cpu_model
from megatrain.model import Transformer
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


@dataclass
class Throughput:
    """What turns a step's tokens and seconds into TFLOP/s and MFU."""

    flops_per_token: float  # training FLOPs per token, causal attention halved (this project's convention)
    flops_per_token_whole: float  # the same with attention counted whole (PaLM, nanoGPT, Megatron): comparable MFU
    peak: float  # TFLOP/s one rank can reach (its share of the node on CPU); 0: unknown, no MFU
    # of flops_per_token, what a token without a label spares where only the labeled rows reach the head and the last
    # block's MLP (unlabeled_token_saving); 0: every token goes through them
    unlabeled_saving: float = 0.0

    def flops(self, tokens: int, labeled: int, whole: bool = False) -> float:
        """Training FLOPs of `tokens` tokens of which `labeled` have a label."""
        per_token = self.flops_per_token_whole if whole else self.flops_per_token
        return tokens * per_token - (tokens - labeled) * self.unlabeled_saving

    @classmethod
    def of(cls, run, task, seq_len: int, model=None) -> "Throughput":
        """The run's FLOP counts (less what `model`'s frozen parameters spare) and MFU peak, and a line saying what
        they are (a collective on CPU: see peak_tflops)."""
        m = run.cfg.model
        peak, where = peak_tflops(run.cfg, run.precision, run.ranks_on_node)
        counts, changes = [], []
        for whole in (False, True):
            changes.append(0.0 if not isinstance(model, Transformer) else frozen_flops_adjustment(
                model, m, seq_len, causal=m.objective == "causal" and not whole, head=task.counts_lm_head))
            counts.append(task.flops_per_token(m, seq_len, whole_attention=whole) + changes[-1])
        head = unlabeled_token_saving(model, m, seq_len, task)
        t = cls(*counts, peak, head)
        frozen = ", frozen weights: no gradients" if changes[0] else ""
        sparse = f", less {head:,.0f} for a token without a label" if head else ""
        log0(f"FLOPs/token (train) {t.flops_per_token:,.0f} ({t.flops_per_token_whole:,.0f} counting causal attention "
             f"whole{frozen}{sparse}) | MFU peak {peak:.3f} TFLOP/s per rank ({where})")
        return t


def unlabeled_token_saving(model, m, seq_len: int, task) -> float:
    """The training FLOPs a token without a label spares where the model computes only the rows a head reads: the
    last block's output projection and MLP (flops.last_block_tail_flops; model.py's features(rows=...)), and the LM
    head's, forward and backward (no weight gradient for a frozen one) where only the labeled rows reach it
    (model.py's sparse_labels: MLM, sft; not under tensor parallelism, whose vocab-parallel loss reads every row). A
    classifier pooling the last or first token spares the last block's share for every other token. 0 elsewhere."""
    from megatrain.heads import SequenceClassifier

    if not isinstance(model, Transformer):  # (a pipeline's stages run every row)
        return 0.0
    tail = last_block_tail_flops(model, m) if model.cuts_last_block() else 0.0
    if isinstance(model, SequenceClassifier):
        return tail if model.pooling != "mean" else 0.0
    if not (model.sparse_labels and model.loss_fn is None and task.counts_lm_head):
        return 0.0
    no_head = dataclasses.replace(m, vocab_size=0)
    spared = [frozen_flops_adjustment(model, m, seq_len, head=h) for h in (True, False)]  # a frozen head's weight grad
    return task.flops_per_token(m, seq_len) - task.flops_per_token(no_head, seq_len) + spared[0] - spared[1] + tail


def measured_matmul_tflops(n: int = 1024, trials: int = 5, repeat: int = 4, product=None) -> float:
    """This process's fp32 matmul throughput with its current threads, through `product` (by default the one the
    linear layers use: cpu_linear's oneDNN product on a CPU, else torch.mm): the best of `trials` timings of `repeat`
    n x n products (the best, so a moment of other load on the machine does not lower it). Draws from a generator
    of its own, not from torch's global RNG (the run's seeds stay untouched)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g)
    mm = product or (cpu_linear.product if cpu_linear.runs_here(a, b) else torch.mm)  # (a @ b^T: the same FLOPs)
    mm(a, b)
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(repeat):
            mm(a, b)
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t0) / 1e12)
    return best


def cpu_node_peak_tflops() -> tuple[float, str]:
    """The node's fp32 matmul rate (`measured_matmul_tflops`) on all its cores (about 0.3 s on 2 cores), measured once per machine and
    cached in $MEGATRAIN_CACHE/cpu-peak.json (~/.cache/megatrain) with the load it was measured under. A figure
    measured while more processes ran than the node has cores is too low (and the MFU too high): each run measures
    again until one measures on a quieter machine, and the cache keeps the highest figure. Returns (TFLOP/s, where it comes from)."""
    cores = cpu_cores()
    path = os.path.join(cache_dir(), "cpu-peak.json")
    what = f"fp32 {cpu_linear.BACKEND}"
    key = f"{cpu_model()} | {cores} cores | torch {torch.__version__.split('+')[0]} | {cpu_linear.BACKEND}"
    table, hit = {}, None
    try:
        with open(path) as f:
            table = json.load(f)
        hit = table[key]
        if hit.get("load_average_1min", 0) <= cores:  # (at most one runnable process a core: quiet enough)
            return float(hit["tflops"]), f"this node's {what}, measured {hit['measured']}, cached in {path}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or a damaged file: measure
        table = table if isinstance(table, dict) else {}
        hit = None
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        tflops = measured_matmul_tflops()
    finally:
        torch.set_num_threads(threads)
    load = round(os.getloadavg()[0], 2)
    if hit is not None and float(hit["tflops"]) >= tflops:  # a busy machine now too: the cached figure is higher
        return float(hit["tflops"]), (f"this node's {what}, measured {hit['measured']}, cached in {path}; "
                                      f"busy then (load {hit['load_average_1min']}) and now (load {load})")
    when = time.strftime("%Y-%m-%d %H:%M")
    table[key] = dict(tflops=round(tflops, 4), measured=when, load_average_1min=load,
                      how=f"{what} of 1024 x 1024 matrices on {cores} threads, the best of 5 timings of 4")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(table, indent=1) + "\n")
    except OSError:  # a read-only cache: measure again next time
        return tflops, f"this node's {what}, measured now (not cached: cannot write {path})"
    return tflops, f"this node's {what}, measured now, cached in {path}"


def peak_tflops(cfg: Config, precision: str, ranks_on_node: int = 1) -> tuple[float, str]:
    """The MFU denominator for one rank: logging.peak_tflops; on a GPU, the table for the run's precision; on CPU the
    node's measured fp32 matmul rate divided among the ranks that share its cores. A collective on CPU (one rank per
    node measures while the others wait, so the cores are its own): every rank calls it at the same point."""
    if cfg.logging.peak_tflops > 0:
        return cfg.logging.peak_tflops, "logging.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        kind = precision
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            kind = "tf32"
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name and kind in peaks:
                return peaks[kind], f"{name} dense {kind} peak"
        return 0.0, f"no {precision} peak known for {name}: set logging.peak_tflops"
    together = dist.is_initialized() and dist.get_world_size() > 1
    if together and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        cpu_node_peak_tflops()  # measured (or found) first, the node's other ranks waiting at the barrier
    if together:
        dist.barrier()
    node, where = cpu_node_peak_tflops()
    if ranks_on_node == 1:
        return node, where
    return node / ranks_on_node, f"{node:.3f} for the node, shared by its {ranks_on_node} ranks; {where}"
