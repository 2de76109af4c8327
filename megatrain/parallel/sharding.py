"""How every parameter is split across ranks, written down once.

`apply_tp` cuts a full model with `shard`; consolidate, reshard and the Hugging Face maps (checkpoint/, convert/)
put the slices back together with `unshard`. A new layout rule goes here, and both sides follow.

Tensor parallelism (canonical names, as in model.py):

    parameter                              dim  fused parts (each split on its own)
    embed.weight, lm_head.weight           0    -                vocab rows
    layers.N.attn.qkv.weight / .bias       0    q | k | v        each rank takes its query heads AND its KV heads
    layers.N.attn.o_proj.weight            1    -                row-parallel: input features
    layers.N.mlp.gate_up.weight / .bias    0    gate | up
    layers.N.mlp.up.weight, .up_bias       0    -
    layers.N.mlp.down.weight               1    -
    layers.N.attn.q_norm.weight, k_norm    0    -                qk_norm=full only ([heads x head_dim]: this rank's
                                                                 heads); qk_norm=head's [head_dim] is replicated
    layers.N.mlp.experts.gate_up           1    gate | up        MoE: [E, 2 x ff, d], each expert's rows cut as a
                                                                 column-parallel layer's
    layers.N.mlp.experts.up                1    -                (mlp=gelu experts)
    layers.N.mlp.experts.down              2    -                [E, d, ff]: each expert row-parallel
    ....experts.gate_up_lora_B, up_lora_B  1    as its weight    expert LoRA: B [E, out, r], A [E, r, in] split as
    ....experts.down_lora_A                2    -                a dense weight's adapters, one dimension in
    layers.N.mlp.shared.*                  as layers.N.mlp.*    the shared expert, a plain MLP
    ....lora_B of a column-parallel one    0    as its weight    LoRA: B [out, r] splits like the weight's rows
    ....lora_A of a row-parallel one       1    -                A [r, in] like the weight's columns
    everything else                        -    -                replicated: norms, learned positions, row-parallel
                                                                 biases (added once, after the reduction), the other
                                                                 LoRA factor, fine-tuning heads, the norms, the
                                                                 MoE router and shared-expert gate

Expert parallelism cuts every `layers.N.mlp.experts.*` tensor along its first dimension (EXPERT_DIM, the experts):
EP rank e holds experts [e x E/ep, (e+1) x E/ep), each of them TP-split as above.

Pipeline parallelism (DeepSpeed's PipelineModule names each parameter by its layer index): layer 0 is the
embedding (`0.embed.weight`), layers 1..L the blocks (`3.block.attn.qkv.weight` = `layers.2.attn.qkv.weight`),
L+1 the final norm, L+2 the LM head. With tied embeddings the embedding is a tied module on the first and last
stage (`tied_modules.embed.embed.weight`), kept equal by DeepSpeed: the first stage's copy is the one read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatrain.config import ModelConfig, ffn_width, head_dim, kv_heads, moe_ffn_width, shared_ffn_width

EXPERT_DIM = 0  # the experts' dimension of a MoE layer's stacked expert weights, which expert parallelism cuts


@dataclass(frozen=True)
class Split:
    dim: int | None  # the dimension cut across TP ranks; None: every TP rank holds the whole tensor
    parts: tuple[int, ...] = ()  # sizes along `dim` of fused parts, each cut on its own; (): one part

    @property
    def replicated(self) -> bool:
        return self.dim is None


REPLICATED = Split(None)


def split_of(name: str, cfg: ModelConfig) -> Split:
    """The TP split of a canonical parameter name."""
    hd = head_dim(cfg)
    if name in ("embed.weight", "lm_head.weight"):
        return Split(0)
    m = re.fullmatch(r"layers\.\d+\.mlp\.experts\.(gate_up|up|down)(_lora_[AB])?", name)
    if m:  # [E, out, in]: each expert cut like a dense MLP's weight, one dimension further in
        ff = moe_ffn_width(cfg)
        base = {"gate_up": Split(1, (ff, ff)), "up": Split(1), "down": Split(2)}[m.group(1)]
        if m.group(2) == "_lora_B":  # [E, out, r]: its rows as a column-parallel weight's
            return base if base.dim == 1 else REPLICATED
        if m.group(2) == "_lora_A":  # [E, r, in]: its columns as a row-parallel weight's
            return base if base.dim == 2 else REPLICATED
        return base
    m = re.fullmatch(r"(layers\.\d+\.mlp)\.shared\.(gate_up\.weight|up\.weight|down\.weight)", name)
    if m:  # the shared expert: a dense MLP of its own width
        if m.group(2) == "gate_up.weight":
            return Split(0, (shared_ffn_width(cfg),) * 2)
        return Split(0) if m.group(2) == "up.weight" else Split(1)
    if cfg.qk_norm == "full" and re.fullmatch(r"layers\.\d+\.attn\.[qk]_norm\.weight", name):
        return Split(0)  # over the whole projection: one weight per query (key) row, cut with the heads
    if name.endswith((".lora_A", ".lora_B")):  # LoRA splits like the weight it adapts: B its rows, A its columns
        base = split_of(name.rsplit(".", 1)[0] + ".weight", cfg)
        if name.endswith(".lora_B"):
            return base if base.dim == 0 else REPLICATED
        return Split(1) if base.dim == 1 else REPLICATED
    m = re.fullmatch(r"layers\.\d+\.(attn\.qkv|attn\.o_proj|mlp\.gate_up|mlp\.up|mlp\.down)\.(weight|bias)"
                     r"|layers\.\d+\.mlp\.(up_bias)", name)
    if not m:
        return REPLICATED
    layer, kind = m.group(1) or "mlp.up", m.group(2) or "bias"
    if layer == "attn.qkv":
        return Split(0, (cfg.n_heads * hd, kv_heads(cfg) * hd, kv_heads(cfg) * hd))
    if layer == "mlp.gate_up":
        ff = ffn_width(cfg)
        return Split(0, (ff, ff))
    if layer == "mlp.up":
        return Split(0)
    return Split(1) if kind == "weight" else REPLICATED  # o_proj / down: row-parallel weight, replicated bias


def is_expert_param(name: str) -> bool:
    """Whether expert parallelism cuts this canonical parameter (along EXPERT_DIM)."""
    return re.fullmatch(r"layers\.\d+\.mlp\.experts\.(gate_up|up|down)(_lora_[AB])?", name) is not None


def _part_sizes(split: Split, full: int) -> tuple[int, ...]:
    return split.parts or (full,)


def check_divisible(name: str, shape: tuple[int, ...], split: Split, tp: int) -> None:
    if split.replicated or tp == 1:
        return
    for size in _part_sizes(split, shape[split.dim]):
        if size % tp:
            raise ValueError(f"{name}: size {size} along dimension {split.dim} does not split over tp={tp}")


def local_shape(shape: tuple[int, ...], split: Split, tp: int) -> tuple[int, ...]:
    """The shape of one TP rank's slice of a tensor of full `shape`."""
    if split.replicated:
        return tuple(shape)
    out = list(shape)
    out[split.dim] //= tp
    return tuple(out)


