"""apply_pipeline: the same Transformer as a deepspeed.pipe.PipelineModule (1F1B schedule).

One list of layers — embedding, the blocks, final norm + LM head — cut into stages with equal numbers
of blocks. Each layer takes and returns one tensor, as DeepSpeed's pipeline requires. With tied
embeddings, the first stage's embedding and the last stage's head are one TiedLayerSpec: DeepSpeed
keeps the two copies equal and sums their gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain.kernels import ops
from megatrain.model import IGNORE_INDEX, Block, Transformer, scaled_embedding, soft_cap
from megatrain.parallel.sharding import pipeline_layer_of


class EmbedPipe(nn.Module):
    """tokens [B, T] -> hidden states (sequence-sharded under sequence parallelism)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.embed, self.pos_embed, self.drop = model.embed, model.pos_embed, model.drop
        self.embed_scale = model.embed_scale
        if model.cfg.tie_embeddings:
            self.lm_head = model.lm_head  # its weight is the embedding's: used by the last stage's copy
            self.logit_softcap = model.cfg.logit_softcap

    @property
    def weight(self):  # what TiedLayerSpec keeps in sync between the first and last stage
        return self.embed.weight

    def forward(self, tokens):
        x = scaled_embedding(self.embed, tokens, self.embed_scale)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
        return self.drop(x)


class BlockPipe(nn.Module):
    def __init__(self, block: Block, model: Transformer, seq_shards: int):
        super().__init__()
        self.block, self.seq_shards = block, seq_shards
        self.rope = model.pos_embed is None
        if self.rope:  # this block's tables (a sliding-window block's own with rope_local_theta); shared, not copied
            cos, sin = model.rope_of(block, slice(None), model.rope_cos.dtype)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x):
        rope = None
        if self.rope:
            T = x.shape[1] * self.seq_shards  # sequence parallel: x holds 1/tp of the positions
            rope = (self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype))
        return self.block(x, rope, None, 0, 0)


class FinalNormPipe(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.norm = model.norm

    def forward(self, x):
        return self.norm(x)


class HeadPipe(nn.Module):
    """The LM head, its logits soft-capped as Transformer.forward does (model.logit_softcap) before the loss."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.lm_head, self.logit_softcap = model.lm_head, model.cfg.logit_softcap

    def forward(self, x):
        return soft_cap(self.lm_head(x), self.logit_softcap)


def _tied_head_forward(embed_pipe: EmbedPipe, x):
    return soft_cap(embed_pipe.lm_head(x), embed_pipe.logit_softcap)


def stage_holds(cfg, stage: int, stages: int):
    """Whether pipeline stage `stage` holds a canonical parameter: DeepSpeed's own cut of the layer list (the
    partition_balanced that PipelineModule's "type:BlockPipe" runs, over [embedding, L blocks, norm, head]); with tied
    embeddings the last stage holds the embedding too. Known before the cut, so a meta-built model can be given values
    for this stage only (PipelineModule moves its layers to the device as it builds them: they need values by then)."""
    from deepspeed.runtime.utils import partition_balanced

    n = cfg.n_layers
    parts = partition_balanced(weights=[0] + [1] * n + [0, 0], num_parts=stages)
    lo, hi = parts[stage], parts[stage + 1]

    def holds(name: str) -> bool:
        layer = pipeline_layer_of(name, n)
        return lo <= layer < hi or (cfg.tie_embeddings and stage == stages - 1 and layer == 0)

    return holds


def apply_pipeline(model: Transformer, topology, seq_shards: int = 1):
    """Wrap the (possibly TP-split, checkpointed) model as a PipelineModule over `topology`."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    cfg = model.cfg
    loss_fn = model.loss_fn

    def loss(logits, labels):
        if loss_fn is not None:
            return loss_fn(logits, labels)
        if model.fused:
            return ops.cross_entropy(logits, labels)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    blocks = [LayerSpec(BlockPipe, b, model, seq_shards) for b in model.layers]
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbedPipe, model, tied_weight_attr="weight")
        last = [LayerSpec(FinalNormPipe, model),
                TiedLayerSpec("embed", EmbedPipe, model, forward_fn=_tied_head_forward, tied_weight_attr="weight")]
    else:
        first = LayerSpec(EmbedPipe, model)
        last = [LayerSpec(FinalNormPipe, model), LayerSpec(HeadPipe, model)]
    module = PipelineModule(layers=[first, *blocks, *last], loss_fn=loss, topology=topology,
                            partition_method="type:BlockPipe")
    # (a meta-built model was given values for this stage by stage_holds' prediction of this very cut: check it)
    if any(p.is_meta for p in module.parameters()):
        raise RuntimeError(f"pipeline stage {module.stage_id}: a parameter has no values (stage_holds predicted "
                           f"another cut than PipelineModule's {module.parts})")
    # Every rank built the whole model; keep only this stage's weights in memory (the layer specs still
    # reference the other stages' modules, so release their storage explicitly).
    mine = {id(p) for p in module.parameters()}
    for p in model.parameters():
        if id(p) not in mine:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return module

