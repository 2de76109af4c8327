"""`python -m megatrain.kernels --check`: which implementation each op uses, and every kernel against the reference.

Exit status: 0 when every kernel agrees with the reference on every device here and dtype it supports, or when no
extension was built (nothing to check: the reference runs); 1 when the extension was built but does not load, or a
kernel disagrees or raises; with --require-cuda, also 1 when there are no CUDA kernels for the CUDA device here.
"""
from __future__ import annotations

import argparse
import sys

import torch

from megatrain import kernels
from megatrain.kernels import ops, selfcheck


def check(require_cuda: bool = False) -> int:
    if kernels.broken():
        print(f"megatrain._C is built but does not load: {kernels.load_error()}; rebuild it (pip install "
              f"--no-build-isolation -e .)")
        return 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if require_cuda and (devices[-1] != "cuda" or not kernels.cuda_built()):
        print("no CUDA kernels to check: " + ("no CUDA device here" if devices[-1] != "cuda" else
                                               kernels.implementation("cuda")[1]))
        return 1
    bad = 0
    for name in devices:
        device = torch.device(name, 0) if name == "cuda" else torch.device(name)  # the index the tensors carry
        impl, why = kernels.implementation(device)
        print(f"{name}: implementation {impl} ({why})")
        if impl == "reference":
            print(f"  nothing to check on {name}: every op runs the PyTorch reference")
            continue
        for dtype in kernels.FUSED_DTYPES[name]:
            for op, case in ops.SELF_CHECKS.items():
                try:
                    err = selfcheck.max_error(case, device, dtype)
                    ok = err <= selfcheck.TOLERANCE[dtype]  # False for NaN
                    detail = f"max error {err:.2e}, tolerance {selfcheck.TOLERANCE[dtype]:.0e}"
                except Exception as e:  # noqa: BLE001  (a kernel that raises is a failed check)
                    ok, detail = False, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                bad += not ok
                dt = str(dtype).replace("torch.", "")
                print(f"  {op:22s} {dt:9s} parity {'ok' if ok else 'FAILED'} ({detail})")
    if bad:
        print(f"{bad} check(s) FAILED: those kernels would be turned off on a GPU (the reference runs instead)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatrain.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="print each op's implementation and check it against the "
                                                         "reference (forward and backward, each supported dtype)")
    ap.add_argument("--require-cuda", action="store_true", help="with --check: fail unless the CUDA kernels load "
                                                                "on this machine's GPU (bench/gpu.sh)")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.require_cuda)
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
