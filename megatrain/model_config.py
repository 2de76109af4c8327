"""The network's section of the config, `model.*`, with its derived sizes and its checks.

config.py assembles it with the other sections (and re-exports everything here); model.py builds from it. Kept
apart so that a new model feature adds its key, its comment and its check in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


class _Section:
    """A config section: read-only once its Config is frozen (load_config freezes what the user asked for; what a
    run derives goes in a Resolved, never back into the sections)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            section = type(self).__name__.removesuffix("Config").lower()
            raise ConfigError(f"config key {section}.{name}: the config is read-only after validation (what a run "
                              f"derives goes in its Resolved)")
        object.__setattr__(self, name, value)


@dataclass
class ModelConfig(_Section):
    """The network: a decoder-only Transformer, or a bidirectional encoder with objective=mlm. A run that starts from
    weights (checkpoint.init, finetune.init) takes every key here from them but dropout, fused_kernels and compile;
    setting one to another value is refused."""

    # embedding (and LM head) rows; 0: the tokenizer's vocabulary rounded up to a multiple of pad_vocab_multiple and
    # of parallel.tp; a set value below the tokenizer's vocabulary is refused
    vocab_size: int = 0
    pad_vocab_multiple: int = 64  # round the embedding rows up to a multiple of this (fast matmuls); at least 1
    # how many of the vocab_size rows are real tokens (conversion from Hugging Face sets it when it pads); generation,
    # lm-eval and the Hugging Face export use only these; 0: the tokenizer's vocabulary
    true_vocab_size: int = 0
    n_layers: int = 2  # Transformer blocks; at least 1, and at least parallel.pp
    # attention (query) heads: divisible by parallel.tp; they divide d_model unless head_dim is set; with RoPE the
    # head size is even
    n_heads: int = 4
    # key/value heads for grouped-query attention: they divide n_heads and are divisible by parallel.tp; 0: n_heads
    # (plain multi-head attention)
    n_kv_heads: int = 0
    d_model: int = 128  # residual stream width (the hidden size)
    # the width of one attention head; 0: d_model / n_heads. Qwen3 and Gemma 3 set it apart (attention then works
    # at n_heads x head_dim, projected back to d_model)
    head_dim: int = 0
    # MLP hidden width; 0: 4 x d_model for mlp=gelu, 8/3 x d_model rounded up to a multiple of ff_multiple for
    # swiglu and geglu
    d_ff: int = 0
    ff_multiple: int = 64  # with d_ff=0 and a gated mlp, the hidden width is rounded up to a multiple of this
    # the longest sequence the model reads (rows of the learned position table, length of the RoPE tables);
    # data.seq_len may not exceed it
    max_seq_len: int = 256
    norm: str = "rmsnorm"  # rmsnorm (Llama) | layernorm (GPT-2; with a bias when bias is true)
    norm_eps: float = 1e-5  # the epsilon added to the mean square (rmsnorm) or variance (layernorm) in the norm
    # rmsnorm scales by (1 + weight), its weights starting at 0 (Gemma); false: by weight, starting at 1
    norm_one_plus: bool = False
    # where each block's norms sit: pre (before attention and the MLP: GPT-2, Llama) | sandwich (before and after
    # each: Gemma 2/3) | post (after each, on the branch before the residual add: OLMo 2)
    norm_placement: str = "pre"
    # a norm on queries and keys before RoPE: none | head (over each head's head_dim, one weight shared by the
    # heads: Qwen3, Gemma 3) | full (over the whole query and key projection: OLMo 2)
    qk_norm: str = "none"
    # rope (rotary embeddings on queries and keys) | learned (a table of absolute positions added to the token
    # embeddings, GPT-2)
    position: str = "rope"
    rope_theta: float = 10000.0  # RoPE base frequency (position=rope)
    # how RoPE's frequencies are stretched for a context longer than the one trained: none | linear (positions
    # divided by rope_factor) | llama3 (Llama 3.1's per-frequency blend) | yarn (YaRN, with its attention factor)
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # rope_scaling's stretch: the new context over the original one; at least 1
    # llama3 and yarn: the context length the model was first trained at (Llama 3.1: 8192)
    rope_original_max_len: int = 0
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/this are fully stretched
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/this are kept; those between blend
    rope_beta_fast: float = 32.0  # yarn: rotations over the original context above which a frequency is kept
    rope_beta_slow: float = 1.0  # yarn: rotations below which a frequency is fully stretched
    # RoPE base of the sliding-window layers (unscaled; Gemma 3: 10000); 0: rope_theta and rope_scaling, as the
    # other layers
    rope_local_theta: float = 0.0
    # a query attends to at most this many keys (itself and the ones before it) on the sliding-window layers
    # (Mistral: 4096; Gemma 3: 512 or 1024); 0: every layer attends to the whole context
    sliding_window: int = 0
    # with sliding_window: every this many blocks, the last attends to the whole context (Gemma 3: 6, i.e. 5 local
    # to 1 global; Gemma 2: 2); 0: every block uses the window
    global_attn_every: int = 0
    # attention scores are scaled by 1/sqrt(this) (Gemma's query_pre_attn_scalar); 0: 1/sqrt(head_dim)
    attn_scale_dim: int = 0
    # attention scores soft-capped to (-cap, cap) by cap x tanh(score / cap) (Gemma 2); 0: off
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0  # the same on the final logits (Gemma 2); 0: off
    # swiglu (gated SiLU MLP, Llama) | geglu (gated tanh-GeLU MLP, Gemma) | gelu (two linear layers around a GELU,
    # GPT-2)
    mlp: str = "swiglu"
    gelu: str = "tanh"  # mlp=gelu's form: tanh (GPT-2's approximation) | erf (the exact one: nanoGPT, BERT, Pythia)
    bias: bool = False  # biases in the linear layers and the layernorm (GPT-2); false: none (Llama)
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2); implied by bias
    # the token embeddings are multiplied by sqrt(d_model) (Gemma); the tied LM head reads the weights unscaled
    embed_scale: bool = False
    tie_embeddings: bool = False  # the LM head (output projection) shares the input embedding's weight
    # dropout probability on attention probabilities, residual branches and embeddings, in [0, 1); 0: off
    dropout: float = 0.0
    init_std: float = 0.02  # std of the normal init; residual output projections get init_std/sqrt(2*n_layers)
    # causal (GPT-style next-token prediction) | mlm (BERT-style masked LM, bidirectional attention; needs a
    # tokenizer with a mask token, masks data.mlm_probability of the tokens)
    objective: str = "causal"
    # Mixture of Experts (moe.py): routed experts in each MoE block's feed-forward layer; 0: a dense model (every
    # block a plain MLP)
    moe_experts: int = 0
    moe_top_k: int = 2  # experts each token is sent to (Mixtral: 2, Qwen3-MoE and OLMoE: 8); at most moe_experts
    moe_ffn: int = 0  # one expert's hidden width (Qwen's moe_intermediate_size); 0: as a dense MLP (d_ff's rule)
    # shared experts, always on (Qwen2-MoE, DeepSeek), held as one MLP of moe_shared_experts x moe_ffn width
    moe_shared_experts: int = 0
    moe_shared_ffn: int = 0  # the shared MLP's hidden width when set apart (Qwen2-MoE); 0: moe_shared_experts x moe_ffn
    # the shared experts' output is scaled by sigmoid(a learned projection of the token) (Qwen2-MoE)
    moe_shared_gate: bool = False
    # which blocks are MoE: all | every N (blocks N-1, 2N-1, ...: the last of every N, Qwen2-MoE's
    # decoder_sparse_step) | after K (all but the first K, which stay dense: DeepSeek's first_k_dense_replace)
    moe_layers: str = "all"
    # softmax_topk (a softmax over every expert, then the k largest: Qwen, OLMoE) | topk_softmax (the k largest
    # logits, then a softmax over them: Mixtral; the same weights as softmax_topk with moe_norm_topk)
    moe_router: str = "softmax_topk"
    moe_norm_topk: bool = True  # softmax_topk: rescale the k weights to sum to 1 (Qwen3-MoE: true; OLMoE: false)
    # coefficient of the load-balancing loss (Switch Transformer's E x sum f_i P_i, 1 when balanced); 0: off
    moe_aux_loss: float = 0.01
    moe_z_loss: float = 0.0  # coefficient of the router z-loss (ST-MoE: 0.001); 0: off
    # 0: dropless (every token reaches its k experts); > 0: an expert takes at most ceil(moe_capacity x tokens x
    # moe_top_k / moe_experts) rows of a batch, the rest dropped (and counted in the metrics)
    moe_capacity: float = 0.0
    # auto (megatrain's fused ops when its extension megatrain._C is built, else the PyTorch reference; on a GPU each
    # op is first checked against the reference and turned off if it disagrees) | on (the fused ops; an error when
    # the extension is not built) | off (plain PyTorch)
    fused_kernels: str = "auto"
    # compile each block with torch.compile when training (regional: one graph per block shape, reused by every
    # block; the embedding, the loss and DeepSpeed stay eager); the blocks then run plain PyTorch ops, which inductor
    # fuses itself. The first steps pay the compilation (tens of seconds on a CPU). With tp, pp, cp, ep, ZeRO-3 or
    # selective activation checkpointing: refused
    compile: bool = False


