"""FLOPs per token of the Transformer, by formula from its config: what training's MFU, the planner's step time and
each task's count are made of. Counted 2 per multiply-add; embedding lookups, norms and activations left out.

No torch here, nothing but the config and the parameter rules: `megatrain plan` reads it without importing torch.
"""
from __future__ import annotations

from megatrain.config import (ModelConfig, ffn_width, head_dim, is_local_layer, is_moe_layer, kv_heads, moe_ffn_width,
                              shared_ffn_width)
from megatrain.parameters import ndim, numel


def keys_per_query(m: ModelConfig, seq_len: int, causal: bool = True, layer: int = 0) -> float:
    """The keys a query of block `layer` reads, on average over the seq_len queries of a sequence.

    A global layer: seq_len, halved when causal (T / 2: the usual convention, which counts half the diagonal; the
    exact causal triangle is T (T + 1) / 2 pairs). A sliding-window layer (model.sliding_window = w < T): query i
    (from 0) reads min(i + 1, w) keys, counted exactly:
        sum_{i<T} min(i + 1, w) / T = (T w - w (w - 1) / 2) / T,
    and min(T, w) when not causal (whole_attention: every query as if it had its whole window). A window of at
    least T cuts nothing: the layer is counted as a global one."""
    T = seq_len
    w = m.sliding_window if is_local_layer(m, layer) else 0
    if not w or w >= T:
        return T * (0.5 if causal else 1.0)
    return (T * w - w * (w - 1) / 2) / T if causal else w


def mlp_matrices(m: ModelConfig) -> int:
    """Weight matrices of one MLP (or one expert): three for SwiGLU and GeGLU (gate, up, down), two for GELU."""
    return 3 if m.mlp in ("swiglu", "geglu") else 2


def mlp_flops_per_token(m: ModelConfig, layer: int) -> float:
    """Forward FLOPs per token of block `layer`'s feed-forward layer: moe_flops_per_token for a MoE block, else a
    dense MLP's matrices at d_ff."""
    return moe_flops_per_token(m) if is_moe_layer(m, layer) else 2 * m.d_model * ffn_width(m) * mlp_matrices(m)


def moe_flops_per_token(m: ModelConfig) -> float:
    """Forward FLOPs per token of a MoE feed-forward layer: what a token runs through, not every expert: its top_k
    experts of width moe_ffn, the shared MLP (width shared_ffn_width, and its d x 1 gate), and the router's d x E
    logits."""
    d = m.d_model
    routed = m.moe_top_k * moe_ffn_width(m) + shared_ffn_width(m)
    gate = 2 * d if m.moe_shared_gate and shared_ffn_width(m) else 0
    return 2 * d * routed * mlp_matrices(m) + 2 * d * m.moe_experts + gate


def block_flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True,
                          layer: int | None = None) -> tuple[float, float, float]:
    """Forward FLOPs per token of one block (2 per multiply-add): (attention's projections, the MLP, attention's own).

    Projections: QKV (GQA: fewer K/V columns; n_heads x head_dim wide, which need not be d_model) and the output
    projection. MLP: mlp_flops_per_token (a MoE layer's active experts). Attention: the scores QK^T and the weighted
    sum AV, each 2 x n_heads x head_dim per key a query reads (keys_per_query). `layer`: that block's count (a
    sliding-window block reads fewer keys, a dense block between MoE ones has its own MLP); None: the mean over the
    model's blocks."""
    d, hd = m.d_model, head_dim(m)
    q_dim, kv_dim = m.n_heads * hd, kv_heads(m) * hd
    attn_proj = 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d
    if layer is not None or not m.moe_experts:
        mlp = mlp_flops_per_token(m, layer or 0)
    else:
        mlp = sum(mlp_flops_per_token(m, i) for i in range(m.n_layers)) / m.n_layers
    if layer is not None or not m.sliding_window:
        keys = keys_per_query(m, seq_len, causal, layer or 0)
    else:
        keys = sum(keys_per_query(m, seq_len, causal, i) for i in range(m.n_layers)) / m.n_layers
    attn_mix = 2 * 2 * q_dim * keys
    return attn_proj, mlp, attn_mix


