"""Start-up benchmark: how soon a run shows its first step, warm and in a fresh HOME.

    python bench/bench_startup.py [--runs 5] [--baby-data FILE] [--baby-steps 2000] [--skip warm|fresh]

Warm: `megatrain pretrain --config tiny` (the quickstart) in a scratch folder, `--runs` times after one run that
fills the caches (the corpus and tokenizer under ~/.cache/megatrain, the CPU's measured peak): the seconds from
starting the command to its first logged step (the console line of step 1), and the split of the start-up line.
Each run is killed once that line is out.
Fresh HOME: configs/baby-gpt.yaml (nanoGPT's CPU baby GPT, `--baby-steps` iterations, on tinyshakespeare from
`--baby-data`, by default ../shared/data/tinyshakespeare.txt) twice in a row with HOME set to a new empty folder:
the first run finds nothing cached in HOME (Python's bytecode and the system's file cache are warm for both), the
second finds what the first left; both whole runs are timed and the first's share over the second's is the cost of a
first run.
Results go to bench/results/bench_startup.json.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from results_file import write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")
SPLIT = re.compile(r"start-up ([\d.]+) s: (.*)")


def first_step(cmd: list[str], cwd: str, env: dict) -> tuple[float, dict]:
    """(seconds from the start of `cmd` to its first logged step, the start-up line's split); the run is then
    killed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    split, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        m = SPLIT.match(line.strip())
        if m:
            split = {"total": float(m.group(1))}
            split.update({k: float(v) for k, v in (p.strip().rsplit(" ", 1) for p in m.group(2).split("|"))})
        if line.startswith("step ") and "loss" in line:
            seconds = time.perf_counter() - t0
            proc.kill()
            proc.wait()
            return seconds, split
    proc.wait()
    raise SystemExit(f"bench_startup: {' '.join(cmd[:4])} ... logged no step (exit {proc.returncode}):\n"
                     + "".join(lines[-20:]))


def warm(runs: int, env: dict) -> dict:
    work = tempfile.mkdtemp(prefix="bench-startup-")
    cmd = [sys.executable, "-m", "megatrain", "pretrain", "--config", "tiny", "--set", "checkpoint.dir=runs/tiny"]
    first_step(cmd, work, env)  # fills the caches; not counted
    seconds, splits = [], []
    for _ in range(runs):
        shutil.rmtree(os.path.join(work, "runs"), ignore_errors=True)
        s, split = first_step(cmd, work, env)
        seconds.append(s)
        splits.append(split)
        print(f"  tiny: first logged step after {s:.2f} s (start-up line: {split.get('total', 'none')} s)", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    median = statistics.median(seconds)
    split = splits[seconds.index(min(seconds, key=lambda x: abs(x - median)))]
    return dict(command="megatrain pretrain --config tiny", seconds_to_first_step=median, runs_s=seconds,
                startup_split=split)


def fresh(text: str, steps: int, env: dict) -> dict:
    work = tempfile.mkdtemp(prefix="bench-startup-baby-")
    home = os.path.join(work, "home")
    os.makedirs(home)
    src = os.path.join(work, "shakespeare.txt")
    shutil.copy(text, src)
    env = dict(env, HOME=home)
    subprocess.run([sys.executable, "-m", "megatrain", "preprocess", "--input", src, "--tokenizer", "byte",
                    "--output-prefix", os.path.join(work, "data", "shakespeare")], cwd=work, env=env, check=True,
                   capture_output=True)
    shutil.rmtree(home)  # the runs are the first to find HOME: preprocess's caches go with it
    os.makedirs(home)
    walls = []
    for i in range(2):
        shutil.rmtree(os.path.join(work, "runs"), ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "megatrain", "pretrain", "--config", "baby-gpt", "--set",
                        f"train.max_steps={steps}", "--set", "logging.progress_bar=off"], cwd=work, env=env,
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
        print(f"  baby GPT, {'first' if i == 0 else 'second'} run in a fresh HOME: {walls[-1]:.1f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return dict(config="baby-gpt", steps=steps, first_run_s=walls[0], second_run_s=walls[1],
                first_over_second=walls[0] / walls[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baby-data", default=TEXT)
    ap.add_argument("--baby-steps", type=int, default=2000)
    ap.add_argument("--skip", choices=("warm", "fresh"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_startup.json"))
    args = ap.parse_args()
    if args.skip != "fresh" and not os.path.exists(args.baby_data):
        raise SystemExit(f"{args.baby_data}: no such file; pass --baby-data FILE (char-rnn's tinyshakespeare "
                         f"input.txt) or --skip fresh")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1")
    out = {}
    if args.skip != "warm":
        out["warm"] = warm(args.runs, env)
        print(f"tiny quickstart, warm: first logged step {out['warm']['seconds_to_first_step']:.2f} s after the "
              f"command (median of {args.runs})", flush=True)
    if args.skip != "fresh":
        out["fresh_home"] = fresh(args.baby_data, args.baby_steps, env)
        f = out["fresh_home"]
        print(f"baby GPT in a fresh HOME: first run {f['first_run_s']:.1f} s, second {f['second_run_s']:.1f} s: "
              f"{f['first_over_second']:.2f}x", flush=True)
    write_results(args.out, out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
