"""`python -m megatrain.kernels --check`: which implementation each op uses, and a quick parity check."""
from __future__ import annotations

import argparse
import sys

import torch

from megatrain import kernels
from megatrain.kernels import ops, reference


def cases(device: str, dtype: torch.dtype):
    """(name, fused fn, reference fn, inputs) with odd widths, a few rows."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    T, D, V = 7, 37, 301
    cos, sin = (t.to(device) for t in reference.rope_tables(10, T, 10000.0))
    labels = torch.randint(0, V, (T * 3,), generator=g).to(device)
    labels[1] = -100
    return [
        ("rms_norm", ops.rms_norm, reference.rms_norm, (r(3, T, D), r(D), 1e-5)),
        ("layer_norm", ops.layer_norm, reference.layer_norm, (r(3, T, D), r(D), r(D), 1e-5)),
        ("rope", ops.rope, reference.rope, (r(2, T, 3, 10), cos, sin)),
        ("swiglu", ops.swiglu, reference.swiglu, (r(3, T, 2 * D),)),
        ("bias_gelu", ops.bias_gelu, reference.bias_gelu, (r(3, T, D), r(D))),
        ("cross_entropy", ops.cross_entropy, reference.cross_entropy, (r(T * 3, V, scale=3.0), labels)),
        ("linear_cross_entropy", lambda h, w, y: ops.linear_cross_entropy(h, w, y, chunk=8),
         reference.linear_cross_entropy, (r(T * 3, D), r(V, D, scale=0.2), labels)),
    ]


def parity(fused, ref, inputs) -> float:
    """Largest abs difference of outputs and input gradients, fused vs reference."""
    a = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]
    b = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]
    ya, yb = fused(*a), ref(*b)
    err = (ya.float() - yb.float()).abs().max().item()
    w = torch.randn_like(ya.float())
    (ya.float() * w).sum().backward()
    (yb.float() * w).sum().backward()
    for xa, xb in zip(a, b):
        if torch.is_tensor(xa) and xa.requires_grad:
            err = max(err, (xa.grad.float() - xb.grad.float()).abs().max().item())
    return err


def check() -> int:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    bad = 0
    for device in devices:
        impl, why = kernels.implementation(device)
        print(f"{device}: implementation {impl} ({why})")
        for name, fused, ref, inputs in cases(device, torch.float32):
            err = parity(fused, ref, inputs)
            ok = err < 1e-4
            bad += not ok
            print(f"  {name:22s} {impl:9s} parity {'ok' if ok else 'FAILED'} (max abs diff {err:.2e})")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m megatrain.kernels", description=__doc__)
    ap.add_argument("--check", action="store_true", help="print each op's implementation and check parity")
    args = ap.parse_args()
    if args.check:
        return check()
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
