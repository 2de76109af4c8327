"""Parallel-layout benchmark: per-rank model-state memory against ZeRO theory, and step time per layout.

    python bench/bench_parallel.py

Each layout runs as its own `torchrun --nproc_per_node 2` job on a Llama-shaped model (fp32, torch
AdamW). After a few steps every rank counts the bytes of every live tensor (parameters, gradients,
optimizer states, DeepSpeed's flat buffers; each storage once) and the median step time. Printed side by
side in one run:
  * TP=1/TP=2 and ZeRO-1/2/3 at DP=2: measured model states per rank vs theory. With fp32 weights, grads
    and two Adam moments a parameter costs 16 bytes (16 Psi in all); ZeRO-1 shards the 8 Psi of Adam
    states, ZeRO-2 the gradients too, ZeRO-3 everything: 16 Psi / N (target: measured <= 1.1x theory).
    Measured after an optimizer step, so gradients ZeRO has already released are not counted;
  * step time of each layout relative to TP=1 (pure data parallel).
Results go to bench/results/bench_parallel.json.

    python bench/bench_parallel.py --startup [--presets llama-350m,llama-1.3b]

Start-up memory instead (issue 13 point 3): for each preset under TP=2 and under DP=2 ZeRO-3, each way of building the
model (`meta`: shapes on the meta device, each rank filled with only its share; `whole`: every rank builds the whole
model, then slices it, as before), the peak resident memory (VmHWM) of each rank above its RSS before the model,
after the model is built and cut, after deepspeed.initialize, and (llama-350m) after one optimizer step, against the
rank's share of the fp32 parameters (target: start-up peak <= 1.2x the share + a fixed base). Results go to
bench/results/bench_parallel_startup.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatrain.training.dist_env import free_port  # noqa: E402
from results_file import run_meta, write_results  # noqa: E402

LAYOUTS = [  # name, overrides
    ("dp2 ZeRO-1", {"parallel.zero_stage": 1}),
    ("dp2 ZeRO-2", {"parallel.zero_stage": 2}),
    ("dp2 ZeRO-3", {"parallel.zero_stage": 3}),
    ("tp2 ZeRO-1", {"parallel.tp": 2, "parallel.zero_stage": 1}),
    ("tp2 +SP ZeRO-1", {"parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.zero_stage": 1}),
    ("pp2 ZeRO-1", {"parallel.pp": 2, "parallel.zero_stage": 1}),
]
ZERO3_BUCKET = 50_000_000  # ds_configs/zero3.json's reduce_bucket_size
ONLY = os.environ.get("BENCH_ONLY")  # e.g. "pp2" to rerun one layout


def theory_bytes(psi: int, stage: int, n: int, tp: int, pp: int) -> float:
    """Model-state bytes per rank: params 4, grads 4, Adam 8 bytes per parameter of this rank's slice."""
    local = psi / (tp * pp)
    dp = n // (tp * pp)
    if stage == 0:
        return 16 * local
    if stage == 1:
        return 8 * local + 8 * local / dp
    if stage == 2:
        return 4 * local + 12 * local / dp
    return 16 * local / dp


def live_tensor_bytes() -> int:
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                ts = [obj]
                if isinstance(obj, torch.nn.Parameter) and hasattr(obj, "ds_tensor"):
                    ts.append(obj.ds_tensor)
                for t in ts:
                    st = t.untyped_storage()
                    if st.data_ptr() and st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        total += st.nbytes()
        except Exception:
            continue
    return total


