"""Linear layers on a CPU in fp32 through oneDNN, forward and backward (model.py, LoRA and the tensor-parallel layers
call `linear`).

PyTorch runs an fp32 x @ W^T on a CPU through MKL's sgemm. On a CPU that is not Intel's, MKL takes its AVX2 code
even where the CPU has AVX-512, while oneDNN (also inside PyTorch, as torch.ops.mkldnn._linear_pointwise) picks
its kernels from the CPU's own features. The two give fp32 results that differ only in summation order. Measured
on this project's 2-core AMD EPYC (AVX-512), 1024 rows, median of 15:
    768 -> 2304 (a fused q|k|v):  forward 18.2 ms through F.linear, 7.4 through oneDNN
                                  input gradient g @ W 15.6 / 8.6; weight gradient g^T x 16.0 / 8.7
    768 -> 4096 (gate|up):        forward 28.7 / 13.4; input gradient 27.8 / 15.5; weight gradient 27.9 / 16.4
    2048 -> 768 (down):           forward 13.8 / 6.2;  input gradient 14.1 / 6.4;  weight gradient 14.4 / 7.0
On an Intel CPU both libraries run AVX-512 and are about as fast. Elsewhere (a GPU, another dtype, a ZeRO-3
partitioned weight, which DeepSpeed gathers and releases around its own F.linear) `linear` is F.linear, as it is
everywhere with MEGATRAIN_CPU_LINEAR=torch in the environment.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

_AVAILABLE = torch.backends.mkldnn.is_available() and os.environ.get("MEGATRAIN_CPU_LINEAR", "onednn") != "torch"
BACKEND = "oneDNN" if _AVAILABLE else "torch.mm"  # what a CPU fp32 linear layer runs through (named in logs, caches)


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) through oneDNN, no autograd: x [..., in], weight [out, in], either may be a strided
    view (callers check `runs_here`)."""
    if torch.compiler.is_compiling():
        return _opaque_product(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def product_add(x: torch.Tensor, weight: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """other + x @ weight^T in one oneDNN call (the sum rides in the product's epilogue), no autograd."""
    if torch.compiler.is_compiling():
        return other + _opaque_product(x, weight, None)
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, "add")


# NOTE: inside torch.compile the product is an op of its own, which inductor calls as it is: inductor's CPU lowering
# of mkldnn._linear_pointwise expects a weight it has packed itself, and lowering F.linear instead would call MKL.
@torch.library.custom_op("megatrain_cpu::linear_product", mutates_args=())
def _opaque_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_opaque_product.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def runs_here(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes oneDNN's product for these tensors."""
    return (_AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not hasattr(weight, "ds_id"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN on a CPU in fp32."""
    if not runs_here(x, weight) or x.numel() == 0:
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        return product(x, weight, bias)
    return _Linear.apply(x, weight, bias)


class _Linear(torch.autograd.Function):
    """y = x W^T + b with all three products through oneDNN: dx = g W, dW = g^T x (as [out, N] against [in, N]),
    db = the column sums of g. Only the gradients asked for are computed (a frozen weight costs no dW)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # only what a gradient asked for reads: a frozen layer (LoRA's base) keeps no input alive, as F.linear's
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = product(g, weight.t())
        want_w, want_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if want_w or want_b:  # (g as rows, a copy where g is strided: not for a frozen layer, as under LoRA)
            g2 = g.reshape(-1, g.shape[-1])
            grad_w = product(g2.t(), x.reshape(-1, x.shape[-1]).t()) if want_w else None
            grad_b = g2.sum(0) if want_b else None
        return grad_x, grad_w, grad_b


@functools.cache  # (once a process)
def register_flop_formulas() -> None:
    """Let torch's FlopCounterMode count oneDNN's products (2 * rows * in * out each), as it counts aten::mm. Not
    done at import: torch.utils.flop_counter takes most of a second to import."""
    from torch.utils.flop_counter import register_flop_formula

    def count(x_shape, second, third, *args, **kwargs) -> int:
        # (x, weight, bias, ...) for product; (x, other, weight, ...) for product_add, whose third is 2-d
        w_shape = third if third is not None and len(third) == 2 else second
        return 2 * (math.prod(x_shape) // x_shape[-1]) * w_shape[0] * w_shape[1]

    register_flop_formula(torch.ops.mkldnn._linear_pointwise)(count)
