"""What the MoE layers saw, for the log line's row: per layer, the tokens each expert received (the lowest and highest
count over the experts, per step, and their coefficient of variation), the rows the capacity dropped and the
auxiliary losses; and over every layer, the worst load, the dropped rows and the mean losses.

Each rank counts the routing of its own tokens over every expert (before any expert parallelism moves them), so the
counts add up over the data-parallel ranks; the TP ranks of a replica route the same tokens, so one of them speaks;
each pipeline stage has its own layers, all gathered to rank 0.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.moe import take_stats


def moe_row(module: torch.nn.Module, grid, steps: int) -> dict:
    """The window's figures (`steps` optimizer steps) as metrics.jsonl keys. Every rank of a MoE model calls it
    (collectives; a pipeline stage without MoE layers too); rank 0's return value holds them."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    mine = {}
    for layer, s in take_stats(module).items():
        if s.load is None:
            continue
        packed = torch.cat([s.load.double().flatten(), torch.stack([torch.as_tensor(v, dtype=torch.float64)
                                                                    for v in (s.dropped, s.aux, s.z, s.calls)])])
        mine[layer] = packed.cpu()
    if distributed:
        dp_group = grid.get_data_parallel_group()
        for packed in mine.values():
            if dist.get_world_size(dp_group) > 1:
                dist.all_reduce(packed, group=dp_group)
        speaker = grid.get_data_parallel_rank() == 0 and grid.get_slice_parallel_rank() == 0
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine if speaker else {})
        mine = {k: v for part in gathered for k, v in part.items()}
    row, worst_cv, worst_max, dropped, aux, z = {}, 0.0, 0.0, 0.0, [], []
    for layer in sorted(mine):
        packed = mine[layer]
        load, (d, a, zz, calls) = packed[:-4], packed[-4:].tolist()
        per_step = load / steps
        mean = float(per_step.mean())
        cv = float(per_step.std(unbiased=False)) / mean if mean else 0.0
        row.update({f"moe.{layer}.tokens_min": float(per_step.min()), f"moe.{layer}.tokens_max": float(per_step.max()),
                    f"moe.{layer}.load_cv": cv, f"moe.{layer}.dropped": d / steps,
                    f"moe.{layer}.aux": a / max(calls, 1), f"moe.{layer}.z": zz / max(calls, 1)})
        worst_cv, worst_max = max(worst_cv, cv), max(worst_max, float(per_step.max()) / mean if mean else 0.0)
        dropped += d / steps
        aux.append(a / max(calls, 1))
        z.append(zz / max(calls, 1))
    if not row:
        return {}
    # the summary the console line and the default plot show: the worst layer's balance, the rows dropped a step
    row.update(moe_load_cv=worst_cv, moe_load_max=worst_max, moe_dropped=dropped, moe_aux=sum(aux) / len(aux),
               moe_z=sum(z) / len(z))
    return row
