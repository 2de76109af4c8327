"""FLOPs per token of the Transformer, by formula from its config: what training's MFU, the planner's step time and
each task's count are made of. Counted 2 per multiply-add; embedding lookups, norms and activations left out.

No torch here, nothing but the config and the parameter rules: `megatrain plan` reads it without importing torch.
"""
from __future__ import annotations

from megatrain.config import ModelConfig, ffn_width, kv_heads
from megatrain.parameters import ndim, numel


def block_flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True) -> tuple[float, float, float]:
    """Forward FLOPs per token of one block (2 per multiply-add): (attention's projections, the MLP, attention's own).

    Projections: QKV (GQA: fewer K/V columns) and the output projection. MLP: three matrices for SwiGLU, two for GELU.
    Attention: the scores QK^T and the weighted sum AV over seq_len keys (halved when causal: on average a token
    attends to half the sequence)."""
    d, hd = m.d_model, m.d_model // m.n_heads
    q_dim, kv_dim = m.n_heads * hd, kv_heads(m) * hd
    attn_proj = 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d
    mlp = 2 * d * ffn_width(m) * (3 if m.mlp == "swiglu" else 2)
    attn_mix = 2 * 2 * seq_len * q_dim * (0.5 if causal else 1.0)
    return attn_proj, mlp, attn_mix


def forward_flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward-pass FLOPs per token: every block plus the LM head (embedding lookups excluded)."""
    return m.n_layers * sum(block_flops_per_token(m, seq_len, causal)) + 2 * m.d_model * m.vocab_size


def train_flops_per_token(m: ModelConfig, seq_len: int, whole_attention: bool = False) -> float:
    """Forward + backward (twice the forward): 3x. Causal attention is counted halved (the FLOPs a causal kernel
    does); whole_attention counts it whole, as PaLM's MFU, nanoGPT and Megatron do (the comparable figure)."""
    return 3 * forward_flops_per_token(m, seq_len, causal=m.objective == "causal" and not whole_attention)


def frozen_flops_adjustment(model, m: ModelConfig, seq_len: int, causal: bool = True, head: bool = True) -> float:
    """FLOPs per token to add to the 3x count of a model with frozen parameters (LoRA, finetune.freeze), so that the
    count is what autograd computes (tested against torch's FlopCounterMode): less a frozen matrix's weight gradient
    (its forward FLOPs again); less the whole backward (twice the forward) of a block with nothing trainable in it or
    before it; less the first projection's input gradient when nothing before it trains; plus LoRA's adapters (3x
    their forward). `head`: the count includes the LM head (pretraining, sft), a frozen one spares its weight gradient.
    0 for a model with nothing frozen. `model`: the plain Transformer, its parameters named as model.py names them (a
    pipeline's stages are not: they are not counted here)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return 0.0

    def trains(prefix: str) -> bool:
        return any(p.requires_grad for n, p in params.items() if n.startswith(prefix))

    def adapter(name: str) -> int:  # a LoRA matrix's elements: its forward FLOPs per token / 2 (this rank's slice)
        return numel(params[name]) if name in params else 0

    def frozen_share(prefix: str) -> float:
        mats = [p for n, p in params.items() if n.startswith(prefix) and n.endswith(".weight") and ndim(p) == 2]
        total = sum(numel(p) for p in mats)
        return sum(numel(p) for p in mats if not p.requires_grad) / total if total else 0.0

    attn_proj, mlp, attn_mix = block_flops_per_token(m, seq_len, causal)
    hd = m.d_model // m.n_heads
    qkv = 2 * m.d_model * (m.n_heads + 2 * kv_heads(m)) * hd  # forward FLOPs of the first projection
    change, upstream = 0.0, trains("embed.") or trains("pos_embed.")
    for i in range(m.n_layers):
        pre = f"layers.{i}."
        if not upstream and not trains(pre):
            change -= 2 * (attn_proj + mlp + attn_mix)
            continue
        if not upstream and not trains(pre + "attn_norm."):  # qkv's input needs no gradient: that matmul is spared
            change -= qkv + 2 * adapter(pre + "attn.qkv.lora_A")
        upstream = True
        change -= attn_proj * frozen_share(pre + "attn.") + mlp * frozen_share(pre + "mlp.")
        change += 3 * 2 * sum(adapter(n) for n in params if n.startswith(pre) and ".lora_" in n)  # x A^T, then B
    lm_head = params.get("lm_head.weight", params.get("embed.weight"))  # tied: the embedding is the head
    if head and m.vocab_size and lm_head is not None and not lm_head.requires_grad:
        change -= 2 * m.d_model * m.vocab_size
    return change
