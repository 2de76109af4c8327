"""Parallelism applied in one place to the plain model: apply_tp, materialize, apply_activation_checkpointing and
apply_pipeline.

The model in model.py knows nothing of ranks. These functions rewrite it in place. A model built on the meta device
(`build_on_meta`: shapes, no values) is cut first and filled last: each rank allocates only its TP slices of its
pipeline stage, with exactly the values the unsplit model built by `torch.manual_seed(seed); Transformer(cfg)` has
(materialize), or its slices of the weights the run starts from, read one full tensor at a time (fill). A model
with values (weights loaded before the split) is sliced as it is.
NOTE (order): apply_tp, then materialize or fill (right after the cut, only this rank's stage), then
apply_activation_checkpointing (checkpointing wraps the TP blocks), then the pipeline cut, and all of it before
deepspeed.initialize (ZeRO partitions whatever parameters exist at that point).
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from megatrain.kernels import ops
from megatrain.model import LayerNorm, RMSNorm, Transformer, init_parameter_
from megatrain.moe import MoE
from megatrain.parallel.context import apply_cp, context_groups
from megatrain.parallel.expert import apply_ep, expert_groups, experts_of, local_experts
from megatrain.parallel.pipeline import apply_pipeline, stage_holds
from megatrain.parallel.rng import apply_tp_dropout_streams, tp_stream_seed
from megatrain.parallel.sharding import shard, split_of
from megatrain.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                copy_to_tp, gather_seq, mark_partial_grad, mark_tp, reduce_from_tp,
                                                reduce_scatter_seq, vocab_parallel_cross_entropy)


class _SequenceShardPositions(nn.Module):
    """Learned positions under sequence parallelism: only this rank's slice of the positions."""

    def __init__(self, emb: nn.Embedding, group):
        super().__init__()
        self.weight, self.group = emb.weight, group
        mark_partial_grad(self.weight)

    def forward(self, positions):
        n, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        return nn.functional.embedding(positions.chunk(n)[r], self.weight)


def apply_tp(model: Transformer, group, sequence_parallel: bool = False) -> Transformer:
    """Split attention heads (GQA-aware), the MLP, the embedding and the LM head over the TP group, each weight
    cut as parallel/sharding.py's table says. A replicated parameter whose gradient each rank sees only part of (QK
    per-head norms; with sequence parallelism the norms, positions, row-parallel biases) is marked: its gradient is
    summed over the group in backward."""
    tp, r = dist.get_world_size(group), dist.get_rank(group)
    if tp == 1:
        return model
    cfg = model.cfg
    if cfg.vocab_size % tp:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} must be divisible by tp={tp} (raise model.pad_vocab_multiple)")
    full = dict(model.named_parameters())
    frozen = {n for n, p in full.items() if not p.requires_grad}  # LoRA, finetune.freeze: kept frozen once split

    def mine(name: str) -> torch.Tensor | None:
        return shard(full[name], split_of(name, cfg), tp, r) if name in full else None

    sp = sequence_parallel

    def split(layer: nn.Module, name: str, kind: type) -> nn.Module:
        """A linear layer (LoRA adapters included) as a TP layer with this rank's slices."""
        lora = None
        if getattr(layer, "lora_A", None) is not None:
            lora = dict(A=mine(name + ".lora_A"), B=mine(name + ".lora_B"), scale=layer.scale,
                        dropout=layer.lora_dropout.p)
        return kind(mine(name + ".weight"), mine(name + ".bias"), group, sp, lora)

    model.embed = VocabParallelEmbedding(mine("embed.weight"), group, sp)
    for i, block in enumerate(model.layers):
        a, m, pre = block.attn, block.mlp, f"layers.{i}."
        a.qkv = split(a.qkv, pre + "attn.qkv", ColumnParallelLinear)
        a.o_proj = split(a.o_proj, pre + "attn.o_proj", RowParallelLinear)
        a.n_heads, a.n_kv = a.n_heads // tp, a.n_kv // tp
        if a.qk_norm == "full":  # this rank's heads' slice of the weight; the sum of squares is summed over TP
            for norm, which in ((a.q_norm, "q_norm"), (a.k_norm, "k_norm")):
                norm.weight = mark_tp(nn.Parameter(mine(f"{pre}attn.{which}.weight").detach().clone()))
                norm.group = group
        elif a.qk_norm == "head":  # one weight shared by every head: each rank's gradient is its heads' share
            mark_partial_grad(a.q_norm.weight)
            mark_partial_grad(a.k_norm.weight)
        if isinstance(m, MoE):
            _tp_moe(m, pre + "mlp.", mine, split, group, sp)
        else:
            _tp_mlp(m, pre + "mlp.", mine, split)
    if model.lm_head is not None:  # a fine-tuning head replaces it (heads.py); heads stay whole on every TP rank
        head = ColumnParallelLinear(mine("lm_head.weight") if not cfg.tie_embeddings else model.embed.weight, None,
                                    group, sp)
        if cfg.tie_embeddings:
            head.weight = model.embed.weight
        model.lm_head = head
        if model.fused:
            model.loss_fn = functools.partial(ops.cross_entropy, group=group)
        else:
            model.loss_fn = functools.partial(vocab_parallel_cross_entropy, group=group)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad = False
    if sp:
        model.last_block_rows = False  # (a rank's residual stream holds 1/tp of the tokens: no flat positions)
        if model.pos_embed is not None:
            model.pos_embed = _SequenceShardPositions(model.pos_embed, group)
        qk_norms = {id(getattr(b.attn, n, None)) for b in model.layers for n in ("q_norm", "k_norm")}
        for mod in model.modules():  # the residual stream's norms see 1/tp of the tokens: partial gradients
            if isinstance(mod, (LayerNorm, RMSNorm)) and id(mod) not in qk_norms:  # (QK-norms see every token)
                for p in mod.parameters():
                    mark_partial_grad(p)
    if not any(p.is_meta for p in model.parameters()):  # a meta-built model gets them in parallelize
        _sum_partial_grads(model, group)
    return model


