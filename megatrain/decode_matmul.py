"""The matrix products of a decoding step in the forms a CPU runs fastest (model.py calls these).

A decoding step multiplies a few rows (one token per sequence) by every weight of the model, so it is bound by the
rate at which the weights are read. On a CPU in fp32, MKL's product through F.linear (x @ weight.T) reads a weight at
a fraction of the memory's rate when there are few rows. megatrain's `decode_linear` kernel (csrc/cpu_kernels.cpp)
streams each weight once, row by row in its own layout, against the few rows held in cache; without the built
extension the product runs as weight @ x.T, which MKL does faster than F.linear for a few rows.
Measured on 2 cores (one product, median; bench/bench_generate.py has the whole decode):
    1 row against the 49152 x 576 LM head (113 MB, read from memory): 62 GB/s through decode_linear, 30 through a
        transposed copy of the weight, 18 through F.linear
    8 rows against the same: 23 GB/s through decode_linear, 20 as weight @ x.T, 10 through F.linear
A plain nn.Linear's other products (autograd on, more rows, another device or dtype) go through cpu_linear.linear
(oneDNN on a CPU in fp32, else F.linear). A module that is not a plain nn.Linear (LoRA, tensor-parallel layers, a
layer with hooks such as ZeRO-3's) runs as it is.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from megatrain import cpu_linear
from megatrain.kernels import has_kernel

FEW_ROWS = 16  # up to this many rows a product counts as a decoding step's


@functools.lru_cache(maxsize=None)  # (asked on every decoding product; the answer never changes in a process)
def kernel_built() -> bool:
    """megatrain._C has decode_linear (one built before the kernel existed has not: weight @ x.T then)."""
    return has_kernel("decode_linear", "CPU")


def _plain_linear(layer: nn.Module) -> bool:
    """A plain nn.Linear whose weight may be read directly: no forward hooks (DeepSpeed ZeRO-3 gathers a partitioned
    weight in its module's pre-forward hook; read past it, the weight is empty) and no ZeRO-3 partition."""
    return (type(layer) is nn.Linear and not layer._forward_pre_hooks and not layer._forward_hooks
            and not hasattr(layer.weight, "ds_id"))


def _cpu_fp32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled())


def project(layer: nn.Module, x: torch.Tensor, most_rows: int | None = FEW_ROWS, fused: bool = True) -> torch.Tensor:
    """layer(x); for a plain nn.Linear in a CPU fp32 decoding step (at most `most_rows` rows; None: any number, as
    for the LM head, whose vocabulary-tall weight gains at every batch size; no autograd) through decode_linear (up
    to FEW_ROWS rows, when `fused`: the calling module runs megatrain's kernels, and the extension has it) or as
    weight @ x.T; any other product of a plain nn.Linear through cpu_linear.linear (oneDNN on a CPU in fp32)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not _plain_linear(layer):
        return layer(x)
    if not rows or (most_rows is not None and rows > most_rows) or not _cpu_fp32_inference(x, layer.weight):
        return cpu_linear.linear(x, layer.weight, layer.bias)
    x2 = x.reshape(rows, -1)
    if fused and rows <= FEW_ROWS and kernel_built():
        y = torch.ops.megatrain.decode_linear(x2, layer.weight)
    else:  # (contiguous: the fused kernels read contiguous rows)
        y = (layer.weight @ x2.t()).t().contiguous()
    if layer.bias is not None:
        y += layer.bias  # (y is this product's own tensor)
    return y.view(*x.shape[:-1], -1)
