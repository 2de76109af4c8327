"""Long runs don't leak: a soak of the tiny model (issue 12 promise 12). Not a test: it runs for a long time.

    python bench/bench_soak.py [--steps 20000] [--interval 500] [--keep-last 3] [--out bench/results/soak.json]

One `megatrain pretrain --config tiny` process (the built-in corpus; micro-batches of 4 x 64 tokens so that 20,000
steps take about half an hour on 2 CPU cores), checkpointing every --interval steps and keeping the last --keep-last,
evaluating every 1,000. A monitor samples the process every few seconds: its resident memory (VmRSS), its open file
descriptors, and the disk the checkpoint directory takes, against the step metrics.jsonl has reached. It prints and
writes: RSS at step 1,000 and at the end (growth in %), the file descriptors' range after start-up, and the disk use
once keep_last checkpoints exist against its largest value after that.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatrain.training.runtime import proc_status_bytes  # noqa: E402
from results_file import write_results  # noqa: E402


def rss_mib(pid: int) -> float:
    return (proc_status_bytes("VmRSS", pid) or float("nan")) / 2**20


def disk_mib(folder: str) -> float:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # a checkpoint pruned while we walk
                pass
    return total / 2**20


def last_step(metrics: str) -> int:
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, os.path.getsize(metrics) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def summarize(a, samples: list, run_dir: str, seconds: float, complete: bool) -> dict | None:
    """The figures from the samples so far (after step 1,000), written to a.out; None before step 1,000."""
    after = [s for s in samples if s["step"] >= 1000]
    if not after:
        return None
    first, last = after[0], after[-1]
    settled = [s for s in samples if s["step"] >= a.interval * (a.keep_last + 1)]
    result = dict(
        complete=complete, steps=a.steps, seconds=round(seconds), interval=a.interval, keep_last=a.keep_last,
        rss_mib_at_step=[first["step"], first["rss_mib"]], rss_mib_at_end=[last["step"], last["rss_mib"]],
        rss_growth_pct=round(100 * (last["rss_mib"] / first["rss_mib"] - 1), 2),
        rss_max_mib=max(s["rss_mib"] for s in after),
        fds_after_start=[min(s["fds"] for s in after), max(s["fds"] for s in after)],
        disk_mib_once_keep_last_reached=settled[0]["disk_mib"] if settled else None,
        disk_mib_max_after=max(s["disk_mib"] for s in settled) if settled else None,
        checkpoints_left=sorted(d for d in os.listdir(run_dir) if d.startswith("step")),
        samples=samples,
    )
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    write_results(a.out, result, indent=1)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--interval", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--out", default="bench/results/soak.json")
    a = p.parse_args()
    run_dir = tempfile.mkdtemp(prefix="megatrain-soak-")
    sets = {"train.max_steps": a.steps, "train.global_batch_size": 4, "train.micro_batch_size": 4, "data.seq_len": 64,
            "train.warmup_steps": 100, "train.eval_interval": 1000, "train.eval_iters": 4, "train.log_interval": 100,
            "checkpoint.interval": a.interval, "checkpoint.keep_last": a.keep_last, "checkpoint.dir": run_dir,
            "logging.tensorboard": "true", "logging.progress_bar": "off"}
    cmd = [sys.executable, "-m", "megatrain.cli", "pretrain", "--config", "tiny"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    log = open(os.path.join(run_dir, "soak.log"), "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    samples: list[dict] = []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    written = time.time()
    while proc.poll() is None:
        try:
            samples.append(dict(t=round(time.time() - t0, 1), step=last_step(metrics), rss_mib=round(rss_mib(proc.pid), 1),
                                fds=len(os.listdir(f"/proc/{proc.pid}/fd")), disk_mib=round(disk_mib(run_dir), 1)))
        except (OSError, ValueError):  # the process ended between poll() and the read
            pass
        if time.time() - written > 60:  # a run cut short still leaves its figures so far
            summarize(a, samples, run_dir, time.time() - t0, complete=False)
            written = time.time()
        time.sleep(a.sample_seconds)
    if proc.returncode != 0:
        print(f"bench_soak: the run failed (exit {proc.returncode}); see {run_dir}/soak.log", file=sys.stderr)
        return 1
    result = summarize(a, samples, run_dir, time.time() - t0, complete=True)
    if result is None:
        print("bench_soak: no sample after step 1,000; run more steps", file=sys.stderr)
        return 1
    first, last = result["rss_mib_at_step"], result["rss_mib_at_end"]
    print(f"soak: {a.steps:,} steps in {result['seconds']:,} s | RSS {first[1]:.1f} MiB at step {first[0]:,} "
          f"-> {last[1]:.1f} MiB at step {last[0]:,} ({result['rss_growth_pct']:+.2f}%, max "
          f"{result['rss_max_mib']:.1f}) | open fds {result['fds_after_start'][0]}-{result['fds_after_start'][1]} | "
          f"disk {result['disk_mib_once_keep_last_reached']} MiB once {a.keep_last} checkpoints exist, at most "
          f"{result['disk_mib_max_after']} MiB after | checkpoints left {result['checkpoints_left']} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
