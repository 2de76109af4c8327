"""Self-check on first use: a fused op must agree with the reference before a process relies on it.

The first time a process runs a fused op on a CUDA device, the op's kernels and its reference (reference.py) run on
a tiny random input at the caller's dtype, forward and backward. If they disagree by more than TOLERANCE, or the
kernel raises, that op is turned off for the process (one line on stderr says which and why) and the reference runs
in its place; the other ops stay on. The verdict is kept per (op, device, dtype).

CPU kernels are tested by the test suite, so the check is off for them unless MEGATRAIN_KERNEL_SELFCHECK=1 (set by
tests/test_kernels.py to exercise it without a GPU).
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Callable

import torch
import torch.distributed as dist

# largest error allowed, relative to the reference's largest entry, in the output and in each input's gradient.
# Both sides run at the dtype under test, so a few units in the last place of each are allowed (the CPU kernels are
# within 1e-6 in float32 and 7e-3 in bfloat16); a kernel that indexes or reduces wrongly is off by order 1.
# float64 is held to float32's accuracy: the reference cross-entropy computes in float32.
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# op name -> fn(draw) -> (fused fn, reference fn, inputs): the cases live beside the kernels (ops.SELF_CHECKS)
Case = Callable[["Draw"], tuple]

_verdicts: dict[tuple[str, torch.device, torch.dtype], bool] = {}
_agreed: set[tuple] = set()  # ((op, device, dtype), group) whose verdict the group's ranks have agreed on


class Draw:
    """Fresh leaf tensors for one check, from a private generator: the caller's random streams are not touched."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.generator = torch.Generator().manual_seed(0)

    def floats(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.generator) * scale
        return x.to(self.device, self.dtype).requires_grad_()

    def labels(self, n: int, vocab: int, ignore_index: int = -100) -> torch.Tensor:
        y = torch.randint(0, vocab, (n,), generator=self.generator)
        y[1] = ignore_index  # one ignored row
        return y.to(self.device)


def enabled(device: torch.device) -> bool:
    """On for CUDA tensors; on everywhere with MEGATRAIN_KERNEL_SELFCHECK=1."""
    return device.type == "cuda" or os.environ.get("MEGATRAIN_KERNEL_SELFCHECK", "") == "1"


def max_error(case: Case, device: torch.device, dtype: torch.dtype) -> float:
    """Largest difference between the fused op and the reference over the output and each input's gradient,
    each relative to the reference's largest entry (NaN when either side produced a NaN)."""
    fused, ref, inputs = case(Draw(device, dtype))
    results = []
    for fn in (fused, ref):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x for x in inputs]
        y = fn(*xs)
        cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)  # same for both
        (y.float() * cotangent).sum().backward()
        results.append([y] + [x.grad for x in xs if torch.is_tensor(x) and x.requires_grad])
    errors = []
    for i, (got, want) in enumerate(zip(*results)):
        if got is None or want is None or got.shape != want.shape:
            shape = [None if t is None else tuple(t.shape) for t in (got, want)]
            raise RuntimeError(f"{'output' if i == 0 else f'gradient {i}'} of shape {shape[0]}, reference {shape[1]}")
        errors.append(((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-12)).item())
    return float("nan") if any(e != e for e in errors) else max(errors)


def _isolated(fn: Callable, *args):
    """fn(*args) in a fresh thread: grad mode, inference mode, autocast, saved-tensor hooks and dispatch modes are
    per-thread, so nothing of the caller's autograd state (an eval's no_grad, activation checkpointing) reaches the
    check, and the check adds nothing to the caller's graph."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001  (any failure of the kernel is a verdict, not a crash)
            out["error"] = e

    t = threading.Thread(target=run, name="megatrain-kernel-selfcheck")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _where(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device} {str(dtype).replace('torch.', '')}"


def _check(op: str, case: Case, device: torch.device, dtype: torch.dtype) -> bool:
    """Run the check where it is enabled; on failure say so in one line and return False."""
    if not enabled(device):
        return True
    try:
        err = _isolated(max_error, case, device, dtype)
    except Exception as e:  # noqa: BLE001
        problem = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        if err <= TOLERANCE[dtype]:  # False for NaN
            return True
        problem = f"disagrees with the reference (max error {err:.2e}, tolerance {TOLERANCE[dtype]:.0e})"
    print(f"megatrain: fused kernel {op} on {_where(device, dtype)} {problem}; using the PyTorch reference for it in this process",
          file=sys.stderr)
    return False


def passed(op: str, case: Case, device: torch.device, dtype: torch.dtype, group=None) -> bool:
    """Whether `op`'s kernels may run on `device` at `dtype`: checked on first use, then remembered. With a process
    group of several ranks (the vocab-parallel loss, whose fused and reference paths run different collectives)
    its ranks agree once: the op stays on only where it passed on every rank."""
    key = (op, device, dtype)
    ok = _verdicts.get(key)
    if ok is None:
        ok = _verdicts[key] = _check(op, case, device, dtype)
    if group is not None and (key, group) not in _agreed and dist.get_world_size(group) > 1:
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if ok and not flag.item():
            print(f"megatrain: fused kernel {op} on {_where(device, dtype)} failed the self-check on another rank of "
                  f"its group; using the PyTorch reference for it in this process", file=sys.stderr)
        ok = _verdicts[key] = bool(flag.item())
        _agreed.add((key, group))
    return ok


def verdicts() -> dict[tuple[str, torch.device, torch.dtype], bool]:
    """The verdicts so far: (op, device, dtype) -> kernels on."""
    return dict(_verdicts)


def reset() -> None:
    """Forget every verdict (tests)."""
    _verdicts.clear()
    _agreed.clear()