MODEL_CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.norm_placement": ("pre", "sandwich", "post"),
    "model.qk_norm": ("none", "head", "full"),
    "model.position": ("rope", "learned"),
    "model.rope_scaling": ("none", "linear", "llama3", "yarn"),
    "model.mlp": ("swiglu", "geglu", "gelu"),
    "model.gelu": ("tanh", "erf"),
    "model.objective": ("causal", "mlm"),
    "model.fused_kernels": ("auto", "on", "off"),
    "model.moe_router": ("softmax_topk", "topk_softmax"),
}


def ffn_width(m: ModelConfig) -> int:
    if m.d_ff:
        return m.d_ff
    if m.mlp == "gelu":
        return 4 * m.d_model
    hidden = int(8 * m.d_model / 3)
    return -(-hidden // m.ff_multiple) * m.ff_multiple


def padded_vocab_size(n: int, pad_vocab_multiple: int, tp: int) -> int:
    """The embedding rows for an n-piece tokenizer: rounded up to pad_vocab_multiple and to a multiple of tp."""
    step = math.lcm(pad_vocab_multiple, tp)
    return -(-n // step) * step


def kv_heads(m: ModelConfig) -> int:
    return m.n_kv_heads or m.n_heads


def kv_repeat(kv_heads_per_tp_rank: int, cp: int) -> int:
    """How many times context parallelism repeats each of a TP rank's KV heads so that cp ranks get whole, equal
    shares (parallel/context.py): 1 when cp divides them."""
    return cp // math.gcd(kv_heads_per_tp_rank, cp)


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.n_heads


def is_local_layer(m: ModelConfig, i: int) -> bool:
    """Whether block i attends within model.sliding_window (else to the whole context)."""
    if not m.sliding_window:
        return False
    return not (m.global_attn_every and (i + 1) % m.global_attn_every == 0)


def has_window_layers(m: ModelConfig) -> bool:
    """Whether any block attends within model.sliding_window."""
    return any(is_local_layer(m, i) for i in range(m.n_layers))


def moe_layer_rule(m: ModelConfig) -> tuple[str, int]:
    """model.moe_layers parsed: ("all", 0), ("every", N) or ("after", K); a ConfigError when it is neither."""
    words = m.moe_layers.split()
    if words == ["all"]:
        return "all", 0
    if len(words) == 2 and words[0] in ("every", "after") and words[1].isdigit():
        n = int(words[1])
        if words[0] == "after" or n >= 1:
            return words[0], n
    raise ConfigError(f"config key model.moe_layers: {m.moe_layers!r} is not one of 'all', 'every N' (N >= 1) or "
                      f"'after K'")


def is_moe_layer(m: ModelConfig, i: int) -> bool:
    """Whether block i's feed-forward layer is a Mixture of Experts."""
    if not m.moe_experts:
        return False
    kind, n = moe_layer_rule(m)
    return kind == "all" or (kind == "every" and (i + 1) % n == 0) or (kind == "after" and i >= n)


def moe_ffn_width(m: ModelConfig) -> int:
    """One routed expert's hidden width."""
    return m.moe_ffn or ffn_width(m)


def shared_ffn_width(m: ModelConfig) -> int:
    """The shared experts' hidden width (one MLP); 0: none."""
    return m.moe_shared_ffn or m.moe_shared_experts * moe_ffn_width(m)


def validate_model(m: ModelConfig) -> None:
    """The model section's ranges and combinations (choices are checked with the other sections')."""
    positive = {"model.n_layers": m.n_layers, "model.n_heads": m.n_heads, "model.d_model": m.d_model,
                "model.max_seq_len": m.max_seq_len, "model.pad_vocab_multiple": m.pad_vocab_multiple}
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"config key {k}: must be at least 1, got {v}")
    for k in ("head_dim", "sliding_window", "global_attn_every", "attn_scale_dim", "rope_original_max_len"):
        if getattr(m, k) < 0:
            raise ConfigError(f"config key model.{k}: must be at least 0, got {getattr(m, k)}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"config key model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads} "
                          f"(or set model.head_dim)")
    if head_dim(m) % 2 and m.position == "rope":
        raise ConfigError(f"config key model.n_heads: head size {head_dim(m)} must be even for RoPE")
    if m.n_heads % kv_heads(m):
        raise ConfigError(f"config key model.n_kv_heads: model.n_heads={m.n_heads} is not divisible by {kv_heads(m)}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"config key model.dropout: must be in [0, 1), got {m.dropout}")
    for k in ("attn_softcap", "logit_softcap", "rope_local_theta"):
        if not getattr(m, k) >= 0:
            raise ConfigError(f"config key model.{k}: must be at least 0 (0: off), got {getattr(m, k)}")
    if not m.rope_theta > 0:
        raise ConfigError(f"config key model.rope_theta: must be above 0, got {m.rope_theta}")
    if m.norm_one_plus and m.norm != "rmsnorm":
        raise ConfigError("config key model.norm_one_plus: needs model.norm=rmsnorm")
    if m.rope_scaling != "none":
        if m.position != "rope":
            raise ConfigError(f"config key model.rope_scaling: {m.rope_scaling} needs model.position=rope")
        if not m.rope_factor >= 1:
            raise ConfigError(f"config key model.rope_factor: must be at least 1, got {m.rope_factor}")
        if m.rope_scaling in ("llama3", "yarn") and not m.rope_original_max_len:
            raise ConfigError(f"config key model.rope_original_max_len: rope_scaling={m.rope_scaling} needs the "
                              f"original context length (Llama 3.1: 8192)")
        if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
            raise ConfigError(f"config key model.rope_low_freq_factor: needs 0 < rope_low_freq_factor < "
                              f"rope_high_freq_factor, got {m.rope_low_freq_factor} and {m.rope_high_freq_factor}")
        if m.rope_scaling == "yarn" and not 0 < m.rope_beta_slow < m.rope_beta_fast:
            raise ConfigError(f"config key model.rope_beta_slow: needs 0 < rope_beta_slow < rope_beta_fast, got "
                              f"{m.rope_beta_slow} and {m.rope_beta_fast}")
    if m.global_attn_every and not m.sliding_window:
        raise ConfigError("config key model.global_attn_every: needs model.sliding_window > 0")
    if m.sliding_window and m.objective != "causal":
        raise ConfigError("config key model.sliding_window: needs model.objective=causal")
    if m.qk_norm != "none" and m.norm != "rmsnorm":
        raise ConfigError(f"config key model.qk_norm: {m.qk_norm} needs model.norm=rmsnorm")
    if m.moe_experts:
        _validate_moe(m)
    elif m.moe_experts < 0:
        raise ConfigError(f"config key model.moe_experts: must be at least 0 (0: dense), got {m.moe_experts}")


def _validate_moe(m: ModelConfig) -> None:
    if not 1 <= m.moe_top_k <= m.moe_experts:
        raise ConfigError(f"config key model.moe_top_k: must be between 1 and model.moe_experts={m.moe_experts}, got "
                          f"{m.moe_top_k}")
    for k in ("moe_ffn", "moe_shared_experts", "moe_shared_ffn"):
        if getattr(m, k) < 0:
            raise ConfigError(f"config key model.{k}: must be at least 0, got {getattr(m, k)}")
    for k in ("moe_aux_loss", "moe_z_loss", "moe_capacity"):
        if not getattr(m, k) >= 0:
            raise ConfigError(f"config key model.{k}: must be at least 0 (0: off), got {getattr(m, k)}")
    if m.moe_shared_gate and not shared_ffn_width(m):
        raise ConfigError("config key model.moe_shared_gate: needs a shared expert (model.moe_shared_experts >= 1)")
    if m.bias:
        raise ConfigError("config key model.bias: experts have no biases; set model.bias=false with model.moe_experts")
    moe_layer_rule(m)
    if not any(is_moe_layer(m, i) for i in range(m.n_layers)):
        raise ConfigError(f"config key model.moe_layers: {m.moe_layers!r} makes none of the {m.n_layers} blocks a "
                          f"MoE block")
