"""The Transformer: a GPT/Llama-style decoder stack in plain PyTorch.

One class per idea, configured by `ModelConfig` (model_config.py): RMSNorm or LayerNorm (before, around or after
each sublayer), RoPE (scaled, with its own base on local layers) or learned positions, SwiGLU, GeGLU or GELU MLP,
grouped-query attention with an explicit head size, QK-norm, sliding-window layers, soft-capping, optional biases,
tied or untied (scaled) embeddings, and Mixture-of-Experts feed-forward layers (moe.py).
The same stack trains as a causal LM or, with `objective: mlm`, as a BERT-style masked LM
(bidirectional attention; loss only on the masked positions). Parallelism is applied elsewhere
(parallel/), never here. `generate` extends a prompt greedily or by sampling, with a KV cache (KVCache).

Parameter names follow the Hugging Face Llama layout, with two fusions for speed (one matmul instead
of three, or two):
    embed.weight, pos_embed.weight (learned positions), norm.weight, lm_head.weight
    layers.{i}.attn_norm.weight        layers.{i}.mlp_norm.weight
    layers.{i}.attn.qkv.weight         rows [q (n_heads*hd); k (n_kv*hd); v (n_kv*hd)]
    layers.{i}.attn.o_proj.weight      layers.{i}.attn.q_norm.weight, .k_norm.weight (qk_norm)
    layers.{i}.attn_post_norm.weight   layers.{i}.mlp_post_norm.weight (norm_placement sandwich or post)
    layers.{i}.mlp.gate_up.weight      rows [gate; up] (swiglu, geglu)   or   layers.{i}.mlp.up.weight, .up_bias (gelu)
    layers.{i}.mlp.down.weight
    layers.{i}.mlp.router.weight, .experts.gate_up, .experts.down, .shared.*, .shared_gate.weight (a MoE block: moe.py)
RoPE uses the rotate-half convention of Hugging Face checkpoints, so their q/k weights map directly.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain import kernels
from megatrain.decode_matmul import project
from megatrain.config import (ConfigError, ModelConfig, ffn_width, has_window_layers, head_dim, is_local_layer,
                              is_moe_layer, kv_heads, shared_ffn_width)
from megatrain.kernels import ops, reference
from megatrain.kernels.reference import RopeScaling, rope_tables
from megatrain.moe import MoE

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """x / rms(x) * weight; with one_plus (Gemma) * (1 + weight), the weight starting at 0."""

    def __init__(self, dim: int, eps: float, fused: bool = False, one_plus: bool = False):
        super().__init__()
        self.eps, self.fused, self.one_plus = eps, fused, one_plus
        self.weight = nn.Parameter(torch.zeros(dim) if one_plus else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.one_plus else self.weight
        return (ops if self.fused else reference).rms_norm(x, weight, self.eps)


class ProjectionRMSNorm(RMSNorm):
    """RMSNorm over a whole query or key projection (OLMo 2's QK-norm). Under tensor parallelism each rank holds
    its heads' slice of the projection and of the weight; `group` (set by apply_tp) sums the squares over the TP
    ranks, so the statistic is the whole projection's. Plain PyTorch (no fused kernel)."""

    def __init__(self, dim: int, eps: float, one_plus: bool = False):
        super().__init__(dim, eps, False, one_plus)
        self.full_dim, self.group = dim, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        squares = xf.pow(2).sum(-1, keepdim=True)
        if self.group is not None:
            import torch.distributed.nn.functional as dist_fn  # all_reduce with a backward (the sum's gradient)

            squares = dist_fn.all_reduce(squares, group=self.group)
        weight = self.weight + 1 if self.one_plus else self.weight
        return (xf * torch.rsqrt(squares / self.full_dim + self.eps)).type_as(x) * weight


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
        return RMSNorm(cfg.d_model, cfg.norm_eps, fused, cfg.norm_one_plus)
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
    """Keys and values of every layer for incremental decoding: [B, n_kv_heads, length, head_dim]. A sliding-window
    layer keeps only its window, as a ring: position p lives in slot p % window (attention does not care about the
    order of the keys it reads, and RoPE is applied before a key is stored)."""

    positions: torch.Tensor | None = None  # [B, T] each row's own positions (serve/batcher.py's SlotCache); None:
    # every row at `pos`

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        hd = head_dim(cfg)
        self.window = [cfg.sliding_window if is_local_layer(cfg, i) and cfg.sliding_window < max_len else 0
                       for i in range(cfg.n_layers)]
        shapes = [(batch, kv_heads(cfg), w or max_len, hd) for w in self.window]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, hd] of positions pos.. pos+T-1; return the keys and values the new queries read:
        every cached one, or on a window layer's first call the given ones (the window mask applies to them)."""
        B, T, w = k.shape[0], k.shape[2], self.window[layer]
        if not w:
            self.k[layer][:B, :, pos: pos + T] = k
            self.v[layer][:B, :, pos: pos + T] = v
            return self.k[layer][:B, :, : pos + T], self.v[layer][:B, :, : pos + T]
        keep = torch.arange(max(pos, pos + T - w), pos + T)  # the last `window` positions
        slots = keep % w
        self.k[layer][:B, :, slots] = k[:, :, keep - pos]
        self.v[layer][:B, :, slots] = v[:, :, keep - pos]
        if T > 1:
            return k, v
        filled = min(pos + 1, w)
        return self.k[layer][:B, :, :filled], self.v[layer][:B, :, :filled]


