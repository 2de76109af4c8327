"""Conversion benchmark: `megatrain convert consolidate` against DeepSpeed's zero_to_fp32, and to-hf / from-hf
throughput against this disk's own sequential write rate.

    python bench/bench_convert.py [--config llama-125m] [--vocab 32000]

Makes 2-rank ZeRO-2 and ZeRO-3 checkpoints of the preset's model (fp32; one optimizer step on a small byte-level
dataset, so Adam's moments are in the files too; model.vocab_size set to a real vocabulary's). Then each command
runs in its own process, timed, with its peak RSS from wait4:
  * consolidate vs `convert_zero_checkpoint_to_fp32_state_dict(..., safe_serialization=True)` on the same checkpoint:
    wall time (target <= 1.0x) and peak RSS (target <= 0.5x);
  * to-hf and from-hf (both --no-verify: the parity check is a separate cost) in GB/s of output, against `dd`
    writing as many bytes with fdatasync in the same run (target >= 0.5x): for the whole command, and for the
    writing phase each command reports (from-hf's includes starting the target run's ranks and DeepSpeed).
Python + torch + DeepSpeed start-up is part of every command's wall time; it is measured and printed too.
Results go to bench/results/bench_convert.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatrain.training.dist_env import free_port  # noqa: E402
from results_file import write_results  # noqa: E402


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, float | None]:
    """(wall seconds, peak RSS in MiB, GB/s of the data phase the command reports) of one command, in its own
    process (its stdout and stderr go to files: a pipe left unread could stall it)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if status != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().decode()[-3000:]}")
    m = re.search(r"([\d.]+) GB[^()]* in ([\d.]+) s\)", text)  # "(0.54 GB of weights in 0.83 s)"
    return wall, usage.ru_maxrss / 1024, float(m.group(1)) / float(m.group(2)) if m else None


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def make_checkpoint(work: str, config: str, vocab: int, stage: int, env: dict) -> str:
    from megatrain.data.preprocess import preprocess

    data = os.path.join(work, "data", "bytes")
    if not os.path.exists(data + ".idx"):
        os.makedirs(os.path.dirname(data), exist_ok=True)
        src = os.path.join(work, "data", "c.jsonl")
        with open(src, "w") as f:
            for i in range(200):
                text = f"document {i} " + "the quick brown fox jumps over the lazy dog " * 20
                f.write(json.dumps({"text": text}) + "\n")
        preprocess([src], "byte", data, append_eod=True)
    ck = os.path.join(work, f"zero{stage}")
    sets = {"data.path": data, "data.tokenizer": "byte", "data.seq_len": 64, "data.split": "98,2,0",
            "model.vocab_size": vocab, "model.true_vocab_size": vocab,  # every row a token: to-hf keeps them all
            "train.max_steps": 1, "train.global_batch_size": 2, "train.micro_batch_size": 1,
            "train.warmup_steps": 0, "train.eval_interval": 0, "checkpoint.dir": ck, "checkpoint.interval": 0,
            "logging.tensorboard": False, "logging.peak_tflops": 1.0, "parallel.zero_stage": stage}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megatrain.pretrain", "--config", config] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return ck


def dd_rate(path: str, nbytes: int) -> float:
    """GB/s of `dd` writing nbytes of zeros, flushed to disk."""
    mib = max(1, nbytes // 2**20)
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rate = mib * 2**20 / (time.perf_counter() - t0) / 1e9
    os.remove(path)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-125m")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_convert.json"))
    args = ap.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    py = sys.executable
    work = tempfile.mkdtemp(prefix="bench-convert-")
    results = {"config": args.config, "vocab_size": args.vocab, "rows": []}
    try:
        startup = measure([py, "-c", "import megatrain.convert.consolidate"], env)[0]
        results["startup_s"] = startup
        print(f"start-up (python + torch + megatrain imports): {startup:.1f} s, part of every wall time below")
        print(f"{'checkpoint':<14}{'measure':<34}{'megatrain':>12}{'baseline':>14}{'ratio':>8}")
        for stage in (2, 3):
            ck = make_checkpoint(work, args.config, args.vocab, stage, env)
            size = folder_bytes(os.path.join(ck, open(os.path.join(ck, "latest")).read().strip()))
            ours_out, ds_out = os.path.join(work, f"c{stage}"), os.path.join(work, f"z{stage}")
            ours = measure([py, "-m", "megatrain.convert", "consolidate", ck, "--output", ours_out], env)
            ds = measure([py, "-c", "import sys; from deepspeed.utils.zero_to_fp32 import "
                          "convert_zero_checkpoint_to_fp32_state_dict as c; c(sys.argv[1], sys.argv[2], "
                          "safe_serialization=True)", ck, ds_out], env)
            weights = folder_bytes(ours_out)
            hf_out, back = os.path.join(work, f"hf{stage}"), os.path.join(work, f"back{stage}")
            to_hf = measure([py, "-m", "megatrain.convert", "to-hf", ck, "--output", hf_out, "--no-verify"], env)
            from_hf = measure([py, "-m", "megatrain.convert", "from-hf", hf_out, "--output", back, "--no-verify"], env)
            hf_bytes, back_bytes = folder_bytes(hf_out), folder_bytes(back)
            disk = dd_rate(os.path.join(work, "dd.bin"), hf_bytes)
            row = dict(zero_stage=stage, checkpoint_bytes=size, weights_bytes=weights,
                       consolidate_s=ours[0], zero_to_fp32_s=ds[0], consolidate_rss_mib=ours[1],
                       zero_to_fp32_rss_mib=ds[1],
                       consolidate_data_gbps=ours[2], to_hf_s=to_hf[0], to_hf_gbps=hf_bytes / to_hf[0] / 1e9,
                       to_hf_data_gbps=to_hf[2], to_hf_rss_mib=to_hf[1], from_hf_s=from_hf[0],
                       from_hf_gbps=back_bytes / from_hf[0] / 1e9, from_hf_data_gbps=from_hf[2], dd_gbps=disk)
            results["rows"].append(row)
            name = f"2-rank ZeRO-{stage}"
            print(f"{name:<14}{'consolidate wall (s)':<34}{ours[0]:>12.2f}{ds[0]:>14.2f}{ours[0] / ds[0]:>7.2f}x")
            print(f"{'':<14}{'consolidate peak RSS (MiB)':<34}{ours[1]:>12.0f}{ds[1]:>14.0f}{ours[1] / ds[1]:>7.2f}x")
            for verb in ("to_hf", "from_hf"):
                label = verb.replace("_", "-")
                print(f"{'':<14}{label + ' GB/s, whole command (vs dd)':<34}{row[verb + '_gbps']:>12.3f}{disk:>14.3f}"
                      f"{row[verb + '_gbps'] / disk:>7.2f}x")
                print(f"{'':<14}{label + ' GB/s, writing (vs dd)':<34}{row[verb + '_data_gbps']:>12.3f}{disk:>14.3f}"
                      f"{row[verb + '_data_gbps'] / disk:>7.2f}x")
            print(f"{'':<14}(checkpoint {size / 1e9:.2f} GB on disk, {weights / 1e9:.2f} GB of fp32 weights)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, results, indent=1)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