def worker(args) -> None:
    """One rank of one layout (under torchrun)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.model import Transformer
    from megatrain.parallel.parallelize import parallelize
    from megatrain.parallel.topology import build_grid, check_layout
    from megatrain.training.dist_env import init_distributed
    from megatrain.training.engine import build_engine
    from megatrain.training.loop import is_pipeline

    sets = json.loads(args.sets)
    cfg = load_config("tiny", [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    layout = check_layout(cfg, int(os.environ["WORLD_SIZE"]))
    init_distributed()
    grid = build_grid(layout)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    psi = model.num_params()
    module = parallelize(model, cfg, layout, grid)
    del model
    engine, *_ = build_engine(cfg, module, dist.get_world_size(), mpu=None if layout.pp > 1 else grid)
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(1)
    times = []
    ga = cfg.train.global_batch_size // (B * layout.dp)
    for step in range(args.steps):
        batches = [(torch.randint(0, cfg.model.vocab_size, (B, T), generator=g),) * 2 for _ in range(ga)]
        dist.barrier()
        t0 = time.perf_counter()
        if is_pipeline(engine):
            engine.train_batch(iter(batches))
        else:
            for x, y in batches:
                engine.backward(engine(x, y))
                engine.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    gc.collect()
    mem = live_tensor_bytes()
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mem)
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(dict(psi=psi, bytes_per_rank=rows, step_s=float(np.median(times[1:]))), f)


STARTUP_LAYOUTS = [("tp2 ZeRO-1", {"parallel.tp": 2, "parallel.zero_stage": 1}),
                   ("dp2 ZeRO-3", {"parallel.zero_stage": 3})]


def proc_status_mib(key: str) -> float:
    from megatrain.training.runtime import proc_status_bytes

    return (proc_status_bytes(key) or float("nan")) / 2**20


def startup_worker(args) -> None:
    """One rank: the peak RSS above the start of each phase of starting a run (under torchrun)."""
    import torch
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.model import Transformer
    from megatrain.parallel.parallelize import build_on_meta, parallelize
    from megatrain.parallel.topology import build_grid, check_layout
    from megatrain.parameters import numel
    from megatrain.training.dist_env import init_distributed
    from megatrain.training.engine import build_engine, deepspeed_config

    sets = json.loads(args.sets)
    way = sets.pop("way")
    preset = sets.pop("preset")
    cfg = load_config(preset, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    layout = check_layout(cfg, int(os.environ["WORLD_SIZE"]))
    init_distributed()
    grid = build_grid(layout)
    base = proc_status_mib("VmRSS")
    if way == "whole":
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model)
    else:
        model = build_on_meta(cfg.model)
    module = parallelize(model, cfg, layout, grid, ds_config=deepspeed_config(cfg, layout.world_size))
    share = sum(numel(p) * 4 for p in module.parameters()) / 2**20  # fp32, full sizes (ZeRO-3 may have partitioned)
    if layout.tp == 1:
        share /= layout.dp  # ZeRO-3: the rank's partition
    row = dict(share_mib=share, built_mib=proc_status_mib("VmHWM") - base)
    del model
    engine, *_ = build_engine(cfg, module, dist.get_world_size(), mpu=grid)
    row["initialized_mib"] = proc_status_mib("VmHWM") - base
    if args.steps:
        x = torch.randint(0, cfg.model.vocab_size, (1, 128))
        engine.backward(engine(x, x))
        engine.step()
        row["stepped_mib"] = proc_status_mib("VmHWM") - base
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(rows, f)


def startup(args, env: dict) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for preset in args.presets.split(","):
            steps = 1 if preset == "llama-350m" else 0  # llama-1.3b's Adam states do not fit 2 ranks in 24 GiB
            for name, over in STARTUP_LAYOUTS:
                if ONLY and ONLY not in name:
                    continue
                for way in args.ways.split(","):
                    out = os.path.join(scratch, f"{len(results)}.json")
                    sets = {"preset": preset, "way": way, "data.seq_len": 128, "train.micro_batch_size": 1,
                            "train.global_batch_size": 2 if "dp2" in name else 1, "model.vocab_size": 32000, **over}
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), __file__, "--worker", "--startup", "--sets", json.dumps(sets), "--result",
                           out, "--steps", str(steps)]
                    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if run.returncode != 0:  # e.g. the OOM killer: a row that says so, and on to the next
                        killed = "SIGKILL" in run.stdout + run.stderr
                        results[f"{preset} | {name} | {way}"] = dict(failed=run.returncode, killed=killed)
                        print(f"{preset:11s} {name:11s} {way:6s} did not start (exit {run.returncode}"
                              f"{', a rank was SIGKILLed: out of memory?' if killed else ''}); its last output:\n"
                              f"{(run.stdout + run.stderr)[-1500:]}", flush=True)
                        continue
                    rows = json.load(open(out))
                    results[f"{preset} | {name} | {way}"] = rows
                    r = max(rows, key=lambda r: r["built_mib"])
                    print(f"{preset:11s} {name:11s} {way:6s} share {r['share_mib']:8.0f} MiB | built {r['built_mib']:8.0f} "
                          f"MiB ({r['built_mib'] / r['share_mib']:.2f}x share) | initialized {r['initialized_mib']:8.0f} MiB"
                          + (f" | after a step {r['stepped_mib']:8.0f} MiB" if "stepped_mib" in r else ""), flush=True)
    out = args.out.replace(".json", "_startup.json")
    write_results(out, results, meta=run_meta(env=("BENCH_ONLY",)))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sets", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_parallel.json"))
    ap.add_argument("--startup", action="store_true", help="start-up memory per rank, meta vs whole builds")
    ap.add_argument("--presets", default="llama-350m,llama-1.3b", help="with --startup: the presets to build")
    ap.add_argument("--ways", default="whole,meta", help="with --startup: the ways to build (whole, meta)")
    args = ap.parse_args()
    if args.worker:
        from megatrain.training.dist_env import end_distributed

        (startup_worker if args.startup else worker)(args)
        end_distributed()  # else a rank that finished can die of SIGABRT in the teardown, and the layout reads failed
        return
    base = {"model.n_layers": args.layers, "model.d_model": args.width, "model.n_heads": 8, "model.n_kv_heads": 8,
            "model.vocab_size": 8192, "model.max_seq_len": 256, "data.seq_len": 256, "train.micro_batch_size": 4,
            "train.global_batch_size": 16}
    results = {}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if args.startup:
        return startup(args, env)
    with tempfile.TemporaryDirectory() as scratch:  # the ranks' result files
        for name, over in LAYOUTS:
            if ONLY and ONLY not in name and name != "dp2 ZeRO-1":
                continue
            out = os.path.join(scratch, f"{len(results)}.json")  # one per layout: none is read stale
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                   __file__, "--worker", "--sets", json.dumps({**base, **over}), "--result", out, "--steps", str(args.steps)]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{run.stdout[-3000:]}{run.stderr[-3000:]}\nbench_parallel: layout {name!r} failed "
                         f"(exit {run.returncode}); its ranks' last output is above")
            r = json.load(open(out))
            tp, pp = over.get("parallel.tp", 1), over.get("parallel.pp", 1)
            r["theory_bytes"] = theory_bytes(r["psi"], over["parallel.zero_stage"], 2, tp, pp)
            r["ratio_to_theory"] = max(r["bytes_per_rank"]) / r["theory_bytes"]
            # ZeRO-3 keeps its reduce bucket for the whole run: reduce_bucket_size fp32 elements, capped at the rank's
            # parameters (training/engine.deepspeed_config); ZeRO-1/2 release theirs after the step
            r["bucket_bytes"] = 4 * min(ZERO3_BUCKET, r["psi"]) if over["parallel.zero_stage"] == 3 else 0
            r["ratio_to_theory_and_bucket"] = max(r["bytes_per_rank"]) / (r["theory_bytes"] + r["bucket_bytes"])
            results[name] = r
            print(f"{name:16s} done", flush=True)
    t_ref = results["dp2 ZeRO-1"]["step_s"]
    psi = results["dp2 ZeRO-1"]["psi"]
    print(f"\n{args.layers} layers x width {args.width} ({psi / 1e6:.1f}M parameters, 16 Psi = {16 * psi / 2**20:.0f} MiB), "
          f"2 ranks, fp32, micro batch 4 x seq 256, global batch 16")
    print(f"{'layout':16s} {'model states/rank':>18s} {'theory':>10s} {'ratio':>6s} {'+ bucket':>10s} {'ratio':>6s} "
          f"{'step':>8s} {'vs TP=1':>8s}")
    for name, r in results.items():
        print(f"{name:16s} {max(r['bytes_per_rank']) / 2**20:>14.1f} MiB {r['theory_bytes'] / 2**20:>6.1f} MiB "
              f"{r['ratio_to_theory']:>5.2f}x {(r['theory_bytes'] + r['bucket_bytes']) / 2**20:>6.1f} MiB "
              f"{r['ratio_to_theory_and_bucket']:>5.2f}x {r['step_s'] * 1e3:>6.0f}ms {t_ref / r['step_s']:>7.2f}x")
    write_results(args.out, results, meta=run_meta(env=("BENCH_ONLY",)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
