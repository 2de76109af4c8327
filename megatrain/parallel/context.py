"""Context parallelism (DeepSpeed-Ulysses): each sample's sequence split over `parallel.cp` ranks.

Outside attention a rank holds T/cp consecutive tokens of every row of its micro-batch: the embedding, norms, MLP,
LM head and loss run on those alone, so activations are 1/cp of the sequence's. Attention needs every key: q, k, v
[B, T/cp, heads, head_dim] (RoPE already applied at the tokens' global positions) become [B, T, heads/cp, head_dim]
by one all-to-all each, megatrain's own attention runs on whole sequences of those heads (SDPA, windows,
soft-capping, documents: model.Attention.attend, unchanged), and one all-to-all brings the output back to
[B, T/cp, heads, head_dim]. The all-to-alls are differentiable (the backward sends the gradients back).

The all-to-alls are DeepSpeed's `DistributedAttention` (deepspeed/sequence/layer.py): its layout with batch first
(scatter the heads, gather the sequence) is megatrain's [B, T, heads, head_dim] as it is, it takes the local
attention as a callable with extra arguments (the documents, causality), and its rotary option is not needed (RoPE
is applied before, on this rank's tokens, at their global positions).

GQA: the query heads of one KV head are consecutive, and the all-to-all hands rank c heads [c H/cp, (c+1) H/cp) of
the queries and [c K/cp, (c+1) K/cp) of the keys and values, which are then exactly their KV heads. When a TP rank
has fewer KV heads than that split needs (K not a multiple of cp), each KV head is repeated r times beside itself
first (r = cp / gcd(K, cp)); autograd sums the copies' gradients back.

The cp ranks of a group are consecutive data-parallel ranks of one (pipeline stage, TP rank), so DeepSpeed sees them
as data-parallel ranks: ZeRO partitions over them and the gradients are averaged over them, which the training
loop's normalisation expects (each rank's loss is over its slice's targets, weighted by the whole batch's count).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.config import kv_repeat


def context_groups(grid, tp: int, pp: int, dp: int, cp: int):
    """This rank's context-parallel group. Collective: every rank creates every group, in the same order."""
    topo = grid.topology()
    mine, me = None, dist.get_rank()
    for stage in range(pp):
        for t in range(tp):
            ranks = [topo.get_rank(pipe=stage, data=d, model=t) for d in range(dp)]
            for j in range(dp // cp):  # consecutive data-parallel ranks
                members = ranks[j * cp:(j + 1) * cp]
                g = dist.new_group(members)
                if me in members:
                    mine = g
    return mine


class UlyssesAttention:
    """An Attention's `context` hook: (q, k, v [B, T/cp, heads, hd], *attend's arguments) -> [B, T/cp, heads, hd],
    attention over the whole sequence. A plain object (not a module): nothing of it is saved."""

    def __init__(self, attend, group, repeat: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.repeat = repeat
        self.exchange = DistributedAttention(attend, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args) -> torch.Tensor:
        if self.repeat > 1:
            k, v = (t.repeat_interleave(self.repeat, dim=2) for t in (k, v))
        return self.exchange(q, k, v, 0, None, *args)  # batch dimension 0; no rotary (applied before)


def apply_cp(model, group) -> None:
    """Split every attention of `model` (after apply_tp: its heads are this TP rank's) over the context-parallel
    `group`, and tell the model which slice of each row's tokens it is given (its positions are global)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    if cp == 1:
        return
    model.context_shard = (rank, cp)
    for block in model.layers:
        a = block.attn
        a.context = UlyssesAttention(a.attend, group, kv_repeat(a.n_kv, cp))


def describe_cp(n_kv: int, tp: int, cp: int) -> str:
    """The start-up line's words on context parallelism (the KV heads repeated, when they are)."""
    k = n_kv // tp
    r = kv_repeat(k, cp)
    extra = f"; a TP rank's {k} KV heads each repeated x{r} to share them over {cp} ranks" if r > 1 else ""
    return f"context parallel {cp} (Ulysses all-to-all: {k * r // cp} KV heads per rank in attention{extra})"
