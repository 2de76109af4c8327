"""Fused-kernel benchmark: each fused op next to the eager PyTorch composition, in one run.

    python bench/bench_kernels.py [--device cpu|cuda]

For every op, forward + backward: median time and peak memory of the fused op and of the eager
reference (megatrain/kernels/reference.py) on the same inputs, and their ratio (target: fused >= 1.0x
speed for every op on CPU; for the LM head + cross-entropy at vocab 32k, peak memory <= 0.5x eager). On a
GPU also the achieved bandwidth of the fused elementwise/norm ops as a fraction of the device's (target
>= 70%). Then tokens/s of a training step of a small Llama-shaped model with fused kernels on vs off.
Results go to bench/results/bench_kernels[_cuda].json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatrain import kernels  # noqa: E402
from megatrain.kernels import ops, reference  # noqa: E402
from megatrain.model import rope_tables  # noqa: E402
from results_file import write_results  # noqa: E402

GPU_BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


class PeakRSS:
    """Peak resident memory above the start, sampled every 0.5 ms (CPU), or the CUDA allocator's peak."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self.stop = False
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.t.join()
            self.peak = max(self.peak, self._rss())
            self.bytes = self.peak - self.base


def make_inputs(name: str, device: str, dtype, size: str):
    g = torch.Generator().manual_seed(0)
    big = size == "big"
    N, D = (8192, 4096) if big else (4096, 1024)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    if name == "rms_norm":
        return (t(N, D), t(D), 1e-5), 2 * 2 * N * D  # bytes moved ~ read x + write y, fwd and bwd
    if name == "layer_norm":
        return (t(N, D), t(D), t(D), 1e-5), 2 * 2 * N * D
    if name == "rope":
        B, T, H, hd = (8, 2048, 32, 128) if big else (4, 512, 16, 64)
        cos, sin = (x.to(device) for x in rope_tables(hd, T, 10000.0))
        return (t(B, T, H, hd), cos, sin), 2 * 2 * B * T * H * hd
    if name == "swiglu":
        return (t(N, 2 * D * 2),), 2 * (3 * N * 2 * D) + 0
    if name == "bias_gelu":
        return (t(N, D * 4), t(D * 4)), 2 * 2 * N * D * 4
    if name == "cross_entropy":
        rows = 4096 if big else 1024
        y = torch.randint(0, 32000, (rows,), generator=g).to(device)
        return (t(rows, 32000, scale=3.0), y), 2 * 2 * rows * 32000
    if name == "linear_cross_entropy":
        rows = 8192 if big else 2048
        y = torch.randint(0, 32000, (rows,), generator=g).to(device)
        return (t(rows, 512 if not big else 4096), t(32000, 512 if not big else 4096, scale=0.05), y), 0
    raise KeyError(name)


OPS = ["rms_norm", "layer_norm", "rope", "swiglu", "bias_gelu", "cross_entropy", "linear_cross_entropy"]


def run_once(fn, inputs, device):
    xs = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) and x.is_floating_point() else x
          for x in inputs]
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = fn(*xs)
    (y.sum() if y.dim() else y).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_op(name, device, dtype, size, repeat):
    inputs, nbytes = make_inputs(name, device, dtype, size)
    fused, eager = getattr(ops, name), getattr(reference, name)
    for fn in (fused, eager):
        run_once(fn, inputs, device)  # warm-up
    tf, te = [], []
    for _ in range(repeat):  # interleaved: drift in machine speed hits both alike
        tf.append(run_once(fused, inputs, device))
        te.append(run_once(eager, inputs, device))
    mem = {}
    for label, fn in (("fused", fused), ("eager", eager)):
        with PeakRSS(device) as m:
            run_once(fn, inputs, device)
        mem[label] = m.bytes
    f, e = statistics.median(tf), statistics.median(te)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    shapes = [list(x.shape) for x in inputs if torch.is_tensor(x)]
    return dict(shapes=shapes, fused_ms=f * 1e3, eager_ms=e * 1e3, speedup=e / f, fused_peak_mib=mem["fused"] / 2**20,
                eager_peak_mib=mem["eager"] / 2**20, memory_ratio=(mem["fused"] / mem["eager"]) if mem["eager"] else None,
                fused_gbs=nbytes * itemsize / f / 1e9 if nbytes else None)


def training_step_tokens_per_s(device, fused: str, steps: int) -> float:
    from megatrain.config import ModelConfig
    from megatrain.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, n_layers=4, n_heads=8, d_model=512, max_seq_len=256, fused_kernels=fused)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 8192, (8, 257), device=device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return 8 * 256 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    impl, why = kernels.implementation(device, dtype)
    size = "big" if device == "cuda" else "small"
    print(f"device {device}, {dtype}, fused implementation: {impl} ({why})")
    res = dict(device=device, dtype=str(dtype), implementation=impl, ops={})
    peak_bw = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak_bw = next((bw for k, bw in GPU_BANDWIDTH_GBS.items() if k in name), None)
        res["gpu"] = name
    print(f"{'op (fwd+bwd)':24s} {'fused ms':>9s} {'eager ms':>9s} {'speed':>7s} {'fused MiB':>10s} {'eager MiB':>10s} {'mem':>6s}"
          + ("  bandwidth" if peak_bw else ""))
    for name in OPS:
        r = bench_op(name, device, dtype, size, args.repeat)
        res["ops"][name] = r
        mem = f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] is not None else "n/a"
        bw = ""
        if peak_bw and r["fused_gbs"]:
            r["device_peak_gbs"], r["bandwidth_fraction"] = peak_bw, r["fused_gbs"] / peak_bw
            bw = f"  {r['fused_gbs']:.0f} GB/s ({r['bandwidth_fraction']:.0%})"
        print(f"{name:24s} {r['fused_ms']:9.2f} {r['eager_ms']:9.2f} {r['speedup']:6.2f}x {r['fused_peak_mib']:10.1f} "
              f"{r['eager_peak_mib']:10.1f} {mem:>6s}{bw}", flush=True)
    on = off = 0.0
    for _ in range(3):  # interleaved rounds, best of each: this machine's timing noise is ~30%
        on = max(on, training_step_tokens_per_s(device, "on", args.train_steps))
        off = max(off, training_step_tokens_per_s(device, "off", args.train_steps))
    res["training_step"] = dict(fused_tokens_per_s=on, eager_tokens_per_s=off, speedup=on / off)
    print(f"training step (4x512 Llama-shaped, batch 8 x 256): fused {on:,.0f} tokens/s, eager {off:,.0f} tokens/s "
          f"-> {on / off:.2f}x")
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "bench_kernels.json" if device == "cpu" else "bench_kernels_cuda.json")
    write_results(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
