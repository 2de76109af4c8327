"""The matrix products of a decoding step in the forms a CPU runs fastest (model.py calls these).

A decoding step multiplies a few rows (one token per sequence) by every weight of the model. On a CPU in fp32,
MKL's product through F.linear (x @ weight.T) is slow for a few rows; the same product as weight @ x.T, or one row
against a transposed copy of the weight, reads the weight at up to twice the rate. Measured on SmolLM2-135M's
decode step on 2 cores (bench/bench_generate.py; medians of in-process alternations):
    blocks' projections as weight @ x.T: 83 against 105 ms a step at batch 8, 61 against 97 ms at batch 2
    the 49152 x 576 LM head: 8 rows 9.4 against 24 ms as weight @ x.T; one row 4.6 against 9.7 ms through a
    transposed copy
Anywhere else (autograd on, many rows, another device or dtype, a module that is not a plain nn.Linear: LoRA,
tensor-parallel layers) the layer runs as it is.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 16  # up to this many rows a product counts as a decoding step's


def _cpu_fp32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled())


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x); for a plain nn.Linear in a CPU fp32 decoding step (2..FEW_ROWS rows, no autograd) as
    weight @ x.T (one row: the two forms are the same product)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if type(layer) is not nn.Linear or not 2 <= rows <= FEW_ROWS or not _cpu_fp32_inference(x, layer.weight):
        return layer(x)
    y = (layer.weight @ x.reshape(rows, -1).t()).t().contiguous()  # (the fused kernels read contiguous rows)
    if layer.bias is not None:
        y += layer.bias
    return y.view(*x.shape[:-1], -1)


def head_logits(x: torch.Tensor, weight: torch.Tensor, cache, decoding: bool) -> torch.Tensor:
    """The next-token logits x [B, d] @ weight [V, d].T. In a CPU fp32 step without autograd: several rows as
    weight @ x.T; one row against a transposed copy of the weight that `cache` (a KVCache) keeps for the generation,
    made at the first one-token step (`decoding`; not on the prompt's, whose first token it would delay). The copy
    is one more vocabulary-sized matrix in memory while the cache lives."""
    if not _cpu_fp32_inference(x, weight):
        return F.linear(x, weight)
    if x.shape[0] > 1:
        return (weight @ x.t()).t()
    if cache.head_t is None and decoding:
        cache.head_t = weight.t().contiguous()
    return F.linear(x, weight) if cache.head_t is None else x @ cache.head_t
