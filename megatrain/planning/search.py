"""One layout's plan (memory per pipeline stage, step time), and the search over every layout of N GPUs that fits."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from megatrain.config import Config, ConfigError, padded_vocab_size, validate
from megatrain.parallel.topology import check_layout
from megatrain.planning.memory import (Activations, ModelStates, StageParams, activations, local_numel,
                                       parameter_table, stage_params, stage_states)
from megatrain.planning.timing import Cluster, StepTime, step_time
from megatrain.training.engine import deepspeed_config, effective_zero_stage

GiB = 2**30
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold when the ZeRO JSON sets none
RESERVED_BYTES = int(1.5 * GiB)  # CUDA context, NCCL buffers and the allocator's fragmentation, per GPU
USABLE_SHARE = 0.95


def usable_bytes(cluster: Cluster) -> int:
    return int(cluster.gpu.memory_gb * 1e9 * USABLE_SHARE) - RESERVED_BYTES


@dataclass
class LayoutPlan:
    cfg: Config  # the config with this layout's parallel.* and train.* values
    tp: int
    pp: int
    dp: int
    grad_accum: int
    precision: str
    stages: list[StageParams]
    states: list[ModelStates]
    acts: list[Activations]
    time: StepTime | None

    @property
    def ep(self) -> int:
        return self.cfg.parallel.ep

    def stage_peak(self, s: int) -> int:
        """A rank of stage s at its fullest: model states, ZeRO-3's gathered parameters, the activations of its
        micro-batches in flight, the block being recomputed and the pipeline's receive buffers."""
        st, a = self.states[s], self.acts[s]
        return st.device + st.gathered + a.saved + a.recompute + a.buffers

    @property
    def peak(self) -> int:
        return max(self.stage_peak(s) for s in range(self.pp))

    @property
    def host(self) -> int:
        return max(st.host for st in self.states)

    def sets(self) -> str:
        """The layout as --set arguments."""
        p, t = self.cfg.parallel, self.cfg.train
        items = [f"parallel.tp={p.tp}", f"parallel.pp={p.pp}", f"parallel.zero_stage={p.zero_stage}",
                 f"train.micro_batch_size={t.micro_batch_size}", f"train.activation_checkpointing={t.activation_checkpointing}"]
        if p.ep > 1:
            items.append(f"parallel.ep={p.ep}")
        if p.cp > 1:
            items.append(f"parallel.cp={p.cp}")
        if p.sequence_parallel:
            items.append("parallel.sequence_parallel=true")
        if p.offload_optimizer:
            items.append("parallel.offload_optimizer=true")
        if p.offload_params:
            items.append("parallel.offload_params=true")
        return " ".join(f"--set {i}" for i in items)


