"""Mixture-of-Experts benchmark: MoE against dense at equal active parameters, the grouped matmul against the
per-expert loop, and expert parallelism (EP=2) against replicated experts (EP=1).

    python bench/bench_moe.py [--steps 400] [--skip dense|grouped|ep ...]

Part 1 (`dense`): an 8-expert top-2 model (swiglu experts of width --moe-ffn) against the dense model of the same
active width (d_ff = 2 x moe_ffn: the same matmul FLOPs per token, apart from the router's), the same d_model, layers,
heads, data, steps, batch, sequence length and learning-rate schedule; fp32, one process, OMP_NUM_THREADS=1, each
through the real CLI (`megatrain pretrain --config tiny --set ...`). The data is tinyshakespeare (--data) with the
byte tokenizer, cut as nanoGPT cuts it: the first 90% of the characters one document (training), the last 10%
another (validation), data.split=1,1,0. Reported: the median tokens/s of the logged intervals after the first, and
the validation loss at the end (over --eval-iters batches).
Part 2 (`grouped`): GroupedExperts forward + backward (in this process, one thread) on --rows routed rows spread at
random over 8 experts, `loop=False` (torch._grouped_mm where it applies) against `loop=True` (one matmul per expert),
fp32 and bf16, median of --repeats after a warm-up.
Part 3 (`ep`): one MoE model on 2 ranks (`torchrun --nproc_per_node 2`, ZeRO-1, data parallel 2), parallel.ep=2
against parallel.ep=1, --ep-steps steps: the median seconds per step, each rank's parameter count and RSS from the
run's rank table (printed after the engine is built, before the first step), and the peak RSS of the largest process
over the whole run (/usr/bin/time). On one CPU machine the all-to-all is shared-memory gloo between two processes
sharing the cores: the step time says little about a cluster; the memory per rank is the figure that carries.
Every run through the CLI records the machine's 1-minute load average before it (a shared machine's speed drifts).
`--skip PART` keeps that part's last figures, with the run that measured them.
Results go to bench/results/bench_moe.json (bench/results_file.py: with the command, commit, date and machine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from shakespeare_data import prepare_data  # noqa: E402
from results_file import run_meta, write_results  # noqa: E402

RANK_ROW = re.compile(r"rank\s+(\d+):.*\|\s+([\d.]+)M parameters \| ([\d.]+) GiB RSS")


def env1() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def model_sets(args, moe: bool, width: int, ffn: int) -> dict:
    base = {"model.d_model": width, "model.n_layers": args.layers, "model.n_heads": args.heads,
            "model.n_kv_heads": args.heads, "model.max_seq_len": args.seq, "data.seq_len": args.seq}
    if moe:
        return {**base, "model.moe_experts": args.experts, "model.moe_top_k": args.top_k, "model.moe_ffn": ffn}
    return {**base, "model.d_ff": 2 * ffn}  # the active width of top-2 experts of width ffn


def metrics(ckpt: str) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
    return [r for r in rows if "seconds_per_step" in r], [r for r in rows if r.get("kind") == "eval"]


def pretrain(sets: dict, launcher: list[str], env: dict) -> tuple[str, float]:
    """One `megatrain pretrain --config tiny` run; its output and wall seconds. The machine's 1-minute load average
    before the run is printed (on a shared machine it says how comparable two runs' speeds are)."""
    print(f"  load average before the run: {os.getloadavg()[0]:.2f}", flush=True)
    cmd = [*launcher, "-m", "megatrain.pretrain", "--config", "tiny",
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{run.stdout[-3000:]}{run.stderr[-3000:]}\nbench_moe: {' '.join(cmd)} failed (exit {run.returncode})")
    return run.stdout + run.stderr, time.perf_counter() - t0


def part_dense(args, work: str) -> dict:
    data = prepare_data(args.data, work, env1())
    common = {"data.path": data, "data.tokenizer": "byte", "data.split": "1,1,0", "train.max_steps": args.steps,
              "train.micro_batch_size": args.batch, "train.global_batch_size": args.batch,
              "train.warmup_steps": args.steps // 10, "train.eval_interval": args.steps,
              "train.eval_iters": args.eval_iters, "train.log_interval": 10, "train.log_first_step": "false",
              "checkpoint.interval": 0, "logging.tensorboard": "false", "logging.progress_bar": "off",
              "parallel.zero_stage": 0}
    out = dict(sizes=dict(d_model=args.width, layers=args.layers, heads=args.heads, seq_len=args.seq,
                          batch=args.batch, steps=args.steps, experts=args.experts, top_k=args.top_k,
                          moe_ffn=args.moe_ffn, dense_d_ff=2 * args.moe_ffn, vocab="byte (256)",
                          eval_batches=args.eval_iters,
                          lr=f"3e-3, cosine to 3e-4 (the tiny preset's), warmup {args.steps // 10} steps"))
    for name, moe in (("dense", False), ("moe", True)):
        ckpt = os.path.join(work, name)
        load = os.getloadavg()[0]
        log, wall = pretrain({**common, **model_sets(args, moe, args.width, args.moe_ffn), "checkpoint.dir": ckpt},
                             [sys.executable], env1())
        train, evals = metrics(ckpt)
        params = float(re.search(r"\|\s+([\d.]+)M parameters \|", log).group(1)) * 1e6
        out[name] = dict(load_avg_before=load, tokens_per_s=statistics.median(r["tokens_per_s"] for r in train[1:]),
                         val_loss=evals[-1]["val_loss"], final_train_loss=train[-1]["loss"], wall_s=wall,
                         params=params)
        print(f"{name:6s} {out[name]['tokens_per_s']:8,.0f} tokens/s  val loss {out[name]['val_loss']:.4f}  "
              f"({params / 1e6:.2f}M parameters, {wall:.0f} s)", flush=True)
    w, d, f, L = args.width, args.experts, args.moe_ffn, args.layers
    out["moe"]["active_params"] = out["moe"]["params"] - L * d * 3 * w * f + L * args.top_k * 3 * w * f
    out["tokens_per_s_ratio"] = out["moe"]["tokens_per_s"] / out["dense"]["tokens_per_s"]
    out["val_loss_diff"] = out["moe"]["val_loss"] - out["dense"]["val_loss"]
    print(f"MoE / dense tokens/s {out['tokens_per_s_ratio']:.2f}x; val loss MoE - dense {out['val_loss_diff']:+.4f}")
    return out


def time_experts(experts, rows, counts, repeats: int) -> float:
    import torch

    g = torch.randn_like(rows)
    times = []
    for i in range(repeats + 1):
        experts.zero_grad(set_to_none=True)
        x = rows.detach().requires_grad_()
        t0 = time.perf_counter()
        experts(x, counts).backward(g)
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_grouped(args) -> dict:
    import torch

    from megatrain.moe import GroupedExperts, grouped_mm_supported

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = dict(rows=args.rows, experts=args.experts, repeats=args.repeats, threads=1, cases=[])
    for d, ff in ((256, 512), (512, 1024)):
        for dtype in (torch.float32, torch.bfloat16):
            ex = GroupedExperts(args.experts, d, ff, "swiglu", "tanh")
            for p in ex.parameters():
                torch.nn.init.normal_(p, std=0.02)
            ex = ex.to(dtype)
            counts = torch.bincount(torch.randint(0, args.experts, (args.rows,)), minlength=args.experts)
            rows = torch.randn(args.rows, d, dtype=dtype)
            grouped = grouped_mm_supported(rows, ex.gate_up)
            with torch.no_grad():
                ex.loop = False
                a = ex(rows, counts)
                ex.loop = True
                b = ex(rows, counts)
            t = {}
            for loop in (False, True):  # each once, then again: drift in this machine's speed hits both alike
                ex.loop = loop
                t[loop] = time_experts(ex, rows, counts, args.repeats)
            for loop in (False, True):
                ex.loop = loop
                t[loop] = min(t[loop], time_experts(ex, rows, counts, args.repeats))
            case = dict(d_model=d, ffn=ff, dtype=str(dtype).replace("torch.", ""), grouped_mm=grouped,
                        grouped_s=t[False], loop_s=t[True], loop_over_grouped=t[True] / t[False],
                        max_abs_diff=float((a.float() - b.float()).abs().max()))
            out["cases"].append(case)
            print(f"d {d:4d} ff {ff:5d} {case['dtype']:8s} grouped{'' if grouped else ' (n/a: loop)'} "
                  f"{t[False] * 1e3:7.1f} ms  loop {t[True] * 1e3:7.1f} ms  loop/grouped "
                  f"{case['loop_over_grouped']:.2f}x", flush=True)
    return out


def part_ep(args, work: str) -> dict:
    from megatrain.training.dist_env import free_port

    data = prepare_data(args.data, work, env1())
    sets = {"data.path": data, "data.tokenizer": "byte", "data.split": "1,1,0", "train.max_steps": args.ep_steps,
            "train.micro_batch_size": args.batch, "train.global_batch_size": 2 * args.batch,
            "train.eval_interval": 0, "train.log_interval": 2, "train.log_first_step": "false",
            "checkpoint.interval": 0, "logging.tensorboard": "false", "logging.progress_bar": "off",
            "parallel.zero_stage": 1,
            **model_sets(args, True, args.ep_width, args.ep_moe_ffn)}
    out = dict(sizes=dict(d_model=args.ep_width, layers=args.layers, heads=args.heads, seq_len=args.seq,
                          micro_batch=args.batch, global_batch=2 * args.batch, steps=args.ep_steps,
                          experts=args.experts, top_k=args.top_k, moe_ffn=args.ep_moe_ffn, ranks=2, zero_stage=1),
               note="one 2-core CPU machine: the all-to-all is shared-memory gloo between two ranks sharing the "
                    "cores, so the step time is not representative of a cluster; the memory per rank carries")
    for ep in (1, 2):
        ckpt = os.path.join(work, f"ep{ep}")
        load = os.getloadavg()[0]
        launcher = ["/usr/bin/time", "-f", "maxrss_kib %M", sys.executable, "-m", "torch.distributed.run",
                    "--nproc_per_node", "2", "--master_port", str(free_port())]
        log, wall = pretrain({**sets, "parallel.ep": ep, "checkpoint.dir": ckpt}, launcher, env1())
        ranks = sorted((int(r), float(n) * 1e6, float(m)) for r, n, m in RANK_ROW.findall(log))
        train, _ = metrics(ckpt)
        r = dict(load_avg_before=load, seconds_per_step=statistics.median(x["seconds_per_step"] for x in train[1:]),
                 params_per_rank=[n for _, n, _ in ranks], rss_gib_at_start=[m for _, _, m in ranks],
                 peak_rss_gib=int(re.findall(r"maxrss_kib (\d+)", log)[-1]) / 2**20, wall_s=wall)
        out[f"ep{ep}"] = r
        print(f"ep={ep}: {r['seconds_per_step'] * 1e3:6.0f} ms/step, parameters/rank "
              f"{max(r['params_per_rank']) / 1e6:.2f}M, RSS at start {max(r['rss_gib_at_start']):.2f} GiB, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB ({wall:.0f} s)", flush=True)
    a, b = out["ep2"], out["ep1"]
    out["step_ratio"] = a["seconds_per_step"] / b["seconds_per_step"]
    out["params_ratio"] = max(a["params_per_rank"]) / max(b["params_per_rank"])
    out["rss_start_ratio"] = max(a["rss_gib_at_start"]) / max(b["rss_gib_at_start"])
    out["peak_rss_ratio"] = a["peak_rss_gib"] / b["peak_rss_gib"]
    print(f"EP=2 / EP=1: step {out['step_ratio']:.2f}x, parameters/rank {out['params_ratio']:.2f}x, "
          f"RSS at start {out['rss_start_ratio']:.2f}x, peak RSS {out['peak_rss_ratio']:.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="micro batch (part 1: also the global batch)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-ffn", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-iters", type=int, default=40)
    ap.add_argument("--rows", type=int, default=4096, help="part 2: routed rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ep-width", type=int, default=256)
    ap.add_argument("--ep-moe-ffn", type=int, default=512)
    ap.add_argument("--ep-steps", type=int, default=20)
    ap.add_argument("--skip", choices=["dense", "grouped", "ep"], action="append", default=[])
    ap.add_argument("--out", default=os.path.join(here, "results", "bench_moe.json"))
    args = ap.parse_args()
    if not os.path.isfile(args.data) and not {"dense", "ep"} <= set(args.skip):
        sys.exit(f"bench_moe: {args.data} not found: pass --data (tinyshakespeare's input.txt)")
    meta = run_meta()
    old = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    res = {k: {"meta": old[k].get("meta", old.get("meta")), **old[k]} for k in ("vs_dense", "grouped_mm", "ep")
           if k in old and {"vs_dense": "dense", "grouped_mm": "grouped", "ep": "ep"}[k] in args.skip}
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as work:
        if "dense" not in args.skip:
            res["vs_dense"] = part_dense(args, work)
        if "grouped" not in args.skip:
            res["grouped_mm"] = part_grouped(args)
        if "ep" not in args.skip:
            res["ep"] = part_ep(args, work)
    write_results(args.out, res, meta=meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
