"""Generation benchmark: megatrain's generate (model.generate, the loop `megatrain generate` and predict run) against
transformers' `generate` on the same model, the same prompts and the same greedy tokens, at batch 1 and batch 8.

    python bench/bench_generate.py [--model DIR] [--prompt-tokens 64] [--new-tokens 128] [--batches 1,8] [--repeats 3]

The model is SmolLM2-135M-Instruct as a Hugging Face folder (`bash ../shared/data/fetch_smollm2.sh` writes it to
~/.cache/megatrain-real-data/smollm2-135m); megatrain reads the same folder (generate.load_model). Prompts are
`--prompt-tokens` tokens each of different text (no padding on either side), and both sides generate exactly
`--new-tokens` tokens greedily (no stop token). In one process, fp32, this machine's threads: per side and batch,
the time to the first new token (a 1-token generate: the prompt's forward) and the whole generate; tokens/s = batch
x new tokens / that time. The sides alternate `--repeats` times; the median counts. The generated ids are compared.
Results go to bench/results/bench_generate.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from results_file import write_results  # noqa: E402

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


def prompts(tok, n: int, length: int) -> torch.Tensor:
    """[n, length] ids: n different passages of the text (or of a built-in paragraph), `length` tokens each."""
    text = open(TEXT).read() if os.path.exists(TEXT) else " ".join(
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the river runs to the sea." for i in range(400))
    ids = tok(text[:200_000])["input_ids"]
    step = max(length, (len(ids) - length) // max(n, 1))
    return torch.tensor([ids[i * step: i * step + length] for i in range(n)])


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/megatrain-real-data/smollm2-135m"))
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_generate.json"))
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        raise SystemExit(f"{args.model}: no such model folder; run `bash ../shared/data/fetch_smollm2.sh` (or pass "
                         f"--model DIR, a Hugging Face causal LM folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatrain.generate import load_model
    from megatrain.model import generate

    tok = AutoTokenizer.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    ours, _ = load_model(args.model)
    ours.eval()
    N = args.new_tokens

    def run_ours(x, n):
        return generate(ours, x, n, temperature=0.0)

    def run_hf(x, n):
        with torch.no_grad():
            return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=tok.eos_token_id)

    sides = {"megatrain": run_ours, "transformers": run_hf}
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        x = prompts(tok, B, args.prompt_tokens)
        for fn in sides.values():  # warm-up: first-call allocations, lazy imports
            fn(x, 4)
        ttft = {s: [] for s in sides}
        total = {s: [] for s in sides}
        outs = {}
        for _ in range(args.repeats):
            for side, fn in sides.items():
                ttft[side].append(timed(lambda: fn(x, 1))[0])
                t, outs[side] = timed(lambda: fn(x, N))
                total[side].append(t)
        same = torch.equal(outs["megatrain"], outs["transformers"])
        agree = float((outs["megatrain"][:, -N:] == outs["transformers"][:, -N:]).float().mean())
        row = dict(batch=B, prompt_tokens=args.prompt_tokens, new_tokens=N, tokens_equal=same, token_agreement=agree)
        for side in sides:
            t = statistics.median(total[side])
            row[side] = dict(ttft_s=statistics.median(ttft[side]), total_s=t, tokens_per_s=B * N / t,
                             ms_per_token=(t - statistics.median(ttft[side])) / (N - 1) * 1e3, runs_s=total[side])
        row["speedup"] = row["megatrain"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        rows.append(row)
        print(f"batch {B}: megatrain {row['megatrain']['tokens_per_s']:.1f} tok/s (first token "
              f"{row['megatrain']['ttft_s'] * 1e3:.0f} ms, {row['megatrain']['ms_per_token']:.1f} ms/step), "
              f"transformers {row['transformers']['tokens_per_s']:.1f} tok/s (first token "
              f"{row['transformers']['ttft_s'] * 1e3:.0f} ms, {row['transformers']['ms_per_token']:.1f} ms/step): "
              f"{row['speedup']:.2f}x; tokens equal: {same} ({agree:.1%} of positions)", flush=True)
    write_results(args.out, dict(model=os.path.basename(os.path.normpath(args.model)), threads=torch.get_num_threads(),
                                 rows=rows))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
