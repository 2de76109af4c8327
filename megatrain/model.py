"""The Transformer: a GPT/Llama-style decoder stack in plain PyTorch.

One class per idea, configured by `ModelConfig` (config.py): RMSNorm or LayerNorm, RoPE or learned
positions, SwiGLU or GELU MLP, grouped-query attention, optional biases, tied or untied embeddings.
The same stack trains as a causal LM or, with `objective: mlm`, as a BERT-style masked LM
(bidirectional attention; loss only on the masked positions). Parallelism is applied elsewhere
(parallel/), never here.

Parameter names follow the Hugging Face Llama layout, with two fusions for speed (one matmul instead
of three, or two):
    embed.weight, pos_embed.weight (learned positions), norm.weight, lm_head.weight
    layers.{i}.attn_norm.weight        layers.{i}.mlp_norm.weight
    layers.{i}.attn.qkv.weight         rows [q (n_heads*hd); k (n_kv*hd); v (n_kv*hd)]
    layers.{i}.attn.o_proj.weight
    layers.{i}.mlp.gate_up.weight      rows [gate; up] (swiglu)   or   layers.{i}.mlp.up.weight, .up_bias (gelu)
    layers.{i}.mlp.down.weight
RoPE uses the rotate-half convention of Hugging Face checkpoints, so their q/k weights map directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain import kernels
from megatrain.config import ConfigError, ModelConfig, ffn_width, kv_heads
from megatrain.kernels import ops, reference
from megatrain.kernels.reference import rope_tables

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (ops if self.fused else reference).rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (ops if self.fused else reference).layer_norm(x, self.weight, self.bias, self.eps)


def build_norm(cfg: ModelConfig, fused: bool = False) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps, fused)
    return LayerNorm(cfg.d_model, cfg.norm_eps, cfg.bias, fused)


def fused_kernels_enabled(setting: str) -> bool:
    """model.fused_kernels: auto (on when megatrain._C is built) | on | off."""
    if setting == "off":
        return False
    if setting == "on" and not kernels.built():
        raise ConfigError(f"config key model.fused_kernels: 'on', but megatrain's extension is not built "
                          f"({kernels.load_error()}); rebuild it (pip install -e .), or set auto (the PyTorch "
                          f"reference where it is missing) or off")
    kernels.notice_if_missing()  # auto without the extension: say once that the reference runs
    return kernels.built()


class KVCache:
    """Keys and values of every layer for incremental decoding: [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        hd = cfg.d_model // cfg.n_heads
        shape = (batch, kv_heads(cfg), max_len, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.n_heads, self.n_kv = cfg.n_heads, kv_heads(cfg)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.causal = cfg.objective == "causal"

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, pos: int = 0, mask=None):
        qkv = self.qkv(x)
        B, T, _ = qkv.shape  # with sequence parallelism x holds 1/tp of the tokens, qkv all of them
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                     self.n_kv * self.head_dim], dim=-1)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # [B, T, heads, head_dim]
        if rope is not None:
            rotate = (ops if self.fused else reference).rope
            q, k = rotate(q, *rope), rotate(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim] for SDPA
        causal = self.causal
        if cache is not None:
            cache.k[layer][:B, :, pos: pos + T] = k
            cache.v[layer][:B, :, pos: pos + T] = v
            k, v = cache.k[layer][:B, :, : pos + T], cache.v[layer][:B, :, : pos + T]
            if pos > 0:
                if T != 1:
                    raise ValueError("with a KV cache, only the first call may pass more than one token")
                causal = False  # one new query attends to every cached position
        if mask is not None:  # [B, 1, T, T]: which keys each query sees (packed examples, padding); causal inside
            causal = False
        # NOTE: enable_gqa lets SDPA broadcast the kv heads instead of materialising repeated copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.swiglu = cfg.mlp == "swiglu"
        self.gelu = "tanh" if cfg.gelu == "tanh" else "none"  # F.gelu's `approximate`
        ff = ffn_width(cfg)
        if self.swiglu:
            self.gate_up = nn.Linear(cfg.d_model, 2 * ff, bias=cfg.bias)
        else:
            # the bias is kept apart so that it can be fused into the GeLU (Megatron's skip_bias_add)
            self.up = nn.Linear(cfg.d_model, ff, bias=False)
            self.up_bias = nn.Parameter(torch.zeros(ff)) if cfg.bias else None
        self.down = nn.Linear(ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        k = ops if self.fused else reference
        if self.swiglu:
            return self.down(k.swiglu(self.gate_up(x)))
        if self.up_bias is not None and self.gelu == "tanh":  # the fused kernel is the tanh form
            return self.down(k.bias_gelu(self.up(x), self.up_bias))
        h = self.up(x) if self.up_bias is None else self.up(x) + self.up_bias
        # NOTE: on CPU the exact form is the faster one (baby GPT: 1.6 against 4.4 ms a step; bench/baby_profile.py)
        return self.down(F.gelu(h, approximate=self.gelu))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False):
        super().__init__()
        self.attn_norm, self.attn = build_norm(cfg, fused), Attention(cfg, fused)
        self.mlp_norm, self.mlp = build_norm(cfg, fused), MLP(cfg, fused)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, layer=0, pos=0, mask=None):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, layer, pos, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding; on the meta device without its own normal_ draw, which has no values to fill there and would
    import torch._dynamo (a second of start-up for every checkpoint reader)."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.cfg = cfg
        self.fused = fused_kernels_enabled(cfg.fused_kernels)
        self.embed = _embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = _embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, self.fused) for _ in range(cfg.n_layers))
        self.norm = build_norm(cfg, self.fused)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # apply_tp swaps in a vocab-parallel loss; None: plain cross-entropy over full logits
        self.loss_fn = None
        if self.embed.weight.device.type != "meta":  # a model built on the meta device has shapes, no values
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter by init_parameter_, in named_parameters() order (parallel/parallelize.materialize
        draws the same values one tensor at a time for a model built on the meta device)."""
        for name, p in self.named_parameters():
            init_parameter_(self.cfg, name, p)

    def features(self, tokens: torch.Tensor, segments: torch.Tensor | None = None, cache: KVCache | None = None,
                 pos: int = 0) -> torch.Tensor:
        """tokens [B, T] -> the final norm's output [B, T, d_model]. `segments` [B, T] says which example each token
        belongs to (1, 2, ...; 0 for padding) when a row holds several, or padding: attention stays inside an
        example (causally, for a causal model) and positions restart at each example's first token."""
        B, T = tokens.shape
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        mask, positions = None, None
        if segments is not None:
            mask, positions = segment_mask(segments, causal=self.cfg.objective == "causal"), segment_positions(segments)
        x = self.embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions if positions is not None else torch.arange(pos, pos + T, device=tokens.device))
        elif positions is not None:
            rope = (self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype))
        else:
            rope = (self.rope_cos[pos: pos + T].to(x.dtype), self.rope_sin[pos: pos + T].to(x.dtype))
        x = self.drop(x)
        for i, block in enumerate(self.layers):
            x = block(x, rope, cache, i, pos, mask)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, pos: int = 0, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]; with labels [B, T] -> mean cross-entropy over labels != -100."""
        x = self.features(tokens, segments, cache, pos)
        if labels is not None and self.fused and self.loss_fn is None:
            # LM head + loss in chunks: the [tokens, vocab] logits never exist at once
            return ops.linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, labels.reshape(-1))
        logits = self.lm_head(x)
        if labels is None:
            return logits
        if self.loss_fn is not None:
            return self.loss_fn(logits, labels)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n


def init_parameter_(cfg: ModelConfig, name: str, p: torch.Tensor) -> torch.Tensor:
    """The initial value of parameter `name`, in place: zeros for biases, ones for norm weights, Normal(0, init_std)
    for matrices, residual-output projections scaled by 1/sqrt(2 * n_layers)."""
    if name.endswith("bias"):
        return nn.init.zeros_(p)
    if p.dim() == 1:
        return nn.init.ones_(p)  # norm weights
    if name.endswith(("o_proj.weight", "down.weight")):
        return nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))
    return nn.init.normal_(p, 0.0, cfg.init_std)


def segment_mask(segments: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, T, T] bool: query i sees key j when both are in the same example (and j <= i if causal). A padding
    token (segment 0) sees itself only, so no row of the softmax is empty."""
    same = segments[:, :, None] == segments[:, None, :]
    T = segments.shape[1]
    if causal:
        same &= torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same |= torch.eye(T, dtype=torch.bool, device=segments.device)
    return same[:, None]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token within its example (0 at each example's first token)."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


def mlm_mask(tokens: torch.Tensor, mask_id: int, vocab_size: int, prob: float, generator: torch.Generator,
             special_ids: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `prob` of the positions; of those 80% -> mask_id, 10% -> random id, 10% kept.
    Returns (inputs, labels) with labels = -100 where nothing is predicted."""
    inputs, labels = tokens.clone(), tokens.clone()
    chosen = torch.rand(tokens.shape, generator=generator) < prob
    for s in special_ids:
        chosen &= tokens != s
    labels[~chosen] = IGNORE_INDEX
    r = torch.rand(tokens.shape, generator=generator)
    inputs[chosen & (r < 0.8)] = mask_id
    random_pos = chosen & (r >= 0.8) & (r < 0.9)
    inputs[random_pos] = torch.randint(0, vocab_size, tokens.shape, generator=generator)[random_pos]
    return inputs, labels