def shard(full: torch.Tensor, split: Split, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s slice of a full tensor (a view where the slice is contiguous, else a copy)."""
    if split.replicated or tp == 1:
        return full
    parts = full.split(_part_sizes(split, full.shape[split.dim]), dim=split.dim)
    mine = [p.chunk(tp, dim=split.dim)[rank] for p in parts]
    return mine[0] if len(mine) == 1 else torch.cat(mine, dim=split.dim)


def unshard(slices: list[torch.Tensor], split: Split) -> torch.Tensor:
    """The full tensor from every TP rank's slice, in TP rank order (the inverse of `shard`)."""
    if split.replicated or len(slices) == 1:
        return slices[0]
    tp = len(slices)
    local = _part_sizes(split, slices[0].shape[split.dim] * tp)
    local = [s // tp for s in local]
    per_rank = [s.split(local, dim=split.dim) for s in slices]
    return torch.cat([torch.cat([r[i] for r in per_rank], dim=split.dim) for i in range(len(local))], dim=split.dim)


def pipeline_layer_of(name: str, n_layers: int) -> int:
    """The PipelineModule layer index that holds a canonical parameter."""
    if name.startswith(("embed.", "pos_embed.")):
        return 0
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith("norm."):
        return n_layers + 1
    return n_layers + 2  # lm_head


def canonical_name(name: str, n_layers: int) -> str:
    """A parameter name as DeepSpeed's PipelineModule has it -> the model's name; plain names pass through.
    Both stages' copies of a tied embedding map to `embed.*`: a reader keeps the first stage's."""
    m = re.match(r"tied_modules\.embed\.(.+)", name)
    if m:
        return m.group(1)
    m = re.match(r"(\d+)\.(.+)", name)
    if not m:
        return name
    layer, rest = int(m.group(1)), m.group(2)
    if 1 <= layer <= n_layers:
        return f"layers.{layer - 1}.{rest.removeprefix('block.')}"
    return rest  # 0: embed.* / pos_embed.*, L+1: norm.*, L+2: lm_head.*
