"""The matrix products of a decoding step in the forms a CPU runs fastest (model.py calls these).

A decoding step multiplies a few rows (one token per sequence) by every weight of the model. On a CPU in fp32,
MKL's product through F.linear (x @ weight.T) reads the weight slowly when there are few rows; the same product as
weight @ x.T (2-16 rows), or one row against a transposed copy of the weight, reads it at up to twice the rate.
Measured on 2 cores (bench/bench_generate.py has the whole decode):
    SmolLM2-135M's decode step, projections as weight @ x.T: 83 against 105 ms at batch 8, 61 against 97 at batch 2
    one row against 424 MB of 3072 x 576 weights: 24-30 ms through transposed copies against 39-41 ms
    the 49152 x 576 LM head: 8 rows 9.4 against 24 ms as weight @ x.T
Anywhere else (autograd on, many rows, another device or dtype, a module that is not a plain nn.Linear: LoRA,
tensor-parallel layers, a layer with hooks such as ZeRO-3's) the layer runs as it is.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 16  # up to this many rows a product counts as a decoding step's

# .copies: id(weight) -> its transposed copy, inside this thread's `one_row_decoding` (None outside)
_local = threading.local()


@contextlib.contextmanager
def one_row_decoding(enabled: bool = True):
    """Inside: a one-row product (a batch-1 decoding step) reads a transposed copy of each plain weight, made on the
    layer's first one-row product (not on a prompt's many rows, whose first token it would delay) and freed on exit:
    the weights once more in memory while it lasts. For one thread's generation (model.generate at batch 1)."""
    if not enabled or getattr(_local, "copies", None) is not None:
        yield
        return
    _local.copies = {}
    try:
        yield
    finally:
        _local.copies = None


def _plain_linear(layer: nn.Module) -> bool:
    """A plain nn.Linear whose weight may be read directly: no forward hooks (DeepSpeed ZeRO-3 gathers a partitioned
    weight in its module's pre-forward hook; read past it, the weight is empty) and no ZeRO-3 partition."""
    return (type(layer) is nn.Linear and not layer._forward_pre_hooks and not layer._forward_hooks
            and not hasattr(layer.weight, "ds_id"))


def _cpu_fp32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled())


def _one_row(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, d] @ weight.T: against the weight's transposed copy inside one_row_decoding, else F.linear."""
    copies = getattr(_local, "copies", None)
    if copies is None:
        return F.linear(x, weight)
    wt = copies.get(id(weight))
    if wt is None:
        wt = copies[id(weight)] = weight.t().contiguous()
    return x @ wt


def project(layer: nn.Module, x: torch.Tensor, most_rows: int | None = FEW_ROWS) -> torch.Tensor:
    """layer(x); for a plain nn.Linear in a CPU fp32 decoding step (at most `most_rows` rows, None: any number, as
    for the LM head, whose vocabulary-tall weight gains at every batch size; no autograd) as weight @ x.T, or one
    row as `_one_row`."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (not rows or (most_rows is not None and rows > most_rows) or not _plain_linear(layer)
            or not _cpu_fp32_inference(x, layer.weight)):
        return layer(x)
    x2 = x.reshape(rows, -1)
    # (contiguous: the fused kernels read contiguous rows)
    y = _one_row(x2, layer.weight) if rows == 1 else (layer.weight @ x2.t()).t().contiguous()
    if layer.bias is not None:
        y += layer.bias  # (y is this product's own tensor)
    return y.view(*x.shape[:-1], -1)
