"""Training-speed benchmark: megatrain vs. Hugging Face Llama through DeepSpeed, and baby GPT.

    python bench/bench_train.py [--steps 6] [--baby-data ../shared/data/tinyshakespeare.txt]

Part 1 (one process, fp32, ZeRO-1, the same Llama-shaped dims, batch and sequence length): megatrain's
training tokens/s next to `transformers.LlamaForCausalLM` trained through DeepSpeed in the same run
(target >= 1.3x), and megatrain's achieved model FLOP/s (embeddings excluded) next to this machine's
measured torch.mm FLOP/s (target >= 80%).
Part 2: nanoGPT's CPU "baby GPT" (configs/baby-gpt.yaml: char/byte level on tinyshakespeare, 4 layers,
4 heads, width 128, block 64, batch 12, 2000 iterations, lr 1e-3, no dropout): validation loss after
2000 iterations (nanoGPT reports 1.88) and seconds per iteration.
Results go to bench/results/bench_train.json.
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

from megatrain.config import ModelConfig, ffn_width  # noqa: E402
from megatrain.fileio import write_atomic  # noqa: E402
from megatrain.training.metrics import measured_matmul_tflops, train_flops_per_token  # noqa: E402


def ds_config(micro: int) -> dict:
    return {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9}


def time_engine(model, step_fn, micro: int, steps: int, warmup: int = 2) -> float:
    """Seconds per optimizer step of `model` trained through deepspeed.initialize (ZeRO-1, torch AdamW)."""
    import deepspeed

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(micro))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_fn(engine)
        engine.backward(loss)
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def part1(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatrain.model import Transformer
    from megatrain.training.dist_env import init_distributed

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
    mm = measured_matmul_tflops(n=1024, trials=3, repeat=10)
    results = {}
    # interleave the two models so drift in this machine's speed hits both alike
    for rnd in range(args.rounds):
        t_ours = time_engine(ours, lambda e: e(x, y), B, args.steps)
        t_hf = time_engine(hf, lambda e: e(input_ids=x, labels=x).loss, B, args.steps)
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
               torch_mm_tflops=mm, megatrain_tflops=ours_tflops, hf_tflops=hf_tflops,
               megatrain_fraction_of_mm=ours_tflops / mm, hf_fraction_of_mm=hf_tflops / mm)
    print(f"\nLlama-shaped {args.layers}x{args.width}, seq {T}, batch {B}, fp32, ZeRO-1, 1 process "
          f"({n_ours / 1e6:.1f}M params):")
    print(f"  megatrain          {tok / t_ours:>9,.0f} tokens/s   {ours_tflops * 1e3:6.1f} GFLOP/s  "
          f"{ours_tflops / mm:5.1%} of torch.mm")
    print(f"  HF LlamaForCausalLM{tok / t_hf:>9,.0f} tokens/s   {hf_tflops * 1e3:6.1f} GFLOP/s  {hf_tflops / mm:5.1%} of torch.mm")
    print(f"  speed-up vs HF: {t_hf / t_ours:.2f}x (target >= 1.3x); torch.mm: {mm * 1e3:.1f} GFLOP/s; "
          f"megatrain at {ours_tflops / mm:.0%} of it (target >= 80%)")
    return out


def part2(args) -> dict:
    """Baby GPT through the real CLI (its own process), on tinyshakespeare."""
    if not os.path.isfile(args.baby_data):
        print(f"skipping baby GPT: {args.baby_data} not found (pass --baby-data)")
        return {}
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
                    "--output-prefix", prefix], check=True)
    ckpt = os.path.join(work, "run")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "megatrain", "pretrain", "--config", "baby-gpt", "--set", f"data.path={prefix}",
                    "--set", f"checkpoint.dir={ckpt}", "--set", "logging.tensorboard=false", "--set", "data.split=1,1,0",
                    "--set", f"train.max_steps={args.baby_steps}"], check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if "seconds_per_step" in r]
    sec_per_iter = sum(r["seconds_per_step"] for r in train) / len(train)
    out = dict(val_loss=evals[-1]["val_loss"], iterations=evals[-1]["step"], seconds_per_iter=sec_per_iter,
               wall_seconds=wall, nanogpt_reported_val_loss=1.88)
    print(f"\nbaby GPT (nanoGPT shakespeare_char CPU setting): val loss {out['val_loss']:.4f} after {out['iterations']} "
          f"iterations (nanoGPT: 1.88; target <= 1.88), {sec_per_iter * 1e3:.1f} ms/iteration, {wall:.0f} s in all")
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
    ap.add_argument("--skip", choices=["part1", "part2"], action="append", default=[])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_train.json"))
    args = ap.parse_args()
    res = json.load(open(args.out)) if os.path.isfile(args.out) else {}  # a skipped part keeps its last figures
    if "part2" not in args.skip:
        res["baby_gpt"] = part2(args)  # first: its own process, before this one holds DeepSpeed state
    if "part1" not in args.skip:
        res["vs_hf_llama"] = part1(args)
    write_atomic(args.out, json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
