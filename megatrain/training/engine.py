"""The DeepSpeed engine: its JSON config filled from megatrain's, AdamW groups, the LR schedule.

The ZeRO JSONs in ds_configs/ hold what is specific to each stage; every field that megatrain's config
also decides (batch sizes, accumulation, clipping, precision) is overwritten from it here, so the two can
never disagree.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from megatrain.config import Config, ConfigError, shipped_dir, validate_world
from megatrain.parameters import decay_groups, ndim, numel


def find_shipped(folder: str, name: str) -> Path:
    """A file from ds_configs/ (or configs/), wherever this install keeps them."""
    path = shipped_dir(folder) / name
    if not path.is_file():
        raise ConfigError(f"{folder}/{name} not found: reinstall megatrain (pip install -e .)")
    return path


@functools.lru_cache(maxsize=16)
def _shipped_text(folder: str, name: str) -> str:
    return find_shipped(folder, name).read_text()


PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision's tensors


def resolve_precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def effective_zero_stage(cfg: Config, dp: int, pp: int, precision: str | None = None) -> int:
    """The ZeRO stage a run uses: parallel.zero_stage, or 0 where ZeRO-1/2 has nothing to partition: one
    data-parallel rank (dp counts the context-parallel ranks too), no pipeline, fp32 and no optimizer offload. There
    DeepSpeed's ZeRO optimizer would only copy every gradient into its buckets and keep a second fp32 copy of the
    weights, where ZeRO-0 steps the torch optimizer on the weights themselves (SkipNonFinite below): the same
    updates, sooner and in less memory."""
    p = cfg.parallel
    fp32 = (precision or resolve_precision(cfg)) == "fp32"
    if p.zero_stage in (1, 2) and dp == 1 and pp == 1 and not p.offload_optimizer and fp32:
        return 0
    return p.zero_stage


DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size when a ZeRO JSON sets none


def deepspeed_config(cfg: Config, world_size: int, local_params: int | None = None) -> dict:
    """The DeepSpeed JSON for this run; `local_params` (the parameters on this rank, once the model exists) caps
    ZeRO's gradient bucket."""
    p = cfg.parallel
    name = "zero3_offload.json" if (p.zero_stage == 3 and (p.offload_params or p.offload_optimizer)) else f"zero{p.zero_stage}.json"
    ds = json.loads(_shipped_text("ds_configs", name))
    grad_accum = validate_world(cfg, world_size)  # data-parallel size = world / (tp x pp)
    precision = resolve_precision(cfg)
    ds.update(
        # DeepSpeed counts a sample per data-parallel rank: the cp ranks sharing one count cp times
        train_batch_size=cfg.train.global_batch_size * p.cp,
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        # fp32 without ZeRO or a pipeline, SkipNonFinite clips (see there); DeepSpeed's clip would loop over the
        # parameters in Python
        gradient_clipping=0.0 if clips_in_skip_non_finite(cfg) else cfg.train.grad_clip,
    )
    ds["bf16"]["enabled"] = precision == "bf16"
    ds["fp16"]["enabled"] = precision == "fp16"
    zero = ds["zero_optimization"]
    if local_params is not None and p.zero_stage >= 1:
        # DeepSpeed allocates the bucket whole, reduce_bucket_size elements (ZeRO-3 one for the whole run, ZeRO-1/2
        # one while gradients accumulate): more than all of this rank's gradients is memory never filled.
        zero["reduce_bucket_size"] = min(int(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)), local_params)
    if p.zero_stage in (1, 2) and p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds["zero_force_ds_cpu_optimizer"] = False
    if p.zero_stage == 3 and not p.offload_params:
        zero.pop("offload_param", None)
    if p.zero_stage == 3 and not p.offload_optimizer:
        zero.pop("offload_optimizer", None)
    for off in ("offload_param", "offload_optimizer"):
        if off in zero:
            zero[off]["pin_memory"] = torch.cuda.is_available()
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: decay on matrices only (tied heads follow the embedding, which gets none)."""
    params, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append((name, p))
    decay, no_decay = decay_groups([(n, ndim(p)) for n, p in params])
    groups = [{"params": [params[i][1] for i in decay], "weight_decay": weight_decay, "name": "decay"},
              {"params": [params[i][1] for i in no_decay], "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]  # LoRA on an LM trains matrices only: DeepSpeed drops an empty group
    if any(getattr(p, "allreduce", True) is False for _, p in params):
        # expert parallelism: the experts in groups of their own, which ZeRO partitions over the expert-data-parallel
        # ranks (parallel/expert.py)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def lr_lambda(cfg: Config):
    """Multiplier of train.lr at each optimizer step: linear warmup, then cosine/linear decay to min_lr."""
    t = cfg.train
    floor = t.min_lr / t.lr if t.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return f


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, mpu=None):
    """deepspeed.initialize with a torch AdamW (no JIT-built op needed) and the LR schedule."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size, local_params=sum(numel(p) for p in model.parameters()))
    t = cfg.train
    # fused: one kernel over all parameters (CPU and CUDA) where the default loops over them one at a time in Python
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # a PipelineModule brings its own mpu (its grid); a plain module gets ours
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config, mpu=mpu)
    if cfg.parallel.zero_stage == 3:
        share_fp32_master(engine.optimizer)
    clips = clips_in_skip_non_finite(cfg)  # then deepspeed_config told DeepSpeed not to clip
    if clips and hasattr(engine.optimizer, "overflow"):
        raise RuntimeError("DeepSpeed wrapped the fp32 ZeRO-0 optimizer: SkipNonFinite cannot clip for it")
    if cfg.parallel.zero_stage == 0 and not hasattr(engine.optimizer, "overflow"):
        clip = cfg.train.grad_clip if clips else None  # None: a pipeline's DeepSpeed clips
        tp_rank = mpu.get_slice_parallel_rank() if mpu is not None else 0
        engine.optimizer = SkipNonFinite(engine.optimizer, clip, cfg.parallel.tp, tp_rank, engine.dp_world_size)
        if engine.dp_world_size == 1:  # no replica to average with: DeepSpeed's flatten/all-reduce/copy is pure overhead
            engine.enable_backward_allreduce = False
    elif resolve_precision(cfg) == "bf16" and hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True  # ZeRO-1/2 under bf16 would otherwise step on a NaN norm
    return engine, engine.optimizer, scheduler, ds_config


