"""Checkpoint benchmark: the training time a save costs, synchronous and in the background (checkpoint.async_save).

    python bench/bench_ckpt.py [--config llama-125m] [--steps 12] [--every 4] [--seq 128] [--precision auto]
                               [--threads N --out F]

One rank, ZeRO-1, train.precision auto (fp32 on a CPU, bf16 on a GPU), the preset's model (a 32000-row vocabulary;
the byte-level tinyshakespeare text, `--data`), micro-batch 1, trained through `megatrain.pretrain.run` for `--steps`
steps: with no saves between steps, with a synchronous save every `--every` steps, with a background save every
`--every` steps; each twice, in the order none, sync, async, async, sync, none (so a drift in the machine's speed
hits all alike), each run in a process of its own, one after the other in this run (the disk synced before each).
Timed: from the start of the first step to the end of the last (on a GPU each step's call waits for the GPU's work
before it returns), plus, with background saves, the wait for the last one in flight (where the run's final save
would wait for it; that final save is not made). The cost per save is (timed span with saves - timed span without) /
saves, each kind's span the shorter of its two runs (the one the machine's other load disturbed least), and the ratio
async / sync (the target: <= 0.20). Also recorded: the seconds inside each save call (what a synchronous save stalls;
for a background one the host copy, and any wait for the previous save) and how long each background write took in
its thread. A synchronous save does not fsync its files; a background save fsyncs each, off the training thread.
`--threads 1` trains on one core and leaves the others to the writer (as a GPU node's host cores are); its results go
to bench/results/bench_ckpt_1thread.json.
Results go to bench/results/bench_ckpt.json (bench/results_file.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from shakespeare_data import prepare_data  # noqa: E402
from results_file import write_results  # noqa: E402


class Clock:
    """Wraps the training loop's step, the save and the wait for a background save, recording when they ran."""

    def __init__(self):
        from megatrain.checkpoint import async_save, io
        from megatrain.training import loop

        self.steps, self.saves, self.waits, self.writes = [], [], [], []
        self.last_step = None
        self._patch(loop, "train_step", self.steps)
        plain_save = io.save

        def save(engine, cfg, resolved, step, *args, **kwargs):
            if step == self.last_step:  # the run's final save: not timed, so not made (only the wait before it)
                async_save.wait(engine, "the end of the run")
                return io.tag_for(step)
            return plain_save(engine, cfg, resolved, step, *args, **kwargs)

        io.save = save
        self._patch(io, "save", self.saves)
        self._patch(async_save, "wait", self.waits)
        plain_run = async_save.Pending.run
        writes = self.writes

        def timed_run(pending):
            t0 = time.perf_counter()
            plain_run(pending)
            writes.append(time.perf_counter() - t0)

        async_save.Pending.run = timed_run

    @staticmethod
    def _patch(module, name: str, into: list) -> None:
        plain = getattr(module, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return plain(*args, **kwargs)
            finally:
                if torch.cuda.is_available():  # the GPU's queued work belongs to the call that queued it
                    torch.cuda.synchronize()
                into.append((t0, time.perf_counter()))

        setattr(module, name, timed)

    def reset(self) -> None:
        for x in (self.steps, self.saves, self.waits, self.writes):
            x.clear()

    def span(self) -> float:
        """First step's start to the last step's end, plus the first wait after it (the final save's wait for the
        save in flight: with background saves, part of the training time the saves cost)."""
        start, end = self.steps[0][0], self.steps[-1][1]
        after = [b - a for a, b in self.waits if a >= end]
        return end - start + (after[0] if after else 0.0)


def one_run(prefix: str, args, work: str, interval: int, background: bool, clock: Clock) -> dict:
    from megatrain.config import load_config
    from megatrain.pretrain import run
    from megatrain.training.engine import resolve_precision

    ck = os.path.join(work, f"ck-{interval}-{int(background)}")
    sets = {"data.path": prefix, "data.tokenizer": "byte", "data.seq_len": args.seq, "model.vocab_size": args.vocab,
            "train.max_steps": args.steps, "train.global_batch_size": 1, "train.micro_batch_size": 1,
            "train.warmup_steps": 1, "train.log_interval": args.steps, "train.eval_interval": 0,
            "checkpoint.dir": ck, "checkpoint.interval": interval, "checkpoint.keep_last": 2,
            "checkpoint.async_save": background, "logging.tensorboard": False, "logging.peak_tflops": 1.0,
            "logging.progress_bar": "off", "train.precision": args.precision}
    clock.reset()
    clock.last_step = args.steps
    cfg = load_config(args.config, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()])
    run(cfg)
    span = clock.span()
    end = clock.steps[-1][1]
    between = [b - a for a, b in clock.saves if a < end]  # the saves between steps (not the final one)
    latest = os.path.join(ck, "latest")
    tag = open(latest).read() if os.path.isfile(latest) else None
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ck, tag)) for f in fs) if tag else 0
    out = dict(span_s=span, saves=len(between), save_call_s=between, checkpoint_bytes=size,
               steps_s=[b - a for a, b in clock.steps], precision=resolve_precision(cfg))
    if background:
        out["background_write_s"] = list(clock.writes[:len(between)])
        out["waits_s"] = [b - a for a, b in clock.waits if b - a > 1e-3]
    shutil.rmtree(ck, ignore_errors=True)
    return out


