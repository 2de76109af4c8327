"""Where a baby-GPT step's time goes, megatrain beside nanoGPT, in one process.

    python bench/baby_profile.py --nanogpt DIR      # DIR: a checkout of karpathy/nanoGPT (its model.py is imported)

Both models train on random tokens of their own vocabulary (megatrain's byte tokenizer: 256; nanoGPT's characters:
65), batch 12 x 64, each the way its own trainer runs a step: megatrain through the DeepSpeed engine its CLI builds
(configs/baby-gpt.yaml: ZeRO-0, fused AdamW, clipping), nanoGPT through its train.py loop (loss.backward,
clip_grad_norm_, AdamW, zero_grad). The steps are interleaved, in rounds, so drift in the machine hits both alike.
Printed per step: the median forward, backward and optimizer time; from torch's profiler, the time inside aten ops
(the math) against the rest (Python, hooks, the trainer's own work); and the ops whose time differs most.
bench_train.py --nanogpt runs this after its side-by-side training runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from results_file import write_results  # noqa: E402

B, T = 12, 64  # nanoGPT's baby GPT: batch 12, block 64


def megatrain_side():
    """(name, step phases) of baby GPT as `megatrain pretrain --config baby-gpt` builds it."""
    from megatrain.config import load_config
    from megatrain.data import build_tokenizer
    from megatrain.model import Transformer
    from megatrain.training.engine import build_engine
    from megatrain.training.runtime import resolve_vocab

    cfg = load_config("baby-gpt", [])
    cfg = cfg.replaced({"model": resolve_vocab(cfg, build_tokenizer(cfg.data.tokenizer))})
    torch.manual_seed(0)
    engine, *_ = build_engine(cfg, Transformer(cfg.model), 1)
    engine.train()
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as a real batch: two tensors of their own
    state = {}

    def forward():
        state["loss"] = engine(x, y)

    return "megatrain", cfg.model.vocab_size, (forward, lambda: engine.backward(state["loss"]), engine.step)


def nanogpt_side(checkout: str):
    """(name, step phases) of nanoGPT's GPT from `checkout`/model.py, stepped as its train.py does on CPU."""
    sys.path.insert(0, os.path.abspath(checkout))
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
    model.train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    tokens = torch.randint(0, 65, (B, T + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as a real batch: two tensors of their own
    state = {}

    def forward():
        state["loss"] = model(x, y)[1]

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return "nanoGPT", 65, (forward, lambda: state["loss"].backward(), step)


def time_phases(phases, steps: int) -> dict[str, list[float]]:
    out = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for _ in range(steps):
        marks = [time.perf_counter()]
        for phase in phases:
            phase()
            marks.append(time.perf_counter())
        for key, a, b in zip(("forward", "backward", "optimizer"), marks, marks[1:]):
            out[key].append(b - a)
        out["step"].append(marks[-1] - marks[0])
    return out


def profile_ops(phases, steps: int) -> tuple[float, dict[str, float]]:
    """(wall seconds per step, self seconds per step of each aten op) under torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            for phase in phases:
                phase()
        wall = time.perf_counter() - t0
    ops = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages() if e.key.startswith("aten::")}
    return wall / steps, ops


def side_by_side(checkout: str, steps: int = 100, rounds: int = 3) -> dict:
    import torch.distributed as dist

    from megatrain.training.dist_env import init_distributed

    if not dist.is_initialized():
        init_distributed()  # the engine needs a process group (one rank, gloo)
    sides = [megatrain_side(), nanogpt_side(checkout)]
    timed = {name: {} for name, _, _ in sides}
    for _ in range(rounds):
        for name, _, phases in sides:
            time_phases(phases, 5)  # warm
            for key, v in time_phases(phases, steps).items():
                timed[name].setdefault(key, []).extend(v)
    out = {}
    for name, vocab, phases in sides:
        wall, ops = profile_ops(phases, 20)
        med = {k: statistics.median(v) for k, v in timed[name].items()}
        out[name] = dict(vocab=vocab, ms={k: 1e3 * v for k, v in med.items()}, profiled_ms_per_step=1e3 * wall,
                         in_aten_ops_ms=1e3 * sum(ops.values()), ops_ms={k: 1e3 * v for k, v in ops.items()})
    ours, ref = out["megatrain"], out["nanoGPT"]
    print(f"\nbaby GPT step, batch {B} x {T}, one process, median of {rounds} x {steps} interleaved steps (ms):")
    print(f"  {'':10s} {'forward':>8s} {'backward':>9s} {'optimizer':>10s} {'step':>7s}   profiled: {'aten ops':>8s} "
          f"{'the rest':>9s}")
    for name in ("megatrain", "nanoGPT"):
        r = out[name]
        rest = r["profiled_ms_per_step"] - r["in_aten_ops_ms"]
        print(f"  {name:10s} {r['ms']['forward']:8.2f} {r['ms']['backward']:9.2f} {r['ms']['optimizer']:10.2f} "
              f"{r['ms']['step']:7.2f}   {'':9s} {r['in_aten_ops_ms']:8.2f} {rest:9.2f}")
    diff = sorted(((ours["ops_ms"].get(k, 0.0) - ref["ops_ms"].get(k, 0.0), k)
                   for k in set(ours["ops_ms"]) | set(ref["ops_ms"])), key=lambda d: -abs(d[0]))[:8]
    out["largest_op_differences_ms"] = {k: d for d, k in diff}
    print("  ops whose time differs most (megatrain - nanoGPT, ms/step): "
          + ", ".join(f"{k.removeprefix('aten::')} {d:+.2f}" for d, k in diff))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", required=True, metavar="DIR", help="a karpathy/nanoGPT checkout")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "baby_profile.json"))
    args = ap.parse_args()
    res = side_by_side(args.nanogpt, args.steps, args.rounds)
    write_results(args.out, res)
    print(f"wrote {args.out}")

    from megatrain.training.dist_env import end_distributed

    end_distributed()  # the process group the engines used ends before the interpreter does (a gloo thread can abort it)


if __name__ == "__main__":
    main()