def _tp_mlp(m: nn.Module, pre: str, mine, split) -> None:
    """A dense MLP: gate|up (or up) column-parallel, down row-parallel."""
    if m.swiglu:
        m.gate_up = split(m.gate_up, pre + "gate_up", ColumnParallelLinear)
    else:
        m.up = split(m.up, pre + "up", ColumnParallelLinear)
        if m.up_bias is not None:
            m.up_bias = mark_tp(nn.Parameter(mine(pre + "up_bias").detach().clone()))
    m.down = split(m.down, pre + "down", RowParallelLinear)


def _tp_moe(m: MoE, pre: str, mine, split, group, sp: bool) -> None:
    """A MoE layer: every expert TP-split as a dense MLP is (its gate|up rows, its down columns) and the shared
    expert as one. Why split the experts rather than keep each whole on a TP rank: the TP ranks of a replica hold
    the same tokens, so whole experts would compute every row tp times (or need one more collective to share the
    rows out); split, each rank computes 1/tp of every row, and the layer costs one all-reduce (reduce-scatter under
    sequence parallelism) as a dense MLP does. The router is replicated: every rank routes the same tokens alike, and
    its gradient, each rank's experts' share, is summed over TP (the auxiliary losses' gradient, which every rank
    adds whole, counts 1/tp on each)."""
    tp = dist.get_world_size(group)
    for name in ("gate_up", "up", "down"):
        if hasattr(m.experts, name):
            setattr(m.experts, name, mark_tp(nn.Parameter(mine(pre + "experts." + name).detach().clone())))
    for name in (f"{w}_lora_{x}" for w in m.experts.lora for x in "AB"):  # LoRA: cut as its weight (sharding.py)
        p = nn.Parameter(mine(pre + "experts." + name).detach().clone())
        # the uncut factor's gradient is this rank's share (of the rows of B it met, or of A's low-rank output)
        setattr(m.experts, name, mark_tp(p) if p.shape != getattr(m.experts, name).shape else mark_partial_grad(p))
    if m.shared is not None:
        _tp_mlp(m.shared, pre + "shared.", mine, split)
    mark_partial_grad(m.router.weight)
    if m.shared_gate is not None and sp:  # it reads this rank's sequence shard: a partial gradient
        mark_partial_grad(m.shared_gate.weight)
    m.aux_share = 1.0 / tp
    if sp:
        m.tp_regions = (lambda x: gather_seq(x, group), lambda y: reduce_scatter_seq(y, group))
    else:
        m.tp_regions = (lambda x: copy_to_tp(x, group), lambda y: reduce_from_tp(y, group))