def resolve_precision(cfg: Config, for_gpus: bool) -> str:
    """train.precision; auto is bf16 on GPUs (as resolve_precision decides where CUDA is), fp32 on the CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if for_gpus else "fp32"


def plan_layout(cfg: Config, world: int, cluster: Cluster | None, precision: str) -> LayoutPlan:
    """The plan of cfg's own layout on `world` ranks; an impossible layout raises ConfigError (training's own checks).
    Without a cluster there is no step time. Training's config checks run first: a layout it refuses (parallel.ep
    with a stage or a feature expert parallelism does not take, say) is no plan."""
    validate(cfg)
    layout = check_layout(cfg, world)
    cfg = cfg.replaced({"parallel.zero_stage": effective_zero_stage(cfg, layout.dp, layout.pp, precision)})  # as a run
    m, p = cfg.model, cfg.parallel
    if m.vocab_size % layout.tp:
        raise ConfigError(f"config key parallel.tp: model.vocab_size={m.vocab_size} is not divisible by tp={layout.tp}")
    ds = deepspeed_config(cfg, world)  # checks the global batch against micro-batch x data-parallel ranks
    zero = ds["zero_optimization"]
    grad_accum = ds["gradient_accumulation_steps"]
    stages = stage_params(m, layout.tp, layout.pp, int(zero.get("stage3_param_persistence_threshold",
                                                                 DEEPSPEED_PERSISTENCE_THRESHOLD)), p.ep)
    states, acts = [], []
    for s, st in enumerate(stages):
        bucket = deepspeed_config(cfg, world, local_params=st.local)["zero_optimization"].get("reduce_bucket_size", 0)
        states.append(stage_states(st, layout.dp, p.ep, p.zero_stage, precision, grad_accum, layout.pp > 1,
                                   p.offload_optimizer, p.offload_params, int(bucket)))
        acts.append(activations(cfg, st, s, layout.tp, layout.pp, grad_accum, precision))
    time = step_time(cfg, stages, layout.tp, layout.pp, layout.dp, grad_accum, precision, cluster) if cluster else None
    return LayoutPlan(cfg, layout.tp, layout.pp, layout.dp, grad_accum, precision, stages, states, acts, time)


def with_layout(cfg: Config, tokenizer_vocab: int = 0, **keys) -> Config:
    """A copy of cfg with section.key values (given as section__key=value). tokenizer_vocab: the tokenizer's
    vocabulary when model.vocab_size came from it (0: the config set it), padded for this layout's tp as training
    pads it."""
    changes = {k.replace("__", "."): v for k, v in keys.items()}
    if tokenizer_vocab:
        tp = changes.get("parallel.tp", cfg.parallel.tp)
        changes["model.vocab_size"] = padded_vocab_size(tokenizer_vocab, cfg.model.pad_vocab_multiple, tp)
    return cfg.replaced(changes)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _zero_options(pp: int) -> list[tuple[int, tuple[bool, bool]]]:
    """(ZeRO stage, (offload optimizer, offload params)): pipelines take ZeRO-0/1 without offload."""
    if pp > 1:
        return [(0, (False, False)), (1, (False, False))]
    return [(0, (False, False)), (1, (False, False)), (1, (True, False)), (2, (False, False)), (2, (True, False)),
            (3, (False, False)), (3, (True, False)), (3, (True, True))]


def expert_options(cfg: Config, dp: int) -> list[int]:
    """The expert-parallel sizes of a layout: divisors of its dp data-parallel ranks that divide model.moe_experts
    (1 alone for a dense model)."""
    E = cfg.model.moe_experts
    return [ep for ep in _divisors(dp) if E and E % ep == 0] or [1]


def context_options(cfg: Config, tp: int, pp: int, dp: int) -> list[int]:
    """The context-parallel sizes of a layout: divisors of dp that split a dense model's heads over tp x cp and its
    sequence evenly, without pipeline stages (1 alone otherwise; config.validate has the rules)."""
    m, s = cfg.model, cfg.data.seq_len
    if pp > 1 or m.moe_experts:
        return [1]
    return [cp for cp in _divisors(dp) if cp == 1 or (m.n_heads % (tp * cp) == 0 and s % cp == 0)]


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int, tokenizer_vocab: int = 0):
    """Every (tp, pp, cp, ep, zero_stage, offload, micro-batch, checkpointing, sequence parallel) the config's model
    and global batch allow on `gpus` ranks: TP within a node, pipelines of ZeRO-0/1 only, context parallelism over
    divisors of dp (a dense model without stages), micro-batches dividing the batch share of a sample stream (dp /
    cp ranks), expert parallelism (a MoE model) over divisors of dp that divide its experts. tokenizer_vocab: as
    with_layout's."""
    G = cfg.train.global_batch_size
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if tp > gpus_per_node or pp > cfg.model.n_layers:
                continue
            for cp in context_options(cfg, tp, pp, dp):
                if G % (dp // cp):
                    continue
                micro = [mb for mb in (1, 2, 4, 8, 16, 32) if (G // (dp // cp)) % mb == 0]
                for ep, (zero, offload), mb, ckpt, sp in itertools.product(
                        expert_options(cfg, dp), _zero_options(pp), micro, ("none", "selective", "full"),
                        (False, True) if tp > 1 else (False,)):
                    yield with_layout(cfg, tokenizer_vocab, parallel__tp=tp, parallel__pp=pp, parallel__ep=ep,
                                      parallel__cp=cp, parallel__zero_stage=zero,
                                      parallel__sequence_parallel=sp, parallel__offload_optimizer=offload[0],
                                      parallel__offload_params=offload[1], train__micro_batch_size=mb,
                                      train__activation_checkpointing=ckpt)


def search(cfg: Config, cluster: Cluster, precision: str, tokenizer_vocab: int = 0) -> tuple[list[LayoutPlan], int]:
    """Every layout that fits, fastest first; and the smallest peak of all layouts (to report when none fits).
    tokenizer_vocab: as with_layout's."""
    fits, smallest = [], math.inf
    limit = usable_bytes(cluster)
    for candidate in candidate_layouts(cfg, cluster.gpus, cluster.gpus_per_node, tokenizer_vocab):
        try:
            plan = plan_layout(candidate, cluster.gpus, cluster, precision)
        except ConfigError:  # a split the model does not allow (heads, KV heads, MLP width, layers)
            continue
        smallest = min(smallest, plan.peak)
        if plan.peak <= limit:
            fits.append(plan)
    fits.sort(key=lambda pl: (pl.time.step_s, pl.peak))
    return fits, smallest


def deepspeed_estimate(plan: LayoutPlan, cluster_gpus: int) -> int | None:
    """DeepSpeed's own cold estimate of ZeRO-2/3 model-state bytes per GPU (estimate_zero*_model_states_mem_needs),
    for the same parameter count per model-parallel rank; None for other stages and under expert parallelism."""
    p = plan.cfg.parallel
    if p.ep > 1:  # its estimate partitions every parameter over dp; the experts' states go over dp / ep ranks
        return None
    local = max(st.local for st in plan.stages)
    offload = p.offload_optimizer
    if p.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(local, plan.dp, 1, cpu_offload=offload)[1]
    if p.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        largest = _largest_layer(plan.cfg, plan.tp)
        return estimate_zero3_model_states_mem_needs(local, largest, plan.dp, 1, cpu_offload=offload,
                                                     cpu_offload_params=p.offload_params, zero_init=False)[1]
    return None


def _largest_layer(cfg: Config, tp: int) -> int:
    """Parameters of the largest module with parameters of its own (a linear layer, the embedding), TP-split."""
    return max(local_numel(n, numel, cfg.model, tp) for n, numel, _ in parameter_table(cfg.model))

