"""A checkpoint's optimizer state into a live engine of any layout: the fp32 master weights, AdamW's two moments and
step count, and the learning-rate schedule, each parameter's full tensors read through the one reader and cut to
this rank's slice by the sharding table. `megatrain convert reshard` (convert/writer.py) and an elastic resume
(training/elastic.py) both fill their engines through it, through DeepSpeed's public safe_set_full_* API."""
from __future__ import annotations

import torch

from megatrain.checkpoint.reader import KEYS, CheckpointReader
from megatrain.config import Config
from megatrain.parallel.expert import experts_of, local_experts
from megatrain.parallel.sharding import canonical_name, shard, split_of


def layout_words(cfg: Config, world: int) -> str:
    p = cfg.parallel
    return f"tp {p.tp} x pp {p.pp} x dp {world // (p.tp * p.pp)}, ZeRO-{p.zero_stage}"


def _local_names(engine, n_layers: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The engine's parameters under the model's own names (a PipelineModule numbers its layers)."""
    out, seen = [], set()
    for name, p in engine.module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((canonical_name(name, n_layers), p))
    return out


def set_optimizer_state(engine, run, reader: CheckpointReader) -> None:
    """The source's fp32 masters, AdamW moments, step count and LR schedule, into this rank's engine."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    tp, r = run.layout.tp, run.tp_rank
    step = torch.tensor(reader.optimizer_step() or float(reader.state.get("step", 0)))
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO wraps torch's AdamW; without ZeRO (fp32) it is the optimizer
    zero = run.cfg.parallel.zero_stage
    if zero == 3:
        flats = opt.fp32_partitioned_groups_flat
    elif zero in (1, 2):
        flats = opt.single_partition_of_fp32_groups
    else:
        flats = None
    if flats is not None:  # ZeRO keeps AdamW's state per flat fp32 partition; it exists only after a first step
        for flat in flats:
            base.state[flat] = {"step": step.clone(), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
        if zero in (1, 2):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
    cfg_model = run.cfg.model
    masters = {id(p): m for p, m in _zero0_masters(opt)}
    ep = run.cfg.parallel.ep  # this rank's experts under expert parallelism (None: every expert)
    experts = local_experts(cfg_model.moe_experts, ep, run.ep_rank) if ep > 1 else None
    for name, p in _local_names(engine, cfg_model.n_layers):
        if not p.requires_grad or not reader.has(name, "exp_avg"):
            continue  # frozen (LoRA's base weights): its value came with the model, there are no moments
        values = {k: shard(experts_of(reader.tensor(name, k), name, experts), split_of(name, cfg_model), tp, r)
                  for k in KEYS}
        if flats is not None:
            safe_set_full_fp32_param(p, values["fp32"])
            for k in KEYS[1:]:
                safe_set_full_optimizer_state(p, values[k], k)
        else:
            master = masters.get(id(p), p)
            with torch.no_grad():
                master.copy_(values["fp32"])
            base.state[master] = {"step": step.clone(), **{k: values[k].clone() for k in KEYS[1:]}}
    sched = engine.lr_scheduler
    if sched is not None and reader.lr_scheduler_state:
        # one schedule for every group; the number of groups follows the layout (expert parallelism adds its own)
        state, n = dict(reader.lr_scheduler_state), len(base.param_groups)
        for k in ("base_lrs", "_last_lr", "lr_lambdas"):
            if isinstance(state.get(k), list) and len(state[k]) != n:
                state[k] = state[k][:1] * n
        sched.load_state_dict(state)
        for group, lr in zip(base.param_groups, sched.get_last_lr()):
            group["lr"] = lr


def _zero0_masters(opt) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Without ZeRO, bf16/fp16 training keeps fp32 masters beside the module's parameters (fp32_groups)."""
    fp32 = getattr(opt, "fp32_groups", None)
    lp = getattr(opt, "bf16_groups", None) or getattr(opt, "fp16_groups", None)
    if not fp32 or not lp:
        return []
    return [(p, m) for pg, mg in zip(lp, fp32) for p, m in zip(pg, mg)]
