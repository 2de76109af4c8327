"""Does torch.compile speed up a small model's training step on this machine? (issue 13's suggested lever)

    python bench/bench_compile.py [--config baby-gpt] [--iters 200] [--repeats 3]

One process, the config's model (baby GPT by default: 4 layers, width 128, batch 12 x 64 tokens, plain PyTorch
ops, as `model.fused_kernels=off`, since inductor cannot trace into megatrain's C++ kernels), torch's fused AdamW:
ms per training iteration (forward, backward, optimizer step) eager and under `torch.compile(model)` (inductor,
static shapes), interleaved `--repeats` times, the median of each; and the seconds the first compiled step takes
(tracing and code generation; inductor caches its code on disk, so a second run of this script pays less).
Results go to bench/results/bench_compile.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatrain.config import load_config  # noqa: E402
from megatrain.model import Transformer  # noqa: E402
from results_file import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="baby-gpt")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_compile.json"))
    args = ap.parse_args()
    cfg = load_config(args.config, ["model.vocab_size=256", "model.fused_kernels=off"])
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)

    def step(f) -> None:
        f(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ms_per_iter(f) -> float:
        for _ in range(5):
            step(f)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(f)
        return (time.perf_counter() - t0) / args.iters * 1e3

    compiled = torch.compile(model, dynamic=False)
    t0 = time.perf_counter()
    step(compiled)
    compile_s = time.perf_counter() - t0
    eager, comp = [], []
    for _ in range(args.repeats):  # interleaved: the machine's load drifts between runs
        eager.append(ms_per_iter(model))
        comp.append(ms_per_iter(compiled))
    res = dict(config=args.config, threads=torch.get_num_threads(), batch=[B, T], iters=args.iters,
               eager_ms=eager, compiled_ms=comp, first_compiled_step_s=compile_s,
               eager_median_ms=statistics.median(eager), compiled_median_ms=statistics.median(comp),
               speedup=statistics.median(eager) / statistics.median(comp))
    print(f"{args.config}: eager {statistics.median(eager):.1f} ms/iteration, torch.compile "
          f"{statistics.median(comp):.1f} ms/iteration ({res['speedup']:.2f}x), first compiled step {compile_s:.1f} s "
          f"({torch.get_num_threads()} threads)")
    write_results(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