def window_mask(T: int, window: int, device) -> torch.Tensor:
    """[T, T] bool: query i sees key j when i - window < j <= i."""
    i = torch.arange(T, device=device)
    offset = i[:, None] - i[None, :]
    return (offset >= 0) & (offset < window)


@functools.lru_cache(maxsize=8)
def window_bias(T: int, window: int, device, dtype) -> torch.Tensor:
    """window_mask as the additive mask SDPA uses (0 where seen, -inf elsewhere), in the activations' dtype. Cached
    and never modified: every window layer of a model (and every step) passes this one tensor, so autograd keeps one
    copy for the backward (a bool mask is converted inside SDPA, a new copy a layer)."""
    return torch.zeros(T, T, device=device, dtype=dtype).masked_fill(~window_mask(T, window, device), float("-inf"))


def soft_capped_attention(q, k, v, mask, causal: bool, scale: float, cap: float, dropout: float) -> torch.Tensor:
    """Attention whose scores are soft-capped, cap x tanh(score / cap) (Gemma 2): the plain-PyTorch form (SDPA has no
    cap). q [B, H, Tq, D], k/v [B, H_kv, Tk, D]; mask: [.., Tq, Tk] bool of the keys each query sees."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2)
    scores = (scores if scores.dtype == torch.float64 else scores.float()) * scale
    scores = cap * torch.tanh(scores / cap)
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.softmax(-1), dropout).to(v.dtype)  # (F.dropout: `dropout` is 0 unless training)
    return probs @ v


@dataclass(frozen=True)
class Documents:
    """Where the examples of each row of a packed or padded batch lie: spans[b] = ((start, end, real), ...) in order,
    covering [0, T); `real` False for a run of padding (segment 0). Attention then runs document by document (each
    one's own [n, n] problem), never on a [T, T] mask."""

    spans: tuple[tuple[tuple[int, int, bool], ...], ...]

    @staticmethod
    def of(segments: torch.Tensor) -> "Documents":
        """From segments [B, T] (1, 2, ... per example, 0 for padding)."""
        B, T = segments.shape
        change = (segments[:, 1:] != segments[:, :-1]).nonzero().tolist()  # (row, i): a new span starts at i + 1
        starts = [[0] for _ in range(B)]
        for b, i in change:
            starts[b].append(i + 1)
        ids = segments.tolist()
        rows = []
        for b in range(B):
            edges = starts[b] + [T]
            rows.append(tuple((lo, hi, ids[b][lo] != 0) for lo, hi in zip(edges, edges[1:])))
        return Documents(tuple(rows))

    @property
    def one_per_row(self) -> bool:
        """Each row one span (one example, unpadded): attention as if there were no segments."""
        return all(len(spans) == 1 for spans in self.spans)


def document_attention(q, k, v, docs: Documents, causal: bool, scale: float, window: int = 0, softcap: float = 0.0,
                       dropout: float = 0.0) -> torch.Tensor:
    """Attention within each document of each row: q, k, v [B, H(_kv), T, D] -> [B, H, T, D]. A run of padding is a
    document of its own (no real token sees it; its outputs feed nothing). Each document is its own SDPA call (or
    soft-capped attention), causal or not, within `window` if set: memory per call is its own length squared at
    most, never the batch's T x T."""
    H = q.shape[1]

    def attend(qs, ks, vs):
        n, mask = qs.shape[2], None
        if window and n > window:
            mask = window_mask(n, window, q.device) if softcap else window_bias(n, window, q.device, q.dtype)
        if softcap:
            return soft_capped_attention(qs, ks, vs, mask, causal and mask is None, scale, softcap, dropout)
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal and mask is None,
                                              dropout_p=dropout, scale=scale, enable_gqa=ks.shape[1] != H)

    # NOTE: split, not slices: the backward of a split is one cat, where each slice's backward would write its
    # gradient into a zeroed tensor of the whole input's size (and the slices' gradients be summed)
    rows = []
    for spans, qb, kb, vb in zip(docs.spans, q.split(1), k.split(1), v.split(1)):
        lengths = [hi - lo for lo, hi, _ in spans]
        ys = [attend(*t) for t in zip(qb.split(lengths, 2), kb.split(lengths, 2), vb.split(lengths, 2))]
        rows.append(torch.cat(ys, 2) if len(ys) > 1 else ys[0])
    return torch.cat(rows) if len(rows) > 1 else rows[0]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False, layer: int = 0):
        super().__init__()
        self.fused = fused
        self.n_heads, self.n_kv = cfg.n_heads, kv_heads(cfg)
        self.head_dim = hd = head_dim(cfg)
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * hd, bias=cfg.bias or cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, cfg.d_model, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":  # one weight over each head's dims, shared by the heads
            self.q_norm = RMSNorm(hd, cfg.norm_eps, fused, cfg.norm_one_plus)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, fused, cfg.norm_one_plus)
        elif cfg.qk_norm == "full":  # over the whole projection
            self.q_norm = ProjectionRMSNorm(self.n_heads * hd, cfg.norm_eps, cfg.norm_one_plus)
            self.k_norm = ProjectionRMSNorm(self.n_kv * hd, cfg.norm_eps, cfg.norm_one_plus)
        self.window = cfg.sliding_window if is_local_layer(cfg, layer) else 0
        self.scale = (cfg.attn_scale_dim or hd) ** -0.5
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout
        self.causal = cfg.objective == "causal"
        self.context = None  # context parallelism's hook (parallel/context.py): None runs `attend` on this rank

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, pos: int = 0, mask=None,
                rows=None):
        """`rows` (Block.forward): the output projection of only these flat positions of [B * T], [n, d_model]."""
        qkv = project(self.qkv, x, fused=self.fused)
        B, T, _ = qkv.shape  # with sequence parallelism x holds 1/tp of the tokens, qkv all of them
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                             self.n_kv * self.head_dim], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # [B, T, heads, head_dim]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            rotate = (ops if self.fused else reference).rope
            q, k = rotate(q, *rope), rotate(k, *rope)
        causal = self.causal
        if cache is not None:  # (the cache holds [B, kv heads, length, head_dim])
            k, v = (t.transpose(1, 2) for t in cache.update(layer, k.transpose(1, 2), v.transpose(1, 2), pos))
            if cache.positions is not None:  # rows at their own positions: the cache says which keys each query sees
                mask, causal = cache.visible(self.window), False
            elif pos > 0:
                if T != 1:
                    raise ValueError("with a KV cache, only the first call may pass more than one token")
                causal = False  # one new query attends to every cached position (a window layer caches its window)
            if isinstance(mask, Documents):  # decoding: one row of one example, no documents to keep apart
                mask = None
        # context parallelism (parallel/context.py): this rank's tokens, attention over the whole sequence
        attend = self.context if self.context is not None and cache is None else self.attend
        y = attend(q, k, v, mask, causal).reshape(B, T, -1)
        y = y if rows is None else y.reshape(B * T, -1).index_select(0, rows)
        return project(self.o_proj, y, fused=self.fused)

    def attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """Attention itself: q [B, Tq, heads, hd], k, v [B, Tk, kv heads, hd] -> [B, Tq, heads, hd]. `mask`: None,
        Documents (packed or padded rows: document by document) or a [B, 1, Tq, Tk] bool mask."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim] for SDPA
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, Documents):
            y = document_attention(q, k, v, mask, causal, self.scale, self.window, self.softcap, dropout)
            return y.transpose(1, 2)
        T = q.shape[2]
        if self.window and T > self.window and k.shape[2] == T:  # the window cuts into the causal triangle
            if mask is None and not self.softcap:
                mask = window_bias(T, self.window, q.device, q.dtype)
            else:  # a given mask, or capped attention's bool mask
                band = window_mask(T, self.window, q.device)
                mask = band if mask is None else mask & band
        if mask is not None:  # which keys each query sees; causal inside
            causal = False
        if self.softcap:
            y = soft_capped_attention(q, k, v, mask, causal, self.scale, self.softcap, dropout)
        else:
            # NOTE: enable_gqa lets SDPA broadcast the kv heads instead of materialising repeated copies.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                               scale=self.scale, enable_gqa=k.shape[1] != q.shape[1])
        return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fused: bool = False, width: int = 0):
        super().__init__()
        self.fused = fused
        self.swiglu = cfg.mlp in ("swiglu", "geglu")  # gated: one gate|up matmul
        self.geglu = cfg.mlp == "geglu"
        self.gelu = "tanh" if cfg.gelu == "tanh" else "none"  # F.gelu's `approximate`
        ff = width or ffn_width(cfg)
        if self.swiglu:
            self.gate_up = nn.Linear(cfg.d_model, 2 * ff, bias=cfg.bias)
        else:
            # the bias is kept apart so that it can be fused into the GeLU (Megatron's skip_bias_add)
            self.up = nn.Linear(cfg.d_model, ff, bias=False)
            self.up_bias = nn.Parameter(torch.zeros(ff)) if cfg.bias else None
        self.down = nn.Linear(ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        k, f = (ops if self.fused else reference), self.fused
        # (project: a decoding step's few rows in the CPU's faster form)
        if self.geglu:  # no fused kernel: the reference
            return project(self.down, reference.geglu(project(self.gate_up, x, fused=f)), fused=f)
        if self.swiglu:
            return project(self.down, k.swiglu(project(self.gate_up, x, fused=f)), fused=f)
        h = project(self.up, x, fused=f)
        if self.up_bias is not None and self.gelu == "tanh":  # the fused kernel is the tanh form
            return project(self.down, k.bias_gelu(h, self.up_bias), fused=f)
        h = h if self.up_bias is None else h + self.up_bias
        # NOTE: on CPU the exact form is the faster one (baby GPT: 1.6 against 4.4 ms a step; bench/baby_profile.py)
        return project(self.down, F.gelu(h, approximate=self.gelu), fused=f)


class Block(nn.Module):
    """Attention and the MLP, each a residual branch with its norms where model.norm_placement puts them: before
    (pre), before and after (sandwich), or after, on the branch (post)."""

    def __init__(self, cfg: ModelConfig, fused: bool = False, layer: int = 0):
        super().__init__()
        before, after = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement in ("sandwich", "post")
        # (registration order = parameter order = the order init draws; the pre-norm layout's is unchanged)
        self.attn_norm = build_norm(cfg, fused) if before else None
        self.attn = Attention(cfg, fused, layer)
        self.attn_post_norm = build_norm(cfg, fused) if after else None
        self.mlp_norm = build_norm(cfg, fused) if before else None
        if is_moe_layer(cfg, layer):  # routed experts (+ a shared MLP that every token goes through)
            shared = MLP(cfg, fused, shared_ffn_width(cfg)) if shared_ffn_width(cfg) else None
            self.mlp = MoE(cfg, shared, layer)
        else:
            self.mlp = MLP(cfg, fused)
        self.mlp_post_norm = build_norm(cfg, fused) if after else None
        self.drop = nn.Dropout(cfg.dropout)
        self.local = is_local_layer(cfg, layer)  # a sliding-window layer (its own RoPE tables with rope_local_theta)

    def forward(self, x, rope=None, cache=None, layer=0, pos=0, mask=None, rows=None):
        """`rows`: flat positions of [B * T] (the model's last block, under a head that reads only those): after
        attention, which reads every position, the block computes these alone and returns [len(rows), d_model]."""
        h = self.attn(self.attn_norm(x) if self.attn_norm is not None else x, rope, cache, layer, pos, mask, rows)
        x = x if rows is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)
        x = x + self.drop(self.attn_post_norm(h) if self.attn_post_norm is not None else h)
        h = self.mlp(self.mlp_norm(x) if self.mlp_norm is not None else x)
        return x + self.drop(self.mlp_post_norm(h) if self.mlp_post_norm is not None else h)


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding; on the meta device without its own normal_ draw, which has no values to fill there and would
    import torch._dynamo (a second of start-up for every checkpoint reader)."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


def rope_scaling_of(cfg: ModelConfig) -> RopeScaling | None:
    if cfg.rope_scaling == "none":
        return None
    return RopeScaling(cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len, cfg.rope_low_freq_factor,
                       cfg.rope_high_freq_factor, cfg.rope_beta_fast, cfg.rope_beta_slow)


def scaled_embedding(embed: nn.Module, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """The token embeddings times `scale` (sqrt(d_model) with model.embed_scale; 0: unscaled), in their own dtype as
    Gemma does. The model's and the pipeline's first stage's."""
    x = embed(tokens)
    return x * torch.tensor(scale, dtype=x.dtype) if scale else x


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap x tanh(logits / cap): logits squashed into (-cap, cap); `cap` 0: unchanged."""
    return cap * torch.tanh(logits / cap) if cap else logits


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (the trainer takes it from the tokenizer)")
        self.cfg = cfg
        self.fused = fused_kernels_enabled(cfg.fused_kernels)
        self.embed = _embedding(cfg.vocab_size, cfg.d_model)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 0.0
        self.pos_embed = _embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        # (model.compile: inductor fuses the blocks' plain ops itself, and cannot trace into megatrain's C++ kernels)
        self.layers = nn.ModuleList(Block(cfg, self.fused and not cfg.compile, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg, self.fused)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta, rope_scaling_of(cfg))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            if cfg.rope_local_theta and has_window_layers(cfg):
                cos, sin = rope_tables(head_dim(cfg), cfg.max_seq_len, cfg.rope_local_theta)
                self.register_buffer("rope_local_cos", cos, persistent=False)
                self.register_buffer("rope_local_sin", sin, persistent=False)
        # apply_tp swaps in a vocab-parallel loss; None: plain cross-entropy over full logits
        self.loss_fn = None
        # labels leave many positions out (MLM; SFT's prompts): the LM head reads only the labeled rows
        self.sparse_labels = cfg.objective == "mlm"
        # features(rows=...) runs the last block's o_proj and MLP on those rows alone (not for a routed-expert block,
        # whose balance loss counts every token; apply_tp turns it off under sequence parallelism)
        self.last_block_rows = not is_moe_layer(cfg, cfg.n_layers - 1)
        # (rank, n): under context parallelism (parallel/context.py) the tokens given are slice `rank` of n of each row
        self.context_shard = (0, 1)
        if self.embed.weight.device.type != "meta":  # a model built on the meta device has shapes, no values
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter by init_parameter_, in named_parameters() order (parallel/parallelize.materialize
        draws the same values one tensor at a time for a model built on the meta device)."""
        for name, p in self.named_parameters():
            init_parameter_(self.cfg, name, p)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return scaled_embedding(self.embed, tokens, self.embed_scale)

    def rope_of(self, block: Block, positions: torch.Tensor | slice, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE cos/sin rows of `positions` for `block` (a local block's own tables with rope_local_theta)."""
        if block.local and hasattr(self, "rope_local_cos"):
            return self.rope_local_cos[positions].to(dtype), self.rope_local_sin[positions].to(dtype)
        return self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype)

    def features(self, tokens: torch.Tensor, segments: torch.Tensor | None = None, cache: KVCache | None = None,
                 pos: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the final norm's output [B, T, d_model]. `segments` [B, T] says which example each token
        belongs to (1, 2, ...; 0 for padding) when a row holds several, or padding: attention stays inside an
        example (causally, for a causal model) and positions restart at each example's first token. Under context
        parallelism tokens are this rank's slice of each row and `segments` the whole rows'. `rows`: the flat
        positions of [B * T] a head reads (a pooled token, the labeled ones): only theirs come back, [len(rows),
        d_model], and the last block computes only those after its attention."""
        B, T = tokens.shape
        rank, n = self.context_shard if cache is None else (0, 1)  # (decoding runs whole, on one rank)
        first = pos + rank * T  # the position of tokens[:, 0]
        if pos + n * T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + n * T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        mask, positions = None, None
        if segments is not None:
            mask, positions = Documents.of(segments), segment_positions(segments)[:, rank * T:(rank + 1) * T]
            if mask.one_per_row:  # (equal-length examples): the plain attention, one call for the batch
                mask = None
        if cache is not None and cache.positions is not None:  # a serving batch: each row at its own position
            positions = cache.positions
        x = self.embed_tokens(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions if positions is not None else
                                   torch.arange(first, first + T, device=tokens.device))
        at = positions if positions is not None else slice(first, first + T)
        x = self.drop(x)
        last_rows = rows if cache is None and self.cuts_last_block() else None
        for i, block in enumerate(self.layers):
            rope = self.rope_of(block, at, x.dtype) if self.pos_embed is None else None
            x = block(x, rope, cache, i, pos, mask, last_rows if i == len(self.layers) - 1 else None)
        if rows is not None and last_rows is None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        return self.norm(x)

    def cuts_last_block(self) -> bool:
        """features(rows=...) runs the last block's o_proj and MLP at those rows alone in training (not on a slice of
        each row, under context parallelism); otherwise it cuts the rows after the whole block."""
        return self.last_block_rows and self.context_shard[1] == 1

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None, pos: int = 0, segments: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]; with labels [B, T] -> mean cross-entropy over labels != -100."""
        rows = None
        if labels is not None and self.sparse_labels and self.loss_fn is None:
            rows = labeled_positions(labels)
            labels = labels if rows is None else labels.reshape(-1).index_select(0, rows)
        x = self.features(tokens, segments, cache, pos, rows)
        if labels is not None and self.fused and self.loss_fn is None and not self.cfg.logit_softcap:
            # LM head + loss in chunks: the [tokens, vocab] logits never exist at once
            return ops.linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, labels.reshape(-1))
        logits = soft_cap(self.lm_head(x), self.cfg.logit_softcap)
        if labels is None:
            return logits
        if self.loss_fn is not None:
            return self.loss_fn(logits, labels)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def next_logits(self, tokens: torch.Tensor, cache: KVCache, pos: int = 0,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] at positions pos.. into `cache` -> the next-token logits [B, V] of each row's last position,
        or of position rows[b] of row b (a right-padded batch); a prompt's other positions never go through the LM
        head."""
        x = self.features(tokens, None, cache, pos)
        x = x[:, -1] if rows is None else x[torch.arange(len(rows), device=x.device), rows]
        return soft_cap(project(self.lm_head, x, most_rows=None, fused=self.fused), self.cfg.logit_softcap)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n


def labeled_positions(labels: torch.Tensor) -> torch.Tensor | None:
    """The flat positions of labels [B, T] that have a label, when some have none (an SFT prompt's tokens, MLM's
    unmasked ones): the last block's o_proj and MLP, the LM head and the loss skip the others, and the mean over the
    labeled rows is the same. None when every position or none has one (none: the loss's own rule for an empty
    mean). (The count is read on the host: one sync per micro-batch on a GPU, which the tasks with such labels
    already pay to count their targets; causal pretraining, whose labels are all real, does not call it.)"""
    rows = (labels != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    return None if len(rows) in (0, labels.numel()) else rows


def init_parameter_(cfg: ModelConfig, name: str, p: torch.Tensor) -> torch.Tensor:
    """The initial value of parameter `name`, in place: zeros for biases, a scale of 1 for norms, Normal(0, init_std)
    for matrices, residual-output projections scaled by 1/sqrt(2 * n_layers)."""
    if name.endswith("bias"):
        return nn.init.zeros_(p)
    if p.dim() == 1:  # norm weights: a scale of 1 (the weight itself, or 1 + weight with norm_one_plus)
        return nn.init.zeros_(p) if cfg.norm_one_plus and cfg.norm == "rmsnorm" else nn.init.ones_(p)
    if name.endswith(("o_proj.weight", "down.weight", "experts.down")):
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


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, eod_id: int | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Extend prompt [B, T] by up to max_new_tokens sampled tokens (greedy when temperature is 0). `vocab_limit`:
    the tokenizer's vocabulary; ids from there up to model.vocab_size are padding rows and never chosen."""
    was_training = model.training
    model.eval()
    cfg = model.cfg
    B, T = prompt.shape
    total = min(T + max_new_tokens, cfg.max_seq_len)
    param = next(model.parameters())
    cache = KVCache(cfg, B, total, prompt.device, param.dtype)
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    out = prompt
    logits = model.next_logits(prompt, cache, 0)
    for pos in range(T, total):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        out = torch.cat([out, nxt], dim=1)
        if eod_id is not None and bool((nxt == eod_id).all()):  # every row ended its document
            break
        if pos + 1 < total:
            logits = model.next_logits(nxt, cache, pos)
    model.train(was_training)
    return out
