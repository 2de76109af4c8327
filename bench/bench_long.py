"""Long-sequence benchmark: context parallelism's memory and time per rank, and document masking against the dense
mask.

    python bench/bench_long.py [--seqs 2048 8192 16384] [--skip cp|documents ...]

Part 1 (`cp`): one long-sequence model through the real CLI (`torchrun -m megatrain.pretrain --config tiny --set ...`),
fp32, a micro-batch (and global batch) of --batch samples, --steps steps, for each --seqs length: cp=1 on one rank
against cp=2 on two ranks (the same samples split in two), and at the longest length tp=2 x cp=2 on four. The shape
is one where the sequence decides the memory: a small model (d_model --width, --layers blocks of --heads heads, a
SwiGLU MLP of --ffn) whose activations at 16K tokens are several times its weights and optimizer states, and where
attention is most of the FLOPs. Reported per run: the peak RSS of the largest rank over the whole run
(/usr/bin/time; torch, DeepSpeed and the model's states included), the RSS after start-up (the run's rank table,
before the first step), and the median seconds per step of the steps after the first. Every process runs with
MALLOC_MMAP_THRESHOLD_=16384, so that its RSS follows its tensors rather than the heap glibc keeps. On one 2-core CPU
machine the ranks share the cores (cp=1 gets both, each cp=2 rank one) and gloo's all-to-all is shared memory: the
memory per rank is the figure that carries to a cluster, the time is this machine's.
Part 2 (`documents`): one block's forward and backward at --doc-seq tokens holding --docs equal documents
(model.Documents: one SDPA call per document) against the dense [B, 1, T, T] segment mask through the same block,
each in a fresh process (one thread): the median seconds of --repeats after a warm-up, and the growth of the
process's peak RSS over the pass (VmHWM after it, less the RSS before it); the outputs are compared.
Every run records the machine's 1-minute load average before it. `--skip PART` keeps that part's last figures, with
the run that measured them. Results go to bench/results/bench_long.json (bench/results_file.py).
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


# glibc keeps freed heap blocks below its (moving) mmap threshold, so a process's RSS can hold memory no tensor uses:
# a fixed threshold of 16 KiB maps every larger block and returns it when freed, so the RSS follows the tensors (as
# tests/plan_measure.py measures the plan's activations)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "16384"}


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", **MALLOC}


def pretrain(sets: dict, ranks: int) -> tuple[str, float]:
    """One run under torchrun with `ranks` processes; its output and wall seconds."""
    from megatrain.training.dist_env import free_port

    print(f"  load average before the run: {os.getloadavg()[0]:.2f}", flush=True)
    cmd = ["/usr/bin/time", "-f", "maxrss_kib %M", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(ranks), "--master_port", str(free_port()), "-m", "megatrain.pretrain", "--config", "tiny",
           *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{run.stdout[-3000:]}{run.stderr[-3000:]}\nbench_long: {' '.join(cmd)} failed (exit {run.returncode})")
    return run.stdout + run.stderr, time.perf_counter() - t0


def part_cp(args, work: str) -> dict:
    data = prepare_data(args.data, work, env())
    model = {"model.d_model": args.width, "model.n_layers": args.layers, "model.n_heads": args.heads,
             "model.n_kv_heads": args.heads, "model.d_ff": args.ffn, "model.dropout": 0.0}
    common = {"data.path": data, "data.tokenizer": "byte", "data.split": "1,1,0", "train.max_steps": args.steps,
              "train.micro_batch_size": args.batch, "train.global_batch_size": args.batch, "train.eval_interval": 0,
              "train.log_interval": 1, "checkpoint.interval": 0, "logging.tensorboard": "false",
              "logging.progress_bar": "off", "parallel.zero_stage": 1, "train.precision": "fp32", **model}
    out = dict(sizes=dict(d_model=args.width, layers=args.layers, heads=args.heads, d_ff=args.ffn, batch=args.batch,
                          steps=args.steps, vocab="byte (256)", zero_stage=1, precision="fp32"), runs=[])
    longest = max(args.seqs)
    layouts = [(s, dict(cp=1, tp=1)) for s in args.seqs] + [(s, dict(cp=2, tp=1)) for s in args.seqs]
    layouts.append((longest, dict(cp=2, tp=2)))
    for seq, lay in sorted(layouts, key=lambda x: (x[0], x[1]["tp"], x[1]["cp"])):
        ranks = lay["cp"] * lay["tp"]
        ckpt = os.path.join(work, f"s{seq}_cp{lay['cp']}_tp{lay['tp']}")
        load = os.getloadavg()[0]
        log, wall = pretrain({**common, "data.seq_len": seq, "model.max_seq_len": seq, "parallel.cp": lay["cp"],
                              "parallel.tp": lay["tp"], "checkpoint.dir": ckpt}, ranks)
        rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
        steps = [r["seconds_per_step"] for r in rows if "seconds_per_step" in r]
        table = sorted((int(r), float(n) * 1e6, float(m)) for r, n, m in RANK_ROW.findall(log))
        r = dict(seq_len=seq, cp=lay["cp"], tp=lay["tp"], ranks=ranks, load_avg_before=load,
                 seconds_per_step=statistics.median(steps[1:]), params_per_rank=max(n for _, n, _ in table),
                 rss_gib_at_start=max(m for _, _, m in table),
                 peak_rss_gib=int(re.findall(r"maxrss_kib (\d+)", log)[-1]) / 2**20, wall_s=wall)
        out["runs"].append(r)
        print(f"seq {seq:6d} cp {lay['cp']} tp {lay['tp']}: peak RSS {r['peak_rss_gib']:.2f} GiB per rank "
              f"(start {r['rss_gib_at_start']:.2f}), {r['seconds_per_step']:.2f} s/step ({wall:.0f} s)", flush=True)
    by = {(r["seq_len"], r["cp"], r["tp"]): r for r in out["runs"]}
    out["ratios"] = [dict(seq_len=s, peak_rss_cp2_over_cp1=by[s, 2, 1]["peak_rss_gib"] / by[s, 1, 1]["peak_rss_gib"],
                          step_cp2_over_cp1=by[s, 2, 1]["seconds_per_step"] / by[s, 1, 1]["seconds_per_step"])
                     for s in sorted(args.seqs)]
    for q in out["ratios"]:
        print(f"seq {q['seq_len']:6d}: cp=2 / cp=1 peak RSS per rank {q['peak_rss_cp2_over_cp1']:.2f}x, step "
              f"{q['step_cp2_over_cp1']:.2f}x")
    return out


def one_pass(kind: str, T: int, docs: int, width: int, heads: int, repeats: int) -> dict:
    """In a fresh process: one block's forward + backward with documents or the dense mask; seconds and RSS growth."""
    import torch

    from megatrain.config import ModelConfig
    from megatrain.model import Block, Documents, segment_mask, segment_positions
    from megatrain.training.runtime import peak_rss_bytes, proc_status_bytes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, n_layers=1, d_model=width, n_heads=heads, d_ff=width, max_seq_len=T)
    block = Block(cfg, fused=False)
    from megatrain.kernels.reference import rope_tables

    cos, sin = rope_tables(width // heads, T, cfg.rope_theta)
    segments = (torch.arange(T) // (T // docs) + 1)[None]
    rope = (cos[segment_positions(segments)], sin[segment_positions(segments)])
    mask = Documents.of(segments) if kind == "documents" else segment_mask(segments, causal=True)
    x = torch.randn(1, T, width, requires_grad=True)
    before = proc_status_bytes("VmRSS")
    times = []
    for i in range(repeats + 1):
        x.grad = None
        t0 = time.perf_counter()
        y = block(x, rope, None, 0, 0, mask)
        y.sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return dict(seconds=statistics.median(times), peak_growth_gib=(peak_rss_bytes() - before) / 2**30,
                checksum=float(y.double().sum()), grad_checksum=float(x.grad.double().sum()))


def part_documents(args) -> dict:
    out = dict(sizes=dict(seq_len=args.doc_seq, documents=args.docs, d_model=args.width, heads=args.heads,
                          d_ff=args.width, repeats=args.repeats, threads=1, precision="fp32"))
    for kind in ("documents", "dense"):
        load = os.getloadavg()[0]
        run = subprocess.run([sys.executable, __file__, "--one", kind, "--doc-seq", str(args.doc_seq), "--docs",
                              str(args.docs), "--width", str(args.width), "--heads", str(args.heads), "--repeats",
                              str(args.repeats)], env=env(), capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{run.stderr[-3000:]}\nbench_long: the {kind} pass failed")
        out[kind] = {**json.loads(run.stdout.strip().splitlines()[-1]), "load_avg_before": load}
        print(f"{kind:9s} {out[kind]['seconds']:.3f} s fwd+bwd, peak RSS growth {out[kind]['peak_growth_gib']:.3f} GiB",
              flush=True)
    a, b = out["documents"], out["dense"]
    out["time_dense_over_documents"] = b["seconds"] / a["seconds"]
    out["memory_dense_over_documents"] = b["peak_growth_gib"] / a["peak_growth_gib"]
    out["output_rel_diff"] = abs(a["checksum"] - b["checksum"]) / max(1e-12, abs(b["checksum"]))
    print(f"dense / documents: time {out['time_dense_over_documents']:.2f}x, memory "
          f"{out['memory_dense_over_documents']:.2f}x (outputs' sums differ by {out['output_rel_diff']:.1e})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--doc-seq", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["cp", "documents"])
    ap.add_argument("--one", choices=["documents", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(here, "results", "bench_long.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_pass(args.one, args.doc_seq, args.docs, args.width, args.heads, args.repeats)))
        return
    old = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    meta = run_meta()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for part, run in (("cp", lambda: part_cp(args, work)), ("documents", lambda: part_documents(args))):
            if part in args.skip:
                if part in old:
                    results[part] = old[part]
                continue
            results[part] = {**run(), "meta": meta}
    write_results(args.out, results, meta=meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
