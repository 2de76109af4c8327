"""Autograd wrappers around torch.ops.megatrain, each with the reference as its fallback.

Every public function takes the same arguments as its twin in reference.py and returns the same thing. An op
runs its kernels only where the extension has them for the tensor's device and dtype and they passed the
self-check on first use (selfcheck.py, with the cases at the end of this file).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain import cpu_linear
from megatrain.kernels import reference, selfcheck, use_fused

IGNORE_INDEX = -100


def _ops():
    return torch.ops.megatrain


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _fused(op: str, x: torch.Tensor, group=None) -> bool:
    """Whether `op` runs its kernels on x: the extension has them for x's device and dtype, and they agreed with
    the reference the first time this process used them there."""
    return use_fused(x) and selfcheck.passed(op, SELF_CHECKS[op], x.device, x.dtype, group)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _ops().rms_norm_fwd(_rows(x), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _ops().rms_norm_bwd(_rows(dy), _rows(x), weight, rstd)
        return dx.view_as(x), dw, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _ops().layer_norm_fwd(_rows(x), weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _ops().layer_norm_bwd(_rows(dy), _rows(x), weight, mean, rstd)
        return dx.view_as(x), dw, (db if ctx.has_bias else None), None


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _ops().rope(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _ops().rope(dy.contiguous(), cos, sin, True), None, None  # rotate back by -theta


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _ops().swiglu_fwd(gate_up)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return _ops().swiglu_bwd(dy, gate_up)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return _ops().bias_gelu_fwd(x, bias)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = _ops().bias_gelu_bwd(dy, x, bias)
        return dx, db


def _no_grad(*tensors) -> bool:
    """No gradient will flow through these (inference, decoding): the kernels' forward is called directly, without
    an autograd.Function's bookkeeping, which costs as much as the kernel on a decode step's small tensors."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def rms_norm(x, weight, eps: float):
    if not _fused("rms_norm", x):
        return reference.rms_norm(x, weight, eps)
    if _no_grad(x, weight):
        return _ops().rms_norm_fwd(_rows(x), weight, eps)[0].view_as(x)
    return _RMSNorm.apply(x, weight, eps)


def layer_norm(x, weight, bias, eps: float):
    if not _fused("layer_norm", x):
        return reference.layer_norm(x, weight, bias, eps)
    if _no_grad(x, weight, bias):
        return _ops().layer_norm_fwd(_rows(x), weight, bias, eps)[0].view_as(x)
    return _LayerNorm.apply(x, weight, bias, eps)


def rope(x, cos, sin):
    """x [B, T, H, D] (last dim contiguous, e.g. a view of the fused QKV output) -> contiguous [B, T, H, D].
    cos/sin [T, D], or [B, T, D] for positions that differ by row (packed examples: the reference path)."""
    if x.stride(-1) != 1 or cos.dim() == 3 or not _fused("rope", x):
        return reference.rope(x, cos, sin)
    cos, sin = cos[: x.shape[1]], sin[: x.shape[1]]
    if _no_grad(x):
        return _ops().rope(x, cos, sin, False)
    return _Rope.apply(x, cos, sin)


def swiglu(gate_up):
    if not _fused("swiglu", gate_up):
        return reference.swiglu(gate_up)
    return _ops().swiglu_fwd(gate_up) if _no_grad(gate_up) else _SwiGLU.apply(gate_up)


def bias_gelu(x, bias):
    if not _fused("bias_gelu", x):
        return reference.bias_gelu(x, bias)
    return _ops().bias_gelu_fwd(x, bias) if _no_grad(x, bias) else _BiasGelu.apply(x, bias)


# -- softmax cross-entropy: statistics forward, gradient written over the logits backward --------------


def _combine_stats(logits, labels, vocab_start: int, ignore_index: int, group):
    """Row log-sum-exp, target logit and logit sum over the whole (possibly TP-split) vocabulary."""
    mx, sumexp, target, total = _ops().ce_stats(logits, labels, vocab_start, ignore_index)
    if group is not None and dist.get_world_size(group) > 1:
        gmax = mx.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([sumexp * torch.exp(mx - gmax), target, total])
        dist.all_reduce(both, group=group)
        sumexp, target, total, mx = both[0], both[1], both[2], gmax
    return mx + torch.log(sumexp), target, total


