"""Training-speed benchmark: megatrain vs. Hugging Face Llama through DeepSpeed, and baby GPT.

    python bench/bench_train.py [--nanogpt DIR] [--baby-set KEY=VALUE ...] [--baby-data FILE] [--skip part1|part2]

Part 1 (one process, fp32, ZeRO-0, the same Llama-shaped dims, batch and sequence length): megatrain's
training tokens/s next to `transformers.LlamaForCausalLM` trained through DeepSpeed in the same run, and the
model FLOP/s of each (embeddings excluded) next to this machine's best fp32 matmul FLOP/s (torch.mm's, or the oneDNN
product megatrain's linear layers run through on a CPU, cpu_linear.py, whichever is faster), measured in the same
run. ZeRO-0
is what megatrain runs on one data-parallel rank in fp32 (training/engine.effective_zero_stage): ZeRO-1 there has
nothing to partition and only copies every gradient into DeepSpeed's flat buffers. Both engines skip DeepSpeed's
gradient all-reduce, which on one rank only flattens and copies the gradients, as megatrain's build_engine does.
Part 2: nanoGPT's CPU "baby GPT" (configs/baby-gpt.yaml: char/byte level on tinyshakespeare, 4 layers,
4 heads, width 128, block 64, batch 12, 2000 iterations, lr 1e-3, no dropout, evaluation over 20 batches every
250): validation loss after 2000 iterations, ms per iteration and wall time. With `--nanogpt DIR` (a checkout of
karpathy/nanoGPT, copied to a scratch folder) nanoGPT's own train.py runs the same setting on the same text, 90/10
split (`--device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`), one after the other in this run, and the
ratios are printed; without it there is no baseline: megatrain's figures are printed alone, with no ratio.
After each training run its final model is evaluated again over 200 batches, nanoGPT's default eval_iters
(outside the timed runs), so the validation loss is compared at 20 and at 200 batches.
`--baby-set KEY=VALUE` (repeatable) adds a megatrain override.
Results go to bench/results/bench_train.json (bench/results_file.py: with the command, commit, date and machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megatrain import cpu_linear  # noqa: E402
from megatrain.config import ModelConfig, ffn_width  # noqa: E402
from megatrain.flops import train_flops_per_token  # noqa: E402
from megatrain.training.throughput import measured_matmul_tflops  # noqa: E402
from megatrain.training.profiling import split_line  # noqa: E402
from results_file import run_meta, write_results  # noqa: E402

EVAL_DURING_RUN = 20  # validation batches of each evaluation during the timed runs (both sides)
EVAL_AFTER_RUN = 200  # validation batches of the evaluation after each run: nanoGPT's default eval_iters


def ds_config(micro: int) -> dict:
    return {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def time_engine(model, step_fn, micro: int, steps: int, warmup: int = 2, breakdown: dict | None = None) -> float:
    """Seconds per optimizer step of `model` trained through deepspeed.initialize (ZeRO-0, torch's fused AdamW); with
    `breakdown`, also fills it with op_breakdown's split of a step (profiled after the timed steps)."""
    import deepspeed

    # fused, as megatrain's own engine builds it (training/engine.build_engine); HF gets the same optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(micro))
    # one rank has no replica to average with: no flatten/all-reduce/copy of the gradients (as megatrain's build_engine)
    engine.enable_backward_allreduce = False
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_fn(engine)
        engine.backward(loss)
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if breakdown is not None:
        breakdown.update(op_breakdown(engine, step_fn))
    times.sort()
    return times[len(times) // 2]  # median


def op_breakdown(engine, step_fn, steps: int = 2) -> dict:
    """Where one training step's time goes, by torch's profiler (self CPU time of each op): the matmuls, the attention
    kernel, and the rest with its five biggest ops (megatrain's logging.profile_step split)."""
    from torch.profiler import ProfilerActivity, profile

    from megatrain.training.profiling import op_split

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.backward(step_fn(engine))
            engine.step()
    return op_split(prof)


def part1(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatrain.model import Transformer
    from megatrain.training.dist_env import init_distributed

    if not torch.distributed.is_initialized():  # part2's step profile may have started it
        init_distributed()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, n_layers=args.layers, n_heads=args.heads, d_model=args.width,
                      max_seq_len=args.seq, norm="rmsnorm", position="rope", mlp="swiglu", bias=False)
    B, T = args.micro, args.seq
    tokens = torch.randint(0, args.vocab, (B, T + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    ours = Transformer(cfg)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=ffn_width(cfg),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=args.seq, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    n_ours, n_hf = ours.num_params(), sum(p.numel() for p in hf.parameters())
    mm = measured_matmul_tflops(n=1024, trials=3, repeat=10, product=torch.mm)
    best = max(mm, measured_matmul_tflops(n=1024, trials=3, repeat=10))  # (the linear layers' product: oneDNN here)
    results = {}
    # interleave the two models so drift in this machine's speed hits both alike
    split = {"megatrain": {}, "hf": {}}  # profiled in the last round, after its timed steps
    for rnd in range(args.rounds):
        last = rnd == args.rounds - 1
        t_ours = time_engine(ours, lambda e: e(x, y), B, args.steps, breakdown=split["megatrain"] if last else None)
        t_hf = time_engine(hf, lambda e: e(input_ids=x, labels=x).loss, B, args.steps,
                           breakdown=split["hf"] if last else None)
        results.setdefault("ours", []).append(t_ours)
        results.setdefault("hf", []).append(t_hf)
        print(f"round {rnd + 1}: megatrain {t_ours * 1e3:.0f} ms/step, HF Llama {t_hf * 1e3:.0f} ms/step", flush=True)
    t_ours, t_hf = min(results["ours"]), min(results["hf"])
    tok = B * T
    model_flops = train_flops_per_token(cfg, T)  # every matmul incl. the LM head; embedding lookups are not FLOPs
    ours_tflops = tok * model_flops / t_ours / 1e12
    hf_tflops = tok * model_flops / t_hf / 1e12
    out = dict(dims=dict(layers=args.layers, width=args.width, heads=args.heads, ffn=ffn_width(cfg), vocab=args.vocab,
                         seq=T, micro_batch=B), params_megatrain=n_ours, params_hf=n_hf,
               megatrain_tokens_per_s=tok / t_ours, hf_tokens_per_s=tok / t_hf, speedup_vs_hf=t_hf / t_ours,
               torch_mm_tflops=mm, best_matmul_tflops=best, best_matmul=cpu_linear.BACKEND if best > mm else "torch.mm",
               megatrain_tflops=ours_tflops, hf_tflops=hf_tflops,
               megatrain_fraction_of_best=ours_tflops / best, hf_fraction_of_best=hf_tflops / best,
               step_time_split=split)
    print(f"\nLlama-shaped {args.layers}x{args.width}, seq {T}, batch {B}, fp32, ZeRO-0, 1 process "
          f"({n_ours / 1e6:.1f}M params):")
    print(f"  megatrain          {tok / t_ours:>9,.0f} tokens/s   {ours_tflops * 1e3:6.1f} GFLOP/s  "
          f"{ours_tflops / best:5.1%} of the best fp32 matmul")
    print(f"  HF LlamaForCausalLM{tok / t_hf:>9,.0f} tokens/s   {hf_tflops * 1e3:6.1f} GFLOP/s  "
          f"{hf_tflops / best:5.1%} of it")
    print(f"  speed-up vs HF: {t_hf / t_ours:.2f}x; fp32 matmul: torch.mm {mm * 1e3:.1f} GFLOP/s, the best "
          f"({out['best_matmul']}) {best * 1e3:.1f} GFLOP/s")
    for who, sp in split.items():  # the bound: a step can go no faster than its matmuls at the best rate
        print(f"  {who:9s} step time: {split_line(sp)}")
    return out


def run_nanogpt(checkout: str, text_file: str, iters: int) -> dict:
    """nanoGPT's baby GPT from a copy of its checkout, on this text (its prepare.py splits 90/10)."""
    import re
    import shutil
    import statistics

    work = tempfile.mkdtemp(prefix="nanogpt-")
    shutil.copytree(checkout, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "out*"))
    data = os.path.join(work, "data", "shakespeare_char")
    shutil.copy(text_file, os.path.join(data, "input.txt"))
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    # the config's eval_interval (250), or every `iters` in a shorter run: the last iteration is always evaluated
    args = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", "--dropout=0.0", f"--out_dir={work}/out", f"--eval_interval={min(250, iters)}"]

    def train_py(*extra: str) -> subprocess.CompletedProcess:
        run = subprocess.run([sys.executable, "train.py", *args, *extra], cwd=work, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{run.stdout[-2000:]}{run.stderr[-2000:]}\nbench_train: nanoGPT's train.py failed")
        return run

    def val_loss_at(out: str, step: int) -> float:
        evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)
        return next(float(v) for s, _, v in reversed(evals) if int(s) == step)

    t0 = time.perf_counter()
    # always_save_checkpoint: the model of every evaluation is saved (the config saves only a better one), so the
    # checkpoint left is the last iteration's
    run = train_py(f"--eval_iters={EVAL_DURING_RUN}", "--always_save_checkpoint=True")
    wall = time.perf_counter() - t0
    iter_ms = [float(ms) for ms in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", run.stdout)]
    # nanoGPT's own evaluation of that model at its default eval_iters: train.py resumed from the checkpoint
    # evaluates at the step it resumes at, before it steps (it then takes one more step, past max_iters, and stops)
    again = train_py(f"--eval_iters={EVAL_AFTER_RUN}", "--init_from=resume")
    shutil.rmtree(work, ignore_errors=True)
    losses = {str(EVAL_DURING_RUN): val_loss_at(run.stdout, iters), str(EVAL_AFTER_RUN): val_loss_at(again.stdout, iters)}
    return dict(val_loss_by_eval_batches=losses, iterations=iters, wall_seconds=wall,
                ms_per_iteration=statistics.median(iter_ms))


def megatrain_val_loss(ckpt: str, batches: int) -> float:
    """The validation loss of the model saved in `ckpt` over the first `batches` global batches of the run's
    validation samples, computed as the training loop evaluates (a run with train.eval_iters=`batches` logs the same
    figure), in this process without DeepSpeed."""
    from types import SimpleNamespace

    from megatrain.checkpoint.reader import CheckpointReader
    from megatrain.data import build_gpt_datasets
    from megatrain.generate import load_weights
    from megatrain.model import Transformer
    from megatrain.parallel.topology import Layout
    from megatrain.predict import LocalEngine
    from megatrain.tasks.lm import CausalLM

    with CheckpointReader(ckpt) as reader:
        cfg = reader.cfg.replaced({"train.eval_iters": batches})
        model = Transformer(cfg.model)
        load_weights(model, reader)
    t = cfg.train
    # the datasets as pretrain.setup_data builds them; more validation samples only append to the sample order
    _, valid, _ = build_gpt_datasets(cfg.data.path, cfg.data.split, cfg.data.seq_len,
                                     [t.max_steps * t.global_batch_size, batches * t.global_batch_size, 0], t.seed,
                                     cfg.data.cache_dir or None, cfg.data.sample_offsets)
    run = SimpleNamespace(cfg=cfg, layout=Layout(1, 1, 1), dp_rank=0, grad_accum=t.global_batch_size // t.micro_batch_size)
    return CausalLM().evaluate(run, LocalEngine(model), valid)["val_loss"]


def part2(args) -> dict:
    """Baby GPT through the real CLI (its own process), on tinyshakespeare; nanoGPT beside it with --nanogpt."""
    work = tempfile.mkdtemp(prefix="megatrain-baby-")
    prefix = os.path.join(work, "shakespeare")
    src = os.path.join(work, "shakespeare.jsonl")
    # nanoGPT trains on the first 90% of the characters and validates on the last 10%: two documents,
    # and data.split "1,1,0" (by documents) puts one in each
    text = open(args.baby_data, encoding="utf-8").read()
    cut = int(len(text) * 0.9)
    with open(src, "w") as g:
        g.write(json.dumps({"text": text[:cut]}) + "\n" + json.dumps({"text": text[cut:]}) + "\n")
    subprocess.run([sys.executable, "-m", "megatrain", "preprocess", "--input", src, "--tokenizer", "byte",
                    "--output-prefix", prefix], check=True, capture_output=True)
    ckpt = os.path.join(work, "run")
    sets = [f"data.path={prefix}", f"checkpoint.dir={ckpt}", "logging.tensorboard=false", "data.split=1,1,0",
            f"train.max_steps={args.baby_steps}", f"train.eval_iters={EVAL_DURING_RUN}", "logging.progress_bar=off",
            *args.baby_set]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "megatrain", "pretrain", "--config", "baby-gpt",
                    *[a for s in sets for a in ("--set", s)]], check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if "seconds_per_step" in r]
    # (the mean over every step: each row's mean weighted by the steps it covers)
    steps = [r["step"] - (prev["step"] if prev else 0) for prev, r in zip([None] + train[:-1], train)]
    ms = 1e3 * sum(r["seconds_per_step"] * n for r, n in zip(train, steps)) / sum(steps)
    losses = {str(EVAL_DURING_RUN): evals[-1]["val_loss"], str(EVAL_AFTER_RUN): megatrain_val_loss(ckpt, EVAL_AFTER_RUN)}
    out = dict(val_loss_by_eval_batches=losses, iterations=evals[-1]["step"], ms_per_iteration=ms, wall_seconds=wall,
               overrides=args.baby_set)
    sides = [("megatrain", out)]
    if args.nanogpt:  # the baseline runs in this run, or there is none
        ref = run_nanogpt(args.nanogpt, args.baby_data, args.baby_steps)
        ref["source"] = f"nanoGPT's train.py from {args.nanogpt}, in this run"
        out["nanogpt"] = ref
        out["wall_ratio"], out["ms_ratio"] = wall / ref["wall_seconds"], ms / ref["ms_per_iteration"]
        sides.append(("nanoGPT", ref))
    print(f"\nbaby GPT (nanoGPT shakespeare_char CPU setting), {args.baby_steps} iterations")
    print(f"  {'':10s} {f'val loss ({EVAL_DURING_RUN})':>14s} {f'val loss ({EVAL_AFTER_RUN})':>15s} "
          f"{'ms/iteration':>13s} {'wall s':>8s}")
    for name, r in sides:
        v = r["val_loss_by_eval_batches"]
        print(f"  {name:10s} {v[str(EVAL_DURING_RUN)]:14.4f} {v[str(EVAL_AFTER_RUN)]:15.4f} "
              f"{r['ms_per_iteration']:13.1f} {r['wall_seconds']:8.1f}")
    if not args.nanogpt:
        print("  no nanoGPT run (--nanogpt DIR runs it beside megatrain): no ratio")
        return out
    print(f"  megatrain / nanoGPT: wall {out['wall_ratio']:.2f}x, ms/iteration {out['ms_ratio']:.2f}x")
    from baby_profile import side_by_side  # where the time of a step goes, the two side by side in this process

    out["step_profile"] = side_by_side(args.nanogpt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved measurements; the best is kept")
    ap.add_argument("--baby-data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--baby-steps", type=int, default=2000)
    ap.add_argument("--baby-set", action="append", default=[], metavar="KEY=VALUE", help="a megatrain override")
    ap.add_argument("--nanogpt", default="", metavar="DIR", help="a nanoGPT checkout to run beside baby GPT")
    ap.add_argument("--skip", choices=["part1", "part2"], action="append", default=[])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_train.json"))
    args = ap.parse_args()
    meta = run_meta()
    old = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    res = {}
    for key, part in (("baby_gpt", "part2"), ("vs_hf_llama", "part1")):
        if key in old and (part in args.skip or (part == "part2" and not os.path.isfile(args.baby_data))):
            # a part not run keeps its last figures, with the run that measured them
            res[key] = {"meta": old[key].get("meta", old.get("meta")), **old[key]}
    if "part2" not in args.skip and os.path.isfile(args.baby_data):
        res["baby_gpt"] = part2(args)  # first: its own process, before this one holds DeepSpeed state
    elif "part2" not in args.skip:
        print(f"skipping baby GPT: {args.baby_data} not found (pass --baby-data)")
    if "part1" not in args.skip:
        res["vs_hf_llama"] = part1(args)
    write_results(args.out, res, meta=meta)
    print(f"wrote {args.out}")

    from megatrain.training.dist_env import end_distributed

    end_distributed()  # the process group the engines used ends before the interpreter does (a gloo thread can abort it)


if __name__ == "__main__":
    main()
