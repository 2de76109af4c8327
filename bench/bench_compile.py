"""torch.compile on this machine: megatrain's `model.compile` (each block compiled, regionally) and the whole model
under torch.compile, against eager, in one process.

    python bench/bench_compile.py [--config baby-gpt] [--iters 200] [--repeats 3] [--device cpu|cuda] [--precision fp32|bf16]

One process, the config's model (baby GPT by default: 4 layers, width 128, batch 12 x 64 tokens) in plain PyTorch ops
(`model.fused_kernels=off`: compiled blocks run the reference ops, which inductor fuses itself; it cannot trace into
megatrain's C++ kernels), torch's fused AdamW. Three copies of the same weights: eager; `model.compile`'s regional
compile (parallelize.apply_compile: one graph shared by every block, the embedding and loss eager); and
`torch.compile(model)` (inductor, static shapes, the whole forward). ms per training iteration (forward, backward,
optimizer step), the three interleaved `--repeats` times, the median of each; and the seconds each compiled variant's
first step takes (tracing and code generation, into an empty inductor cache of this run's own: what a first run
pays; a user's later runs read inductor's on-disk cache and pay less). Results go to bench/results/bench_compile.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-compile-inductor-")  # (before torch reads it)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatrain.config import load_config  # noqa: E402
from megatrain.model import Transformer  # noqa: E402
from megatrain.parallel.parallelize import apply_compile  # noqa: E402
from results_file import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="baby-gpt")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the weights' and activations' dtype")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_compile.json"))
    args = ap.parse_args()
    cfg = load_config(args.config, ["model.vocab_size=256", "model.fused_kernels=off"])
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    eager = Transformer(cfg.model)
    regional, whole = Transformer(cfg.model), Transformer(cfg.model)
    for m in (regional, whole):
        m.load_state_dict(eager.state_dict())
    for m in (eager, regional, whole):
        m.to(args.device, dtype)
    apply_compile(regional)
    variants = {"eager": eager, "regional": regional, "whole": torch.compile(whole, dynamic=False)}
    models = {"eager": eager, "regional": regional, "whole": whole}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 256, (B, T), generator=g).to(args.device) for _ in range(2))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step(name: str) -> float:
        loss = variants[name](x, y)
        loss.backward()
        loss = loss.detach()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return float(loss)

    def ms_per_iter(name: str) -> float:
        for _ in range(5):
            step(name)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(name)
        sync()
        return (time.perf_counter() - t0) / args.iters * 1e3

    first, first_loss = {}, {}
    for name in variants:
        t0 = time.perf_counter()
        first_loss[name] = step(name)  # (the loss of the same weights on the same batch: equal across variants)
        first[name] = time.perf_counter() - t0
    ms = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved: the machine's load drifts between runs
        for name in variants:
            ms[name].append(ms_per_iter(name))
    med = {name: statistics.median(v) for name, v in ms.items()}
    res = dict(config=args.config, device=args.device, precision=args.precision, threads=torch.get_num_threads(),
               batch=[B, T], iters=args.iters,
               eager_ms=ms["eager"], regional_ms=ms["regional"], whole_ms=ms["whole"],
               first_step_s=first, first_loss=first_loss,
               speedup_regional=med["eager"] / med["regional"], speedup_whole=med["eager"] / med["whole"])
    print(f"{args.config}: eager {med['eager']:.1f} ms/iteration; model.compile (regional) {med['regional']:.1f} "
          f"({res['speedup_regional']:.2f}x, first step {first['regional']:.1f} s); torch.compile(model) "
          f"{med['whole']:.1f} ({res['speedup_whole']:.2f}x, first step {first['whole']:.1f} s); "
          f"first losses {first_loss} ({torch.get_num_threads()} threads)")
    write_results(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