class _CrossEntropy(torch.autograd.Function):
    """Mean over non-ignored rows of [rows, V_local] logits. Saves the logits and one number per row;
    the backward writes d loss / d logits into the logits' own storage when it may (no probabilities
    tensor is ever stored)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, smoothing, group, inplace):
        V_local = logits.shape[-1]
        n = dist.get_world_size(group) if group is not None else 1
        start = dist.get_rank(group) * V_local if n > 1 else 0
        lse, target, total = _combine_stats(logits, labels, start, ignore_index, group)
        valid = labels != ignore_index
        V = V_local * n
        per_row = (1 - smoothing) * (lse - target) + smoothing * (lse - total / V)
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.meta = (start, ignore_index, smoothing, V, inplace, count)
        return (per_row * valid).sum() / count

    @staticmethod
    def backward(ctx, g):
        logits, labels, lse = ctx.saved_tensors
        start, ignore_index, smoothing, V, inplace, count = ctx.meta
        grad_rows = (g / count).expand(lse.shape).to(lse.dtype).contiguous()
        d = _ops().ce_grad(logits, labels, lse, grad_rows, start, ignore_index, smoothing, V, inplace)
        return d, None, None, None, None, None


def _check_labels(labels, vocab: int, ignore_index: int) -> None:
    """A label outside [0, vocab) (other than ignore_index) would read as a zero logit here: refuse it. Asserted on
    the device (no host sync on GPU, where it stops the kernel stream; an immediate error on CPU)."""
    ok = ((labels >= 0) & (labels < vocab)) | (labels == ignore_index)
    torch._assert_async(ok.all(), f"cross-entropy: a label outside the vocabulary [0, {vocab}) (the data's token ids "
                                  f"exceed model.vocab_size?)")


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                  group=None, inplace_backward: bool = False):
    """Fused softmax cross-entropy; with `group`, over logits split along the vocabulary across it.
    inplace_backward=True lets the backward overwrite the logits (only when nothing else needs them)."""
    rows = _rows(logits)
    if group is not None or use_fused(logits):  # the plain cross-entropy checks its labels itself
        _check_labels(labels, logits.shape[-1] * (dist.get_world_size(group) if group is not None else 1), ignore_index)
    if not rows.is_contiguous() or not _fused("cross_entropy", logits, group):
        if group is not None and dist.get_world_size(group) > 1:
            return reference.vocab_parallel_cross_entropy(logits, labels, group, ignore_index)
        return reference.cross_entropy(logits, labels, ignore_index, label_smoothing)
    return _CrossEntropy.apply(rows, labels.reshape(-1), ignore_index, label_smoothing, group, inplace_backward)


class _LinearCrossEntropy(torch.autograd.Function):
    """LM head + cross-entropy over row chunks: each chunk's logits live only while that chunk's loss and
    gradients are computed, so peak memory holds [chunk, vocab] logits instead of [tokens, vocab]. The
    gradients w.r.t. hidden and weight are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, smoothing, chunk):
        N, V = hidden.shape[0], weight.shape[0]
        valid = labels != ignore_index
        count = valid.sum().clamp(min=1)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        d_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        d_weight = None  # the first chunk's product, the others' added into it (no zero fill of a [V, d] tensor)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        onednn = cpu_linear.runs_here(hidden, weight)  # (the three products through oneDNN on a CPU in fp32)
        for s in range(0, N, chunk):
            h, y = hidden[s: s + chunk], labels[s: s + chunk]
            logits = cpu_linear.product(h, weight) if onednn else h @ weight.t()
            lse, target, total = _combine_stats(logits, y, 0, ignore_index, None)
            v = y != ignore_index
            loss += (((1 - smoothing) * (lse - target) + smoothing * (lse - total / V)) * v).sum()
            ones = torch.full(lse.shape, 1.0, dtype=lse.dtype, device=lse.device)
            d_logits = _ops().ce_grad(logits, y, lse, ones, 0, ignore_index, smoothing, V, True)  # in place
            if d_hidden is not None:
                if onednn:
                    d_hidden[s: s + chunk] = cpu_linear.product(d_logits, weight.t())
                else:
                    torch.mm(d_logits, weight, out=d_hidden[s: s + chunk])
            if weight.requires_grad:
                if onednn:
                    d_weight = (cpu_linear.product(d_logits.t(), h.t()) if d_weight is None
                                else cpu_linear.product_add(d_logits.t(), h.t(), d_weight))
                elif d_weight is None:
                    d_weight = d_logits.t().to(acc) @ h.to(acc)
                else:
                    d_weight.addmm_(d_logits.t().to(acc), h.to(acc))
        if weight.requires_grad and d_weight is None:  # (no rows)
            d_weight = torch.zeros_like(weight, dtype=acc)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.count, ctx.w_dtype = count, weight.dtype
        ctx.has = (d_hidden is not None, d_weight is not None)
        return loss / count

    @staticmethod
    def backward(ctx, g):
        d_hidden, d_weight = ctx.saved_tensors
        scale = g / ctx.count
        dh = d_hidden * scale.to(d_hidden.dtype) if ctx.has[0] else None
        dw = (d_weight * scale).to(ctx.w_dtype) if ctx.has[1] else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                         chunk: int = 1024):
    """Cross-entropy of hidden @ weight.T against labels without materialising the full logits."""
    if not _fused("linear_cross_entropy", hidden):
        return reference.linear_cross_entropy(hidden, weight, labels, ignore_index, label_smoothing)
    _check_labels(labels, weight.shape[0], ignore_index)
    return _LinearCrossEntropy.apply(_rows(hidden), weight, labels.reshape(-1), ignore_index, label_smoothing, chunk)


