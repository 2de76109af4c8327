"""One training step under torch.profiler (logging.profile_step): where its time goes, by op.

Every rank profiles the same step and writes, in checkpoint.dir/profile/, its op table (`step{N}-rank{R}.txt`, by
self time) and a Chrome trace (`step{N}-rank{R}.trace.json`: chrome://tracing or https://ui.perfetto.dev). Rank 0
logs the split (a metrics.jsonl row of kind "profile" and a console line): the matmuls, the attention kernel, and the
rest with its five biggest ops. A step can go no faster than its matmuls at the machine's best rate, so "the rest" is
the part a faster implementation could remove.
"""
from __future__ import annotations

import contextlib
import os

import torch

# Where torch spends a Linear's FLOPs (CPU and CUDA op names alike).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
              "mkldnn::_linear_pointwise")  # (the last: cpu_linear's oneDNN products)


def _is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def op_split(prof) -> dict:
    """The shares of a profile's self time (device time when it ran on a GPU): matmul, attention, rest, and the five
    biggest ops of the rest (top_rest). An op called inside a matmul or attention op counts as part of it: the copy
    oneDNN's product makes of a transposed input is its operand packing, as MKL packs its operands inside sgemm."""
    events = prof.events()
    on_device = any(getattr(e, "self_device_time_total", 0) > 0 for e in events)
    share = {"matmul": 0.0, "attention": 0.0}
    rest: dict[str, float] = {}
    for e in events:
        t = e.self_device_time_total if on_device else e.self_cpu_time_total
        kind, node = None, e
        while node is not None:  # (the outermost matmul or attention op around e, e itself included)
            if node.name in MATMUL_OPS:
                kind = "matmul"
            elif _is_attention(node.name):
                kind = "attention"
            node = node.cpu_parent
        if kind:
            share[kind] += t
        else:
            rest[e.name] = rest.get(e.name, 0.0) + t
    total = (sum(share.values()) + sum(rest.values())) or 1.0
    top = sorted(((t, k) for k, t in rest.items()), reverse=True)[:5]
    return dict(matmul=share["matmul"] / total, attention=share["attention"] / total,
                rest=1 - (share["matmul"] + share["attention"]) / total, top_rest={k: t / total for t, k in top},
                timed="device" if on_device else "cpu")


def split_line(split: dict) -> str:
    top = ", ".join(f"{k} {v:.1%}" for k, v in split["top_rest"].items())
    return (f"matmuls {split['matmul']:.1%}, attention {split['attention']:.1%}, the rest {split['rest']:.1%} "
            f"({top})")


@contextlib.contextmanager
def profiled_step(step: int, profile_step: int, run_dir: str, rank: int, logger):
    """Around the training step `step` (1-based): when it is logging.profile_step, profile it, write this rank's
    table and trace, and log the split from rank 0; otherwise nothing."""
    if step != profile_step:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        yield
        if cuda:
            torch.cuda.synchronize()
    folder = os.path.join(run_dir, "profile")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"step{step}-rank{rank}")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(stem + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
    prof.export_chrome_trace(stem + ".trace.json")
    split = op_split(prof)
    logger.log(dict(step=step, kind="profile", **split),
               f"profile of step {step}: {split_line(split)}; op table and trace in {folder}")