def _sum_partial_grads(model: nn.Module, group) -> None:
    """Replicated parameters marked by mark_partial_grad get a partial gradient on each TP rank: sum it over TP."""

    def hook(g):
        g = g.clone()
        dist.all_reduce(g, group=group)
        return g

    for p in model.parameters():
        if getattr(p, "tp_partial_grad", False) and p.requires_grad:  # (not a frozen one: LoRA, finetune.freeze)
            p.register_hook(hook)


def replicated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters every TP rank holds a full copy of (norms, row-parallel biases, positions)."""
    return [(n, p) for n, p in model.named_parameters() if not getattr(p, "tensor_model_parallel", False)]


def check_tp_drift(model: nn.Module, group, step: int) -> None:
    """Compare cheap checksums of replicated parameters across the TP group; stop on a mismatch.
    (BLOOM-176B once trained for weeks with silently drifted TP LayerNorm weights.)"""
    if dist.get_world_size(group) == 1:
        return
    named = replicated_parameters(model)
    if not named:
        return
    local = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for _, p in named])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    ref = gathered[0]
    for r, other in enumerate(gathered[1:], 1):
        bad = ((other - ref).abs() > 1e-6 * (1 + ref.abs())).any(dim=1)
        if bad.any():
            name = named[int(bad.nonzero()[0])][0]
            raise RuntimeError(f"step {step}: TP replica drift: parameter {name!r} differs between TP rank 0 and "
                               f"TP rank {r} (checksum {float(ref[int(bad.nonzero()[0]), 0]):.9g} vs "
                               f"{float(other[int(bad.nonzero()[0]), 0]):.9g}); stopping before it spreads")


def build_on_meta(cfg) -> Transformer:
    """The model's shapes without its values: nothing allocated until materialize fills this rank's share."""
    with torch.device("meta"):
        return Transformer(cfg)


def materialize(model: Transformer, seed: int, tp: int = 1, tp_rank: int = 0, keep=None, partition=None,
                experts: slice | None = None) -> None:
    """Give the parameters of a meta-built (and TP-cut) `model` that `keep(name)` selects (default: all; a pipeline
    stage's) exactly the values `torch.manual_seed(seed); Transformer(model.cfg)` gives the unsplit model: the
    construction draws of nn.Linear and nn.Embedding are made again, module by module, then each full tensor's
    reset_parameters value is drawn one at a time and this rank keeps its TP slice. `partition(parameter)`, if
    given, is called on each parameter the moment it has its value, which it reads straight from the buffer the full
    tensor was drawn into (ZeRO-3 keeps this rank's partition of it). `experts`: under expert parallelism, the experts
    this rank keeps. Peak memory: this rank's share (or partition) plus the largest single tensor."""
    cfg = model.cfg
    ours = {n: p for n, p in model.named_parameters() if keep is None or keep(n)}
    reference = build_on_meta(cfg)  # the unsplit model: its modules and parameters in the order they draw
    # Every full tensor is drawn into this one buffer: no allocation per tensor, whose freed memory the C allocator
    # would keep (a 101M-parameter model's start-up grew past the whole model's size that way).
    scratch = torch.empty(max(p.numel() for p in reference.parameters()))

    def space(shape: torch.Size) -> torch.Tensor:
        return scratch[:shape.numel()].view(shape)

    torch.manual_seed(seed)
    for mod in reference.modules():  # what building nn.Linear / nn.Embedding on the CPU draws, in the same order
        if type(mod) in (nn.Linear, nn.Embedding):
            stand_in = copy.deepcopy(mod)  # on the meta device: nothing allocated
            for pname, p in list(stand_in.named_parameters(recurse=False)):
                setattr(stand_in, pname, nn.Parameter(space(p.shape), requires_grad=False))
            stand_in.reset_parameters()  # the same draws in the same order; the values are not kept
    for name, ref in reference.named_parameters():  # then Transformer.reset_parameters, one full tensor at a time
        with torch.no_grad():
            full = init_parameter_(cfg, name, space(ref.shape))
        mine = ours.get(name)
        if mine is None:  # another stage's
            continue
        _place(mine, name, full, cfg, tp, tp_rank, partition, experts)


def fill(model: Transformer, weights, tp: int = 1, tp_rank: int = 0, keep=None, partition=None,
         experts: slice | None = None) -> None:
    """Like materialize, with the values `weights(name)` gives: the full tensor of each parameter (the weights a
    run starts from: checkpoint.init, finetune.init), read one at a time; this rank keeps its TP slice (or its ZeRO-3
    partition). Peak memory: this rank's share plus the largest single tensor (twice: as read, and its slice)."""
    cfg = model.cfg
    for name, mine in [(n, p) for n, p in model.named_parameters() if keep is None or keep(n)]:
        _place(mine, name, weights(name), cfg, tp, tp_rank, partition, experts)


def _place(mine: nn.Parameter, name: str, full: torch.Tensor, cfg, tp: int, tp_rank: int, partition,
           experts: slice | None = None) -> None:
    """Give the meta parameter `mine` its TP slice of `full` (of this rank's experts, for an expert weight under
    expert parallelism), in place: its own copy, so that `full` can go (or be drawn again), unless `partition` takes
    its part out first."""
    value = shard(experts_of(full, name, experts), split_of(name, cfg), tp, tp_rank)
    value = value.contiguous() if partition is not None else value.clone()
    if value.shape != mine.shape:
        raise RuntimeError(f"{name} is {tuple(mine.shape)} on this rank, its slice {tuple(value.shape)}")
    new = nn.Parameter(value.to(mine.dtype), requires_grad=mine.requires_grad)
    new.__dict__.update(mine.__dict__)  # the TP marks (tensor_model_parallel, tp_partial_grad, ...)
    torch.utils.swap_tensors(mine, new)  # every module holding it (TP layer, pipeline layer, tied head) sees it
    if partition is not None:
        partition(mine)


def zero3_partitioner(ds_config: dict, grid):
    """`partition` for materialize under ZeRO-3: deepspeed.zero.Init on one parameter at a time, with the group,
    dtype and config deepspeed.initialize will partition the model with (its data-parallel group; the precision
    `ds_config`, the run's DeepSpeed JSON, enables). Init(module=...) converts every parameter of the module it is
    given: a holder of one converts it."""
    import deepspeed

    bf16, fp16 = ds_config["bf16"]["enabled"], ds_config["fp16"]["enabled"]
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32  # what deepspeed.initialize casts to

    def partition(p: nn.Parameter) -> None:
        # NOTE: cast first: Init(module=...) partitions in the parameter's own dtype (only Init as a context casts);
        # deepspeed.initialize casts a module it has to partition itself before it does so, to the same dtype
        p.data = p.data.to(dtype)
        holder = nn.Module()
        holder.register_parameter("p", p)
        deepspeed.zero.Init(module=holder, data_parallel_group=grid.get_data_parallel_group(),
                            config_dict_or_path=ds_config, dtype=dtype, mpu=grid)

    return partition


def parallelize(model: Transformer, cfg, layout, grid, weights=None, ds_config: dict | None = None):
    """Everything, in order: TP split -> this rank's experts (expert parallelism) -> context parallelism's
    attention hooks -> values for a meta-built model
    (`weights(name)`'s full tensors if given, else materialize's draws) -> activation checkpointing -> pipeline
    stages. Returns the module to hand to deepspeed.initialize (the model itself, or a PipelineModule when pp > 1).
    `ds_config`: the DeepSpeed JSON the engine will be built with (training/engine.deepspeed_config), needed to
    partition a meta-built model under ZeRO-3 as it is filled."""
    tp_group = grid.get_slice_parallel_group()
    # NOTE: TP first: checkpointing must wrap the split blocks (and their dropout streams, which it then restores for
    # the recompute), and the pipeline cuts the final modules. A meta-built model gets its values right after the TP
    # cut (only its slices are allocated), and only for this rank's pipeline stage (PipelineModule moves the layers
    # it builds to the device: they need values by then).
    apply_tp(model, tp_group, cfg.parallel.sequence_parallel)
    experts = None
    if cfg.parallel.ep > 1:  # NOTE: after apply_tp, which rebuilds the parameters it cuts (apply_ep marks them)
        ep_group, edp_group = expert_groups(grid, layout.tp, layout.pp, layout.dp, cfg.parallel.ep)
        apply_ep(model, ep_group, edp_group)
        experts = local_experts(cfg.model.moe_experts, cfg.parallel.ep, dist.get_rank(ep_group))
    if layout.cp > 1:  # NOTE: after apply_tp: each rank's attention splits its TP rank's heads further
        apply_cp(model, context_groups(grid, layout.tp, layout.pp, layout.dp, layout.cp))
    if any(p.is_meta for p in model.parameters()):
        keep = None
        if layout.pp > 1:
            keep = stage_holds(cfg.model, grid.get_stage_id(), layout.pp)
        # NOTE: under ZeRO-3 each parameter is partitioned the moment it has its value, so the rank never holds the
        # whole model (deepspeed.initialize then finds every parameter already partitioned)
        partition = None
        if cfg.parallel.zero_stage == 3:
            if ds_config is None:
                raise ValueError("parallelize: a meta-built model under ZeRO-3 needs ds_config (the engine's JSON)")
            partition = zero3_partitioner(ds_config, grid)
        if weights is not None:
            fill(model, weights, layout.tp, grid.get_slice_parallel_rank(), keep, partition, experts)
        else:
            materialize(model, cfg.train.seed, layout.tp, grid.get_slice_parallel_rank(), keep, partition, experts)
        if layout.tp > 1:
            # NOTE: after materialize: a gradient hook on a parameter does not survive its swap from meta to values
            _sum_partial_grads(model, tp_group)
    if layout.tp > 1:
        replica = grid.get_pipe_parallel_rank() * layout.dp + grid.get_data_parallel_rank()
        apply_tp_dropout_streams(model, cfg.parallel.sequence_parallel,
                                 tp_stream_seed(cfg.train.seed, replica, grid.get_slice_parallel_rank()))
    if cfg.model.compile:  # NOTE: before checkpointing, which then calls (and recomputes) the compiled forward
        apply_compile(model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, grid, cfg.parallel.partition_activations)
    if layout.pp == 1:
        return model
    pipe = apply_pipeline(model, grid.topology(), layout.tp if cfg.parallel.sequence_parallel else 1)
    if hasattr(model, "deepspeed_moe_marker"):  # what DeepSpeed looks for, in the module it is handed
        pipe.deepspeed_moe_marker = model.deepspeed_moe_marker
    return pipe


def apply_compile(model: Transformer) -> Transformer:
    """model.compile: each block's forward through torch.compile (inductor), regionally as torchtitan does: blocks of
    one shape share one compiled graph (dynamo's cache), so compiling costs a block, not the model, and the
    embedding, the loss and DeepSpeed's hooks stay eager. Only the training forward (no KV cache: decoding runs
    eagerly) goes through the compiled code."""
    for block in model.layers:
        compiled = torch.compile(block.forward)
        eager = block.forward

        def forward(x, rope=None, cache=None, layer=0, pos=0, mask=None, rows=None, _compiled=compiled,
                    _eager=eager):
            if cache is not None or rows is not None:  # (the last block at a head's few rows: each batch its count)
                return _eager(x, rope, cache, layer, pos, mask, rows)
            return _compiled(x, rope, None, layer, pos, mask)

        block.forward = forward
    return model


def apply_activation_checkpointing(model: Transformer, mode: str, mpu=None, partition_activations: bool = False) -> Transformer:
    """Recompute each block's activations in backward (full), or only attention's (selective), through
    deepspeed.checkpointing (which can partition the saved inputs across TP ranks)."""
    if mode == "none":
        return model
    import deepspeed

    deepspeed.checkpointing.configure(mpu, partition_activations=partition_activations)
    ckpt = deepspeed.checkpointing.checkpoint
    for block in model.layers:
        target: nn.Module = block if mode == "full" else block.attn
        fwd = target.forward

        def checkpointed(x, rope=None, cache=None, layer=0, pos=0, mask=None, rows=None, _fwd=fwd):
            if not torch.is_grad_enabled() or cache is not None:  # inference / KV-cache decoding
                return _fwd(x, rope, cache, layer, pos, mask, rows)
            if not x.requires_grad:
                # NOTE: a checkpoint's output needs gradients only if its input does: below frozen embeddings (LoRA,
                # finetune.freeze) the first block's trainable parameters would silently get none
                x = x.detach().requires_grad_()
            # only the activation goes through the checkpoint; the rest is closed over (no gradients)
            return ckpt(lambda h: _fwd(h, rope, None, layer, pos, mask, rows), x)

        target.forward = checkpointed
    return model