def forward_flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward-pass FLOPs per token: every block plus the LM head (embedding lookups excluded)."""
    if not m.sliding_window and not m.moe_experts:
        return m.n_layers * sum(block_flops_per_token(m, seq_len, causal)) + 2 * m.d_model * m.vocab_size
    blocks = sum(sum(block_flops_per_token(m, seq_len, causal, i)) for i in range(m.n_layers))
    return blocks + 2 * m.d_model * m.vocab_size


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
    pipeline's stages are not: they are not counted here). A MoE layer's experts weigh by the share of them a token
    runs through (top_k / E)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return 0.0

    def trains(prefix: str) -> bool:
        return any(p.requires_grad for n, p in params.items() if n.startswith(prefix))

    def adapter(name: str) -> int:  # a LoRA matrix's elements: its forward FLOPs per token / 2 (this rank's slice)
        return numel(params[name]) if name in params else 0

    def used(name: str, p) -> float:  # elements of a matrix one token multiplies by: top_k / E of a MoE's experts
        if ".mlp.experts." in name and ndim(p) == 3 and "lora_" not in name:
            return numel(p) * m.moe_top_k / m.moe_experts
        return numel(p) if name.endswith(".weight") and ndim(p) == 2 else 0

    def frozen_share(prefix: str) -> float:  # of the FLOPs of prefix's matrices, the frozen ones' share
        mats = [(used(n, p), p) for n, p in params.items() if n.startswith(prefix)]
        total = sum(u for u, _ in mats)
        return sum(u for u, p in mats if not p.requires_grad) / total if total else 0.0

    qkv = 2 * m.d_model * (m.n_heads + 2 * kv_heads(m)) * head_dim(m)  # forward FLOPs of the first projection
    change, upstream = 0.0, trains("embed.") or trains("pos_embed.")
    for i in range(m.n_layers):
        pre = f"layers.{i}."
        attn_proj, mlp, attn_mix = block_flops_per_token(m, seq_len, causal, i)
        if not upstream and not trains(pre):
            change -= 2 * (attn_proj + mlp + attn_mix)
            continue
        if not upstream and not trains(pre + "attn_norm."):  # qkv's input needs no gradient: that matmul is spared
            change -= qkv + 2 * adapter(pre + "attn.qkv.lora_A")
        upstream = True
        change -= attn_proj * frozen_share(pre + "attn.") + mlp * frozen_share(pre + "mlp.")
        change += 3 * 2 * sum(adapter(n) * (m.moe_top_k / m.moe_experts if ".mlp.experts." in n else 1)
                              for n in params if n.startswith(pre) and "lora_" in n)  # x A^T, then B (experts': k/E)
    lm_head = params.get("lm_head.weight", params.get("embed.weight"))  # tied: the embedding is the head
    if head and m.vocab_size and lm_head is not None and not lm_head.requires_grad:
        change -= 2 * m.d_model * m.vocab_size
    return change


def last_block_tail_flops(model, m: ModelConfig) -> float:
    """Training FLOPs per token of the last block's output projection and MLP: what a position spares where the
    last block computes only the rows a head reads (model.py's features(rows=...): a classifier's pooled token, the
    labeled tokens of sft and MLM). Each matrix: its forward, its input gradient when anything up to it trains, its
    weight gradient when it trains; LoRA's adapters 3x their forward (as frozen_flops_adjustment counts them)."""
    params = dict(model.named_parameters())
    pre = f"layers.{m.n_layers - 1}."
    upstream = any(p.requires_grad for n, p in params.items() if n.startswith(("embed.", "pos_embed.", "layers.")))
    total = 0.0
    for part, forward in (("attn.o_proj.", 2 * m.n_heads * head_dim(m) * m.d_model),
                          ("mlp.", mlp_flops_per_token(m, m.n_layers - 1))):
        mats = {n: p for n, p in params.items() if n.startswith(pre + part) and ndim(p) == 2}
        trains = any(p.requires_grad for n, p in mats.items() if "lora_" not in n)
        total += forward * (1 + upstream + trains) + 3 * 2 * sum(numel(p) for n, p in mats.items() if "lora_" in n)
    return total
