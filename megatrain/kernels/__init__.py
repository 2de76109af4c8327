"""Fused kernels: RMSNorm/LayerNorm, RoPE, SwiGLU, bias-GeLU, softmax cross-entropy (also vocab-parallel)
and a chunked LM-head + cross-entropy.

`megatrain._C` (built from csrc/ by setup.py) registers the ops under torch.ops.megatrain with a CPU and,
when built with CUDA, a CUDA implementation. If it is missing, every op falls back to reference.py with
a one-line notice. Each op's kernels are checked against the reference the first time a process uses them on a
GPU (selfcheck.py). `python -m megatrain.kernels --check` says which implementation each op uses and why, and
checks every kernel against the reference.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

_LOAD_ERROR: str | None = None
_DISABLED = os.environ.get("MEGATRAIN_DISABLE_KERNELS", "") not in ("", "0")
_ABSENT = False  # no megatrain._C at all (never built), as opposed to one that fails to load
if _DISABLED:
    _LOAD_ERROR = "disabled by MEGATRAIN_DISABLE_KERNELS"
else:
    try:
        import megatrain._C  # noqa: F401  (registers torch.ops.megatrain.*)
    except ImportError as e:  # not built (MEGATRAIN_BUILD_KERNELS=0, or an isolated pip build without torch)
        _LOAD_ERROR = str(e).splitlines()[0]
        _ABSENT = isinstance(e, ModuleNotFoundError) and e.name == "megatrain._C"

_NOTICE_SHOWN = False
FUSED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float64),
                "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def built() -> bool:
    return _LOAD_ERROR is None


def load_error() -> str | None:
    """Why megatrain._C did not load (None when it did)."""
    return None if _LOAD_ERROR is None else str(_LOAD_ERROR)


def broken() -> bool:
    """megatrain._C is there but does not load (built against another torch, a library missing)."""
    return _LOAD_ERROR is not None and not _DISABLED and not _ABSENT


def has_kernel(op: str, dispatch_key: str) -> bool:
    """megatrain._C has a `dispatch_key` kernel for torch.ops.megatrain.`op` (one built before `op` existed has not)."""
    try:
        return built() and torch._C._dispatch_has_kernel_for_dispatch_key(f"megatrain::{op}", dispatch_key)
    except RuntimeError:  # (no such op at all)
        return False


def cuda_built() -> bool:
    return has_kernel("rms_norm_fwd", "CUDA")


def implementation(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """('cuda' | 'cpu' | 'reference', why) for tensors on `device` of `dtype`."""
    return _implementation(torch.device(device).type, dtype)


@functools.lru_cache(maxsize=None)  # asked on every fused-op call: the answer never changes in a process
def _implementation(kind: str, dtype: torch.dtype) -> tuple[str, str]:
    if not built():
        return "reference", f"megatrain._C is not built ({_LOAD_ERROR}); reinstall with pip install --no-build-isolation -e ."
    if kind == "cuda" and not cuda_built():
        return "reference", "megatrain._C was built without CUDA (no CUDA torch or nvcc at install time)"
    if kind not in FUSED_DTYPES:
        return "reference", f"no fused kernels for {kind} tensors"
    if dtype not in FUSED_DTYPES[kind]:
        return "reference", f"no fused {kind} kernel for {dtype}"
    return kind, f"megatrain._C {kind} kernel"


def use_fused(x: torch.Tensor) -> bool:
    return implementation(x.device, x.dtype)[0] != "reference"


def notice_if_missing() -> None:
    """Called where fused kernels were asked for: one line, once, if the reference will run instead."""
    global _NOTICE_SHOWN
    if not built() and not _NOTICE_SHOWN:
        _NOTICE_SHOWN = True
        print(f"megatrain: fused kernels requested but not built ({_LOAD_ERROR}); using the PyTorch reference",
              file=sys.stderr)
