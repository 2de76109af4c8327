"""Megatron-style tensor-parallel layers, written out with explicit autograd.

Column-parallel linear: each TP rank holds a slice of the output features; row-parallel linear: a slice
of the input features, and the partial outputs are summed over the TP group. An MLP or attention block
is column -> (local work) -> row, so it needs one all-reduce forward and one backward.

With sequence parallelism the activations between those regions are split along the sequence (dim 1)
instead of replicated: the all-reduce becomes reduce-scatter + all-gather, and norms/dropout run on
1/tp of the tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatrain.cpu_linear import linear
from megatrain.heads import add_lora_update
# the vocab-parallel loss is the reference of the fused one (kernels/ops.py falls back to it): it lives with it
from megatrain.kernels.reference import vocab_parallel_cross_entropy  # noqa: F401

# -- collectives (gloo lacks reduce_scatter: fall back to all_reduce + slice) --------------------------


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _world(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _world(group)
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _world(group)
    if n == 1:
        return x
    if dist.get_backend(group) == "nccl":
        out = torch.empty_like(x.chunk(n, dim=dim)[0])
        dist.reduce_scatter(out, [c.contiguous() for c in x.chunk(n, dim=dim)], group=group)
        return out
    return _split(_all_reduce(x.clone(), group), dim, group)


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the TP group (entering a column-parallel region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: sum partial outputs over the TP group (leaving a row-parallel region). Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    """Sequence parallel, entering a TP region: all-gather along the sequence; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, 1, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Sequence parallel, leaving a TP region: reduce-scatter along the sequence; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """Split a replicated activation along the sequence; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def gather_seq(x, group):
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x, group):
    return _ReduceScatterSeq.apply(x, group)


def scatter_seq(x, group):
    return _ScatterSeq.apply(x, group)


def mark_tp(p: nn.Parameter) -> nn.Parameter:
    """Tell DeepSpeed (grad norm, clipping) this parameter is split across TP ranks, not replicated."""
    p.tensor_model_parallel = True
    p.model_parallel = True
    return p


def mark_partial_grad(p: nn.Parameter) -> nn.Parameter:
    """A replicated parameter whose gradient each TP rank sees only part of (a norm on sequence shards, a per-head
    norm on this rank's heads): parallelize sums it over the TP group in backward, so the replicas stay equal."""
    p.tp_partial_grad = True
    return p


# -- layers ------------------------------------------------------------------------------------------


class _LoRA(nn.Module):
    """LoRA factors on a TP layer: y += scale * (drop(x) A^T) B^T (heads.add_lora_update), A and B split as
    parallel/sharding.py says."""

    def _init_lora(self, lora: dict | None, a_split: bool) -> None:
        self.lora_A = self.lora_B = None
        if lora is None:
            return
        self.lora_A = nn.Parameter(lora["A"].detach().clone())
        self.lora_B = nn.Parameter(lora["B"].detach().clone())
        self.lora_scale, self.lora_dropout = lora["scale"], nn.Dropout(lora["dropout"])
        mark_tp(self.lora_A) if a_split else mark_tp(self.lora_B)
        if self.sequence_parallel:  # computed on sequence shards: each rank's gradient is a partial sum
            mark_partial_grad(self.lora_B if a_split else self.lora_A)


class ColumnParallelLinear(_LoRA):
    """y = x @ W_r^T (+ b_r): this rank's slice of the output features. `weight` is [out/tp, in]. With LoRA, A is
    whole on every rank (its product with x enters the TP region like x) and B holds this rank's rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sequence_parallel: bool = False,
                 lora: dict | None = None):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = mark_tp(nn.Parameter(weight.detach().clone()))
        self.bias = mark_tp(nn.Parameter(bias.detach().clone())) if bias is not None else None
        self._init_lora(lora, a_split=False)

    def _enter(self, x):
        return gather_seq(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)

    def forward(self, x):
        y = linear(self._enter(x), self.weight, self.bias)
        if self.lora_A is not None:
            u = self._enter(linear(self.lora_dropout(x), self.lora_A))
            y = add_lora_update(y, u, self.lora_B, self.lora_scale)
        return y


class RowParallelLinear(_LoRA):
    """y = sum_r x_r @ W_r^T + b: this rank holds input-feature slice r; `weight` is [out, in/tp]. The bias
    is replicated and added once, after the reduction. With LoRA, A holds this rank's columns (x_r A_r^T are partial
    sums, reduced like the output) and B is whole on every rank."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sequence_parallel: bool = False,
                 lora: dict | None = None):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = mark_tp(nn.Parameter(weight.detach().clone()))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        if self.bias is not None and sequence_parallel:
            mark_partial_grad(self.bias)
        self._init_lora(lora, a_split=True)

    def _reduce(self, y):
        return reduce_scatter_seq(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)

    def forward(self, x):
        y = self._reduce(linear(x, self.weight))
        if self.lora_A is not None:
            u = self._reduce(linear(self.lora_dropout(x), self.lora_A))
            y = add_lora_update(y, u, self.lora_B, self.lora_scale)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """This rank holds rows [start, start + V/tp) of the embedding; ids outside look up zeros and the
    partial embeddings are summed over the TP group (reduce-scattered along the sequence with SP)."""

    def __init__(self, weight: torch.Tensor, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = mark_tp(nn.Parameter(weight.detach().clone()))
        self.start = dist.get_rank(group) * weight.shape[0]

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_seq(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)