def share_fp32_master(zero3) -> int:
    """ZeRO-3 keeps an fp32 master partition next to the partition of the parameters. When the parameters are fp32
    already, DeepSpeed means to use them as the master (stage3.py's _create_fp32_partitions aliases the two, and its
    step copies one onto the other, which is then no copy), but its test compares a torch.device with a device name,
    which is never equal: an fp32 run held every partition twice, 4 bytes per parameter / N above 16 Psi / N. Make
    the alias DeepSpeed meant (not with optimizer offload, whose master lives elsewhere). Returns the bytes freed."""
    if getattr(zero3, "offload_optimizer", True):
        return 0
    freed = 0
    for lp, hp in zip(zero3.fp16_partitioned_groups_flat, zero3.fp32_partitioned_groups_flat):
        if lp is None or hp.data_ptr() == lp.data_ptr() or (lp.dtype, lp.device, lp.shape) != (hp.dtype, hp.device, hp.shape):
            continue
        if not torch.equal(lp, hp):  # a fresh master is a copy of the parameters; anything else is not ours to merge
            continue
        freed += hp.numel() * hp.element_size()
        hp.data = lp.data
    return freed


def clips_in_skip_non_finite(cfg: Config) -> bool:
    """fp32 without ZeRO or a pipeline: DeepSpeed steps the torch optimizer itself (no mixed-precision wrapper of its
    own), and this rank's gradients, with its TP peers', are the whole model's."""
    return cfg.parallel.zero_stage == 0 and cfg.parallel.pp == 1 and resolve_precision(cfg) == "fp32"


class SkipNonFinite:
    """ZeRO-0's fp32 optimizer as DeepSpeed steps it: a non-finite gradient anywhere (any rank, any stage) skips the
    update, which DeepSpeed's ZeRO optimizers do themselves (DeepSpeed then counts engine.skipped_steps and holds
    the LR schedule). The gradients are already all-reduced over data parallelism here; tensor- and pipeline-parallel
    ranks hold different ones, so the verdict is all-reduced over every rank: one collective per step.

    Without a pipeline it also takes the global gradient norm and clips to `clip` (0: no clipping), from one foreach
    norm that the verdict shares, where DeepSpeed's own clip walks the parameters one at a time (a norm and a multiply
    each; at baby-GPT size ~2 ms of a 48 ms step). It rides on the same collective, summed over every rank: each rank
    adds its TP-split gradients' squared norms, TP rank 0 the replicated ones' too, divided by the data-parallel
    replicas (which hold the same gradients), as DeepSpeed's clip counts them. The norm (before clipping) is what
    DeepSpeed then reports as engine.get_global_grad_norm()."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: float | None = None, tp: int = 1, tp_rank: int = 0,
                 dp: int = 1):
        self.optimizer = optimizer
        self.overflow = False
        self.clip = clip  # None: a pipeline's (DeepSpeed clips)

        def counted(p) -> bool:  # TP rank 0 counts every gradient, the others their TP-split ones
            return tp_rank == 0 or (tp > 1 and getattr(p, "tensor_model_parallel", False))

        # what each parameter's squared gradient norm adds to the sum over every rank (see above)
        self.share = {id(p): counted(p) / dp for g in optimizer.param_groups for p in g["params"]}

    def step(self, closure=None):
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norms = torch.stack(torch._foreach_norm(grads)).float() if grads else torch.zeros(0)
        share = torch.tensor([self.share[id(p)] for p in params], device=norms.device)
        # [any non-finite gradient, squared norm], summed over every rank
        shared = torch.stack([(~torch.isfinite(norms)).any().float(), (norms.square() * share).sum()])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(shared)
        self.overflow = bool(shared[0].item())
        if self.clip is not None:
            total = shared[1].sqrt()
            self._global_grad_norm = total  # a tensor: read when a line is logged
            if not self.overflow and self.clip > 0 and grads:
                torch._foreach_mul_(grads, (self.clip / (total + 1e-6)).clamp(max=1.0))  # DeepSpeed's coefficient
        if not self.overflow:
            self.optimizer.step(closure)

    def __getattr__(self, name):  # state_dict, param_groups, zero_grad, ...: the wrapped optimizer's
        return getattr(self.optimizer, name)


def grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    if g is None:
        return float("nan")
    return float(g.item() if torch.is_tensor(g) else g)


def rank_mean(value: float, device) -> float:
    """Average a per-rank float over all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())