# -- the self-check's cases (selfcheck.py): tiny inputs of odd widths, the kernels called directly ------------------

_T, _D, _V = 7, 37, 301  # rows, features, vocabulary: small, and not multiples of any block size


def _rope_case(draw):
    cos, sin = (t.to(draw.device, draw.dtype) for t in reference.rope_tables(10, _T, 10000.0))
    return _Rope.apply, reference.rope, (draw.floats(2, _T, 3, 10), cos, sin)


SELF_CHECKS = {  # op -> draw -> (fused fn, reference fn, inputs)
    "rms_norm": lambda d: (_RMSNorm.apply, reference.rms_norm, (d.floats(3, _T, _D), d.floats(_D), 1e-5)),
    "layer_norm": lambda d: (_LayerNorm.apply, reference.layer_norm,
                             (d.floats(3, _T, _D), d.floats(_D), d.floats(_D), 1e-5)),
    "rope": _rope_case,
    "swiglu": lambda d: (_SwiGLU.apply, reference.swiglu, (d.floats(3, _T, 2 * _D),)),
    "bias_gelu": lambda d: (_BiasGelu.apply, reference.bias_gelu, (d.floats(3, _T, _D), d.floats(_D))),
    "cross_entropy": lambda d: (lambda x, y: _CrossEntropy.apply(x, y, IGNORE_INDEX, 0.1, None, False),
                                lambda x, y: reference.cross_entropy(x, y, IGNORE_INDEX, 0.1),
                                (d.floats(3 * _T, _V, scale=3.0), d.labels(3 * _T, _V))),
    "linear_cross_entropy": lambda d: (lambda h, w, y: _LinearCrossEntropy.apply(h, w, y, IGNORE_INDEX, 0.1, 8),
                                       lambda h, w, y: reference.linear_cross_entropy(h, w, y, IGNORE_INDEX, 0.1),
                                       (d.floats(3 * _T, _D), d.floats(_V, _D, scale=0.2), d.labels(3 * _T, _V))),
}