ORDER = ("none", "sync", "async", "async", "sync", "none")  # twice, mirrored: a drift in the machine's speed hits all alike


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-125m")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--precision", default="auto",
                    help="train.precision: auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16")
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--threads", type=int, default=0,
                    help="training's torch threads (OMP_NUM_THREADS), e.g. 1 to leave a core to the writer as a GPU "
                         "node's host has; 0: torch's default, every core")
    ap.add_argument("--out", default=os.path.join(here, "results", "bench_ckpt.json"))
    ap.add_argument("--one", nargs=2, metavar=("KIND", "DATA"), help=argparse.SUPPRESS)  # (a run in a child process)
    ap.add_argument("--rederive", metavar="RESULTS",
                    help="work the figures out again from the runs recorded in a results file (rewritten in place)")
    args = ap.parse_args()
    if args.rederive:
        with open(args.rederive) as f:
            old = json.load(f)
        a = {k: old[k] for k in ("config", "seq", "steps", "every")}
        a.update(vocab=old["vocab_size"], threads=old.get("threads") or old["meta"]["machine"]["cores"])
        results = summarize(old["runs"], a, device=old.get("device", "cpu"))
        results["wall_s"] = old["wall_s"]
        report(results)
        write_results(args.rederive, results, meta=old["meta"], indent=1)
        return
    if args.one:
        kind, prefix = args.one
        work = tempfile.mkdtemp(prefix="bench-ckpt-run-")
        try:
            out = one_run(prefix, args, work, 0 if kind == "none" else args.every, kind == "async", Clock())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print("RESULT " + json.dumps(out), flush=True)
        return
    work = tempfile.mkdtemp(prefix="bench-ckpt-")
    t0 = time.perf_counter()
    runs: dict[str, list] = {"none": [], "sync": [], "async": []}
    try:
        prefix = prepare_data(args.data, work)
        for kind in ORDER:  # each in its own process (nothing left over from the run before)
            print(f"run: {kind}", flush=True)
            os.sync()  # the run before's files on disk: its writeback does not slow this one
            child = subprocess.run([sys.executable, __file__, "--one", kind, prefix, "--config", args.config,
                                    "--vocab", str(args.vocab), "--steps", str(args.steps), "--every", str(args.every),
                                    "--seq", str(args.seq), "--precision", args.precision],
                                   capture_output=True, text=True,
                                   env=dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})))
            line = next((x for x in child.stdout.splitlines() if x.startswith("RESULT ")), None)
            if child.returncode != 0 or line is None:
                sys.exit(f"{child.stdout[-2000:]}{child.stderr[-3000:]}\nbench_ckpt: the {kind} run failed")
            runs[kind].append(json.loads(line[len("RESULT "):]))
            print(f"  {runs[kind][-1]['span_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = summarize(runs, vars(args), device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    results["wall_s"] = time.perf_counter() - t0
    report(results)
    write_results(args.out, results, indent=1)
    print(f"results: {args.out} ({results['wall_s']:.0f} s)")


def around_saves(run: dict, every: int) -> list[float]:
    """Per save between the steps: the seconds inside its call, plus the every // 2 steps after it, minus the
    every // 2 steps before it; for a run without saves, the same windows without a call (what the measure reads
    when nothing happens: its noise). Each save is measured against the run's own pace around it, so a run that is
    slower throughout (on a shared host, by up to 15%) does not count as a save's cost."""
    steps, half = run["steps_s"], every // 2
    ends = range(every, len(steps), every)  # the saves come after these many steps
    calls = run["save_call_s"] or [0.0] * len(ends)
    return [c + sum(steps[k:k + half]) - sum(steps[k - half:k]) for c, k in zip(calls, ends)]


def summarize(runs: dict[str, list], a: dict, device: str) -> dict:
    """The figures from the six runs. `a`: the command's arguments (config, vocab, seq, steps, every, threads)."""
    span = {k: min(r["span_s"] for r in v) for k, v in runs.items()}  # (the least disturbed by the machine's load)
    saves = runs["sync"][0]["saves"]
    per = {k: (span[k] - span["none"]) / saves for k in ("sync", "async")}
    calls = {k: statistics.median(c for r in runs[k] for c in r["save_call_s"]) for k in ("sync", "async")}
    around = {k: [x for r in v for x in around_saves(r, a["every"])] for k, v in runs.items()}
    near = {k: statistics.mean(around[k]) - statistics.mean(around["none"]) for k in ("sync", "async")}
    write = statistics.median(w for r in runs["async"] for w in r["background_write_s"])
    step = statistics.median(t for r in runs["none"] for t in r["steps_s"][1:])
    return dict(config=a["config"], vocab_size=a["vocab"], seq=a["seq"], micro_batch=1, steps=a["steps"],
                threads=a["threads"] or os.cpu_count(), precision=runs["none"][0].get("precision", "fp32"),
                device=device, every=a["every"], saves=saves,
                checkpoint_bytes=max(r["checkpoint_bytes"] for r in runs["sync"]), median_step_s=step,
                span_s=span, sync_s_per_save=per["sync"], async_s_per_save=per["async"],
                ratio=per["async"] / per["sync"], sync_save_call_s=calls["sync"], async_save_call_s=calls["async"],
                async_background_write_s=write,
                # around each save (around_saves), the mean over both runs' saves less the runs without saves';
                # it reads a background save whole only when its write ends within the window after it
                around_save_s=around, around_window_steps=a["every"] // 2,
                around_covers_write=write < (a["every"] // 2) * step,
                sync_s_per_save_around=near["sync"], async_s_per_save_around=near["async"],
                ratio_around=near["async"] / near["sync"], order=list(ORDER), runs=runs)


def report(results: dict) -> None:
    r, span = results, results["span_s"]
    print(f"\n{r['config']} (vocab {r['vocab_size']}), seq {r['seq']}, 1 rank, {r['precision']} on "
          f"{r['device']}: {r['checkpoint_bytes'] / 1e9:.2f} GB a checkpoint, {r['median_step_s']:.3f} s a step")
    for k in ("none", "sync", "async"):
        each = ", ".join(f"{x['span_s']:.2f}" for x in r["runs"][k])
        print(f"  {k:6s} {span[k]:7.2f} s for {r['steps']} steps (the shorter of {each}), "
              f"{0 if k == 'none' else r['saves']} saves between them")
    print(f"  training time lost per save: sync {r['sync_s_per_save']:.2f} s, async {r['async_s_per_save']:.2f} s; "
          f"async / sync {r['ratio']:.2f} (target <= 0.20)")
    print(f"  around each save ({r['around_window_steps']} steps before and after): sync "
          f"{r['sync_s_per_save_around']:.2f} s, async {r['async_s_per_save_around']:.2f} s; async / sync "
          f"{r['ratio_around']:.2f}" + ("" if r["around_covers_write"] else
                                        " (a background write outlasts the window: not the whole cost)"))
    print(f"  inside a save call (median): sync {r['sync_save_call_s']:.2f} s, async {r['async_save_call_s']:.2f} s; "
          f"a background write {r['async_background_write_s']:.2f} s")


if __name__ == "__main__":
    main()
