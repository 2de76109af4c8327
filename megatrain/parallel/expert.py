"""Expert parallelism: each MoE layer's experts spread over `parallel.ep` ranks, tokens sent to them by all-to-all.

The ep ranks of an expert-parallel group are consecutive data-parallel ranks of one (pipeline stage, TP rank):
data-parallel rank d is EP rank d % ep of group d // ep, and the ranks holding the same experts (one of each EP
group: d % ep alike) form its expert-data-parallel group, dp / ep ranks, as in DeepSpeed-MoE (EP x expert-DP = DP).
EP rank e holds experts [e x E/ep, (e+1) x E/ep) of every MoE layer, each still TP-split.

A step of one MoE layer (dispatch below): this rank's rows, sorted by expert, go to the ranks holding their experts
(the counts first, then the rows, uneven splits as they come), the local experts run on what arrived (re-sorted by
local expert: one grouped matmul), and the outputs travel back the same way. Both all-to-alls are differentiable.

The gradients: an expert's gradient is summed over the expert-data-parallel group (its replicas) and divided by dp,
as the dense ones are averaged over dp: its rows came from ep data-parallel ranks' batches. DeepSpeed does this for
parameters marked as its MoE does (`allreduce = False`, `group_name`) once the engine knows the model has MoE layers
and the groups exist under that name (deepspeed.utils.groups); ZeRO-1/2 then partition the experts' optimizer state
over the expert-data-parallel group. `apply_ep` marks them and registers the groups.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from megatrain.moe import moe_layers
from megatrain.parallel.sharding import is_expert_param

GROUP_NAME = "megatrain_ep"  # the name DeepSpeed files the groups and the expert parameters under


def expert_groups(grid, tp: int, pp: int, dp: int, ep: int):
    """(this rank's expert-parallel group, its expert-data-parallel group). Collective: every rank creates every
    group, in the same order, as torch.distributed.new_group requires."""
    topo = grid.topology()
    mine_ep = mine_edp = None
    me = dist.get_rank()
    for stage in range(pp):
        for t in range(tp):
            ranks = [topo.get_rank(pipe=stage, data=d, model=t) for d in range(dp)]
            for j in range(dp // ep):  # EP groups: consecutive data-parallel ranks
                members = ranks[j * ep:(j + 1) * ep]
                g = dist.new_group(members)
                if me in members:
                    mine_ep = g
            for e in range(ep):  # expert-data-parallel groups: every ep-th
                members = ranks[e::ep]
                g = dist.new_group(members)
                if me in members:
                    mine_edp = g
    return mine_ep, mine_edp


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends the gradients back the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        back = g.new_empty((sum(ctx.send),) + tuple(g.shape[1:]))
        dist.all_to_all_single(back, g.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return back, None, None, None


class AllToAllDispatch:
    """MoE.dispatch under expert parallelism: rows [N, d] sorted by (global) expert, counts [E] -> the outputs of
    their experts, computed on the ranks that hold them, in the same order."""

    def __init__(self, group, n_experts: int):
        self.group, self.ep = group, dist.get_world_size(group)
        self.n_experts, self.local = n_experts, n_experts // self.ep

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        # how many rows this rank sends each peer's experts, and receives from each peer for its own: [ep, E/ep]
        counts = counts.to(torch.int64)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # (one of every peer's counts of my experts)
        received = received.view(self.ep, self.local)
        send = counts.view(self.ep, self.local).sum(1).tolist()
        recv = received.sum(1).tolist()
        arrived = _AllToAll.apply(rows, send, recv, self.group)  # by source rank, then by my local expert
        # by local expert for the grouped matmul (stable: each expert's rows keep their source order)
        local_expert = torch.repeat_interleave(torch.arange(self.local, device=rows.device).repeat(self.ep),
                                               received.flatten().to(rows.device))
        order = torch.argsort(local_expert, stable=True)
        out = experts(arrived[order], received.sum(0))
        back = torch.empty_like(out).index_copy(0, order, out)  # the arrival order again
        return _AllToAll.apply(back, recv, send, self.group)


@functools.lru_cache(maxsize=1)
def _marker_class() -> type:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        """What makes DeepSpeed's engine treat the model as a MoE model (has_moe_layers: it looks for instances of
        its MoE class): an instance of a subclass of it with no parameters and no forward, a child of the model.
        The experts themselves stay megatrain's."""

        def __init__(self, n_experts: int, ep: int):
            nn.Module.__init__(self)  # (not DeepSpeed's: it would build experts of its own)
            self.num_experts, self.ep_size = n_experts, ep
            self.num_local_experts = n_experts // ep
            self.expert_group_name = GROUP_NAME

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # the groups exist already (apply_ep registered them)

        def forward(self, *args):
            raise RuntimeError("the DeepSpeed MoE marker does not compute: megatrain's MoE layers do")

    return DeepSpeedMoEMarker


def register_groups(ep_group, edp_group) -> None:
    """File the groups where DeepSpeed's engine and ZeRO look for them (deepspeed.utils.groups, under GROUP_NAME)."""
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[GROUP_NAME] = ep_group
    groups._EXPERT_DATA_PARALLEL_GROUP[GROUP_NAME] = edp_group


def mark_expert_param(p: nn.Parameter) -> nn.Parameter:
    """An expert parameter for DeepSpeed: reduced over its expert-data-parallel group, not the data-parallel one."""
    p.allreduce = False
    p.group_name = GROUP_NAME
    return p


def apply_ep(model: nn.Module, ep_group, edp_group) -> nn.Module:
    """Keep this EP rank's experts of every MoE layer (slicing a model with values; a meta-built one gets the local
    shapes, filled later by materialize/fill), route through the all-to-all, mark the expert parameters for DeepSpeed
    and register the groups. NOTE: after apply_tp (it rebuilds the parameters it cuts, whose marks would be lost) and
    before deepspeed.initialize."""
    ep, e = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    layers = moe_layers(model)
    if not layers:
        raise ValueError("apply_ep: the model has no MoE layers")
    for _, m in layers:
        m.dispatch = AllToAllDispatch(ep_group, m.n_experts)
        for name, p in list(m.experts.named_parameters(recurse=False)):
            mine = p.detach()[local_experts(m.n_experts, ep, e)].clone()
            new = nn.Parameter(mine, requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)
            setattr(m.experts, name, mark_expert_param(new))
    register_groups(ep_group, edp_group)
    model.deepspeed_moe_marker = _marker_class()(layers[0][1].n_experts, ep)
    return model


def local_experts(n_experts: int, ep: int, ep_rank: int) -> slice:
    """The experts EP rank `ep_rank` holds (along the expert dimension)."""
    local = n_experts // ep
    return slice(ep_rank * local, (ep_rank + 1) * local)


def experts_of(full: torch.Tensor, name: str, experts: slice | None) -> torch.Tensor:
    """`experts` of an expert weight (is_expert_param: a view along EXPERT_DIM); any other tensor, or experts None,
    whole. apply_ep, parallelize's fill and the checkpoint writer cut with it."""
    return full[experts] if experts is not None and is_expert_param(name) else full
