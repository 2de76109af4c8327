"""The Hugging Face families megatrain converts, one table each, and their config.json translation both ways.

A Family names, for every megatrain parameter, the HF tensors it fuses (in row order), the model keys the family
fixes (`fixed`: set on import, required on export) and the features it can vary (`free`). Import reads config.json
into a ModelConfig (`model_config_of`), refusing in one line what the class computes and megatrain does not; export
writes the config the class reads back (`hf_config_kwargs`); `family_of` picks the class by the model's features.

    LlamaForCausalLM    pre-RMSNorm, RoPE (default, linear, llama3, yarn), SwiGLU, GQA, head_dim, all biases or none
    MistralForCausalLM  Llama's maps, every layer within sliding_window
    Qwen2ForCausalLM    Llama with q/k/v biases (qkv_bias)
    Qwen3ForCausalLM    Llama with a per-head QK-norm (qk_norm=head)
    Gemma2ForCausalLM   sandwich norms (1 + w), sqrt(d) embeddings, GeGLU, query_pre_attn_scalar, window layers by
                        layer_types, attention and final soft-caps
    Gemma3ForCausalLM   Gemma 2 with qk_norm=head, no attention soft-cap, its own RoPE base on the window layers
    Phi3ForCausalLM     Llama with q|k|v and gate|up stored fused (as megatrain's), every layer within sliding_window
    Olmo2ForCausalLM    norms after each sublayer (norm_placement=post), QK-norm over the whole projection
    GPT2LMHeadModel     LayerNorm, learned positions, GeLU, biases; Conv1D weights stored transposed
    MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM: Mixture of Experts (their maps
                        and config keys in hf_moe.py); DeepseekV3ForCausalLM and GptOssForCausalLM refused by name
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from megatrain.checkpoint.hf_moe import (MIXTRAL_MOE, MOE_NEUTRAL, QWEN2_MOE, QWEN_MOE, moe_config_kwargs,
                                         moe_features, moe_fields, say_moe)
from megatrain.checkpoint.reader import CheckpointError
from megatrain.config import ConfigError, ModelConfig, has_window_layers, head_dim, is_local_layer, kv_heads
from megatrain.model_config import ffn_width, validate_model


@dataclass(frozen=True)
class Family:
    architecture: str
    top: dict  # megatrain name -> HF name, outside the blocks
    # megatrain name after "layers.N." -> HF names after layer_prefix (fused parts, in row order; names with "{e}":
    # one tensor per expert, stacked: hf_moe.py)
    layer: dict
    layer_prefix: str
    transposed: tuple[str, ...] = ()  # HF weights stored [in, out] (GPT-2's Conv1D)
    config_class: str = ""  # the transformers config class export builds
    fixed: dict = field(default_factory=dict)  # model features the family sets (beyond NEUTRAL)
    free: tuple[str, ...] = ()  # features it expresses, whatever their value
    defaults: dict = field(default_factory=dict)  # the class's values for config.json keys left out
    refused_if_set: tuple[str, ...] = ()  # config.json switches the class reads and megatrain does not compute
    ignored: tuple[str, ...] = ()  # config.json keys the class does not apply (a note when set)


# A model's features (`features` below) when a family does not fix them: the plain pre-norm Llama block.
NEUTRAL = dict(norm="rmsnorm", position="rope", mlp="swiglu", gelu="tanh", norm_placement="pre", qk_norm="none",
               norm_one_plus=False, embed_scale=False, bias=False, qkv_bias=False, gqa=False, head_dim=0,
               rope_scaling="none", sliding_window=0, global_attn_every=0, rope_local_theta=0.0, attn_scale_dim=0,
               attn_softcap=0.0, logit_softcap=0.0, **MOE_NEUTRAL)
ROPE_FREE = ("gqa", "head_dim", "rope_scaling")  # what every RoPE family expresses

_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_ATTN = {"attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
         "attn.o_proj.weight": ("self_attn.o_proj.weight",)}
_MLP = {"mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "mlp.down.weight": ("mlp.down_proj.weight",)}
_QK_NORM = {"attn.q_norm.weight": ("self_attn.q_norm.weight",), "attn.k_norm.weight": ("self_attn.k_norm.weight",)}
_PRE_NORMS = {"attn_norm.weight": ("input_layernorm.weight",), "mlp_norm.weight": ("post_attention_layernorm.weight",)}
_GEMMA_NORMS = {"attn_norm.weight": ("input_layernorm.weight",),
                "attn_post_norm.weight": ("post_attention_layernorm.weight",),
                "mlp_norm.weight": ("pre_feedforward_layernorm.weight",),
                "mlp_post_norm.weight": ("post_feedforward_layernorm.weight",)}
_PREFIX = "model.layers.{}."

LLAMA = Family(
    "LlamaForCausalLM", _TOP,
    {**_PRE_NORMS, **_ATTN, **_MLP,
     "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
     "attn.o_proj.bias": ("self_attn.o_proj.bias",), "mlp.gate_up.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
     "mlp.down.bias": ("mlp.down_proj.bias",)},
    _PREFIX, config_class="LlamaConfig", free=ROPE_FREE + ("bias",),
    defaults=dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False))
MISTRAL = Family(
    "MistralForCausalLM", _TOP, {**_PRE_NORMS, **_ATTN, **_MLP}, _PREFIX, config_class="MistralConfig",
    free=ROPE_FREE + ("sliding_window",),
    defaults=dict(max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096))
QWEN2 = Family(
    "Qwen2ForCausalLM", _TOP,
    {**_PRE_NORMS, **_ATTN, **_MLP,
     "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")},
    _PREFIX, config_class="Qwen2Config", fixed=dict(qkv_bias=True), free=ROPE_FREE,
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    refused_if_set=("use_sliding_window",))
QWEN3 = Family(
    "Qwen3ForCausalLM", _TOP, {**_PRE_NORMS, **_ATTN, **_QK_NORM, **_MLP}, _PREFIX, config_class="Qwen3Config",
    fixed=dict(qk_norm="head"), free=ROPE_FREE,
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=128),
    refused_if_set=("use_sliding_window", "attention_bias"))
_GEMMA = dict(norm_placement="sandwich", norm_one_plus=True, embed_scale=True, mlp="geglu")
GEMMA2 = Family(
    "Gemma2ForCausalLM", _TOP, {**_GEMMA_NORMS, **_ATTN, **_MLP}, _PREFIX, config_class="Gemma2Config",
    fixed=_GEMMA, free=ROPE_FREE + ("sliding_window", "global_attn_every", "attn_scale_dim", "attn_softcap",
                                    "logit_softcap"),
    defaults=dict(max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=256,
                  sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                  final_logit_softcapping=30.0, sliding_window_pattern=2),
    refused_if_set=("attention_bias", "use_bidirectional_attention"))
GEMMA3 = Family(
    "Gemma3ForCausalLM", _TOP, {**_GEMMA_NORMS, **_ATTN, **_QK_NORM, **_MLP}, _PREFIX,
    config_class="Gemma3TextConfig", fixed=dict(_GEMMA, qk_norm="head"),
    free=ROPE_FREE + ("sliding_window", "global_attn_every", "rope_local_theta", "attn_scale_dim", "logit_softcap"),
    defaults=dict(max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=256,
                  sliding_window=4096, query_pre_attn_scalar=256, final_logit_softcapping=None,
                  sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4),
    refused_if_set=("attention_bias", "use_bidirectional_attention"), ignored=("attn_logit_softcapping",))
PHI3 = Family(
    "Phi3ForCausalLM", _TOP,
    {**_PRE_NORMS, "attn.qkv.weight": ("self_attn.qkv_proj.weight",),
     "attn.o_proj.weight": ("self_attn.o_proj.weight",), "mlp.gate_up.weight": ("mlp.gate_up_proj.weight",),
     "mlp.down.weight": ("mlp.down_proj.weight",)},
    _PREFIX, config_class="Phi3Config", free=("gqa", "head_dim", "sliding_window"),
    defaults=dict(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None))
OLMO2 = Family(
    "Olmo2ForCausalLM", _TOP,
    {"attn_post_norm.weight": ("post_attention_layernorm.weight",),
     "mlp_post_norm.weight": ("post_feedforward_layernorm.weight",), **_ATTN, **_QK_NORM, **_MLP},
    _PREFIX, config_class="Olmo2Config", fixed=dict(norm_placement="post", qk_norm="full"), free=ROPE_FREE,
    defaults=dict(max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    refused_if_set=("attention_bias",))
GPT2 = Family(
    "GPT2LMHeadModel",
    {"embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
     "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
     "lm_head.weight": "lm_head.weight"},
    {"attn_norm.weight": ("ln_1.weight",), "attn_norm.bias": ("ln_1.bias",),
     "attn.qkv.weight": ("attn.c_attn.weight",), "attn.qkv.bias": ("attn.c_attn.bias",),
     "attn.o_proj.weight": ("attn.c_proj.weight",), "attn.o_proj.bias": ("attn.c_proj.bias",),
     "mlp_norm.weight": ("ln_2.weight",), "mlp_norm.bias": ("ln_2.bias",),
     "mlp.up.weight": ("mlp.c_fc.weight",), "mlp.up_bias": ("mlp.c_fc.bias",),
     "mlp.down.weight": ("mlp.c_proj.weight",), "mlp.down.bias": ("mlp.c_proj.bias",)},
    "transformer.h.{}.",
    transposed=("attn.qkv.weight", "attn.o_proj.weight", "mlp.up.weight", "mlp.down.weight"),
    config_class="GPT2Config", fixed=dict(norm="layernorm", position="learned", mlp="gelu", bias=True),
    free=("gelu",))
_MOE = dict(moe=True)  # (a feature, not a model key: the config's moe_* keys come from hf_moe.moe_fields)
_MOE_FREE = ("moe_layers", "moe_norm_topk")  # Qwen's decoder_sparse_step / mlp_only_layers, norm_topk_prob
MIXTRAL = Family(
    "MixtralForCausalLM", _TOP, {**_PRE_NORMS, **_ATTN, **MIXTRAL_MOE}, _PREFIX, config_class="MixtralConfig",
    fixed=dict(_MOE, moe_norm_topk=True), free=ROPE_FREE + ("sliding_window",),
    defaults=dict(max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                  rope_theta=1e6, router_aux_loss_coef=0.001))
QWEN2_MOE_FAMILY = Family(
    "Qwen2MoeForCausalLM", _TOP,
    {**_PRE_NORMS, **_ATTN, **_MLP, **QWEN2_MOE,
     "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")},
    _PREFIX, config_class="Qwen2MoeConfig", fixed=dict(_MOE, moe_shared=True, moe_shared_gate=True),
    free=ROPE_FREE + _MOE_FREE + ("qkv_bias",),
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True,
                  router_aux_loss_coef=0.001, norm_topk_prob=False),
    refused_if_set=("use_sliding_window",))
QWEN3_MOE = Family(
    "Qwen3MoeForCausalLM", _TOP, {**_PRE_NORMS, **_ATTN, **_QK_NORM, **_MLP, **QWEN_MOE}, _PREFIX,
    config_class="Qwen3MoeConfig", fixed=dict(_MOE, qk_norm="head"), free=ROPE_FREE + _MOE_FREE,
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  router_aux_loss_coef=0.001, norm_topk_prob=False),
    refused_if_set=("use_sliding_window", "attention_bias"))
OLMOE = Family(
    "OlmoeForCausalLM", _TOP, {**_PRE_NORMS, **_ATTN, **_QK_NORM, **QWEN_MOE}, _PREFIX, config_class="OlmoeConfig",
    fixed=dict(_MOE, qk_norm="full"), free=("gqa", "rope_scaling", "moe_norm_topk"),
    defaults=dict(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  router_aux_loss_coef=0.01, norm_topk_prob=False),
    refused_if_set=("attention_bias", "clip_qkv"))
MOE_FAMILIES = (MIXTRAL, QWEN2_MOE_FAMILY, QWEN3_MOE, OLMOE)
# export tries them in this order (after the class a checkpoint was imported from): the plainest that fits first
FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3, GEMMA2, PHI3, OLMO2, GPT2) + MOE_FAMILIES
READS = {f.architecture: f for f in FAMILIES}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# -- export: which class, and its config --------------------------------------------------------------------------


def features(m: ModelConfig) -> dict:
    """What a transformers class has to compute for `m`, each in one normal form (a window no layer uses is none,
    a head_dim of d_model / n_heads is the default, ...)."""
    hd = head_dim(m)
    local = [is_local_layer(m, i) for i in range(m.n_layers)]
    windowed = any(local)
    own_local_rope = m.rope_local_theta and (m.rope_local_theta != m.rope_theta or m.rope_scaling != "none")
    return dict(norm=m.norm, position=m.position, mlp=m.mlp, gelu=m.gelu if m.mlp == "gelu" else "tanh",
                norm_placement=m.norm_placement, qk_norm=m.qk_norm, norm_one_plus=m.norm_one_plus,
                embed_scale=m.embed_scale, bias=m.bias, qkv_bias=m.qkv_bias and not m.bias,
                gqa=kv_heads(m) != m.n_heads, head_dim=hd if m.head_dim and hd * m.n_heads != m.d_model else 0,
                rope_scaling=m.rope_scaling, sliding_window=m.sliding_window if windowed else 0,
                global_attn_every=m.global_attn_every if windowed and not all(local) else 0,
                rope_local_theta=m.rope_local_theta if windowed and own_local_rope else 0.0,
                attn_scale_dim=m.attn_scale_dim if m.attn_scale_dim not in (0, hd) else 0,
                attn_softcap=m.attn_softcap, logit_softcap=m.logit_softcap, **moe_features(m))


def _misfits(f: dict, fam: Family) -> list[str]:
    return [k for k, want in {**NEUTRAL, **fam.fixed}.items() if k not in fam.free and f[k] != want]


def _say(k: str, v) -> str:
    if k == "gqa":
        return "n_kv_heads<n_heads" if v else "n_kv_heads=n_heads"
    if say_moe(k, v):
        return say_moe(k, v)
    return f"{k}={str(v).lower() if isinstance(v, bool) else v}"


def family_of(m: ModelConfig, prefer: str | None = None) -> Family:
    """The transformers class that computes megatrain's model (`prefer`, the class it was imported from, when that
    one does), or one line naming the model keys no class expresses."""
    if m.objective != "causal":
        raise CheckpointError(f"model.objective={m.objective}: transformers has no causal-LM class for a masked LM; "
                              f"use `megatrain convert consolidate` for its weights")
    f = features(m)
    order = sorted(FAMILIES, key=lambda fam: fam.architecture != prefer)
    misfits = {fam.architecture: _misfits(f, fam) for fam in order}
    for fam in order:
        if not misfits[fam.architecture]:
            return fam
    # the closest: a class of the same kind (MoE or dense) first, then the fewest keys apart
    closest = min(order, key=lambda fam: ("moe" in misfits[fam.architecture], len(misfits[fam.architecture])))
    bad = misfits[closest.architecture]
    want = {**NEUTRAL, **closest.fixed}
    raise CheckpointError(f"model.{', '.join(_say(k, f[k]) for k in bad)}: no transformers class computes this model "
                          f"(the closest, {closest.architecture}, has {', '.join(_say(k, want[k]) for k in bad)})")


def rope_parameters(m: ModelConfig, theta: float, scaled: bool = True) -> dict:
    """transformers' rope_parameters for RoPE base `theta` with model.rope_scaling (`scaled`) or without."""
    d = {"rope_type": "default", "rope_theta": theta}
    kind = m.rope_scaling if scaled else "none"
    if kind == "linear":
        d.update(rope_type="linear", factor=m.rope_factor)
    elif kind == "llama3":
        d.update(rope_type="llama3", factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                 high_freq_factor=m.rope_high_freq_factor, original_max_position_embeddings=m.rope_original_max_len)
    elif kind == "yarn":
        d.update(rope_type="yarn", factor=m.rope_factor, beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow,
                 original_max_position_embeddings=m.rope_original_max_len)
    return d


def hf_config_kwargs(m: ModelConfig, fam: Family, vocab: int) -> dict:
    """The keyword arguments of fam.config_class that make its class compute `m` (with `vocab` rows)."""
    if fam is GPT2:
        return dict(vocab_size=vocab, n_positions=m.max_seq_len, n_embd=m.d_model, n_layer=m.n_layers,
                    n_head=m.n_heads, n_inner=ffn_width(m),
                    activation_function="gelu_new" if m.gelu == "tanh" else "gelu",
                    layer_norm_epsilon=m.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings)
    hd, free = head_dim(m), fam.free
    kw = dict(vocab_size=vocab, hidden_size=m.d_model, intermediate_size=ffn_width(m), num_hidden_layers=m.n_layers,
              num_attention_heads=m.n_heads, num_key_value_heads=kv_heads(m), head_dim=hd,
              max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
              initializer_range=m.init_std, attention_dropout=0.0, rope_parameters=rope_parameters(m, m.rope_theta))
    if m.mlp == "geglu":
        kw["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        kw["hidden_act"] = "silu"
    for key in fam.refused_if_set:
        kw[key] = False
    if "bias" in free:
        kw.update(attention_bias=m.bias, mlp_bias=m.bias)
    windowed = has_window_layers(m)
    if "global_attn_every" in free:  # Gemma: a window per layer type (as long as the context when none is used)
        kw["sliding_window"] = m.sliding_window if windowed else m.max_seq_len
        kw["layer_types"] = ["sliding_attention" if is_local_layer(m, i) else "full_attention"
                             for i in range(m.n_layers)]
        kw["query_pre_attn_scalar"] = m.attn_scale_dim or hd
        kw["final_logit_softcapping"] = m.logit_softcap or None
        kw["attn_logit_softcapping"] = m.attn_softcap or None
    elif "sliding_window" in free:
        kw["sliding_window"] = m.sliding_window if windowed else None
    if "rope_local_theta" in free:
        local = m.rope_local_theta or m.rope_theta
        kw["rope_parameters"] = {"full_attention": rope_parameters(m, m.rope_theta),
                                 "sliding_attention": rope_parameters(m, local, scaled=not m.rope_local_theta)}
    if fam in (QWEN2, QWEN3, QWEN2_MOE_FAMILY, QWEN3_MOE):
        kw["max_window_layers"] = m.n_layers
    if fam is QWEN2_MOE_FAMILY:
        kw["qkv_bias"] = m.qkv_bias
    if fam in MOE_FAMILIES:
        kw.update(moe_config_kwargs(m, fam.architecture))
    if fam is PHI3:
        kw.update(original_max_position_embeddings=m.max_seq_len, resid_pdrop=0.0, embd_pdrop=0.0)
    return kw


# -- import: config.json -> ModelConfig ----------------------------------------------------------------------------


REQUIRED = object()  # config_count's default for a key every config.json of the family has


def config_count(c: dict, key: str, path: str, default=REQUIRED):
    """config.json's `key`, a whole number above 0; `default` where the key is absent or null (transformers' own
    default). One line naming the file and the key when a required one is missing or a value is not such a number."""
    v = c.get(key)
    if v is None:
        if default is REQUIRED:
            raise CheckpointError(f"{path}: no {key}; a Hugging Face config.json of this architecture names it "
                                  f"(add it, or save the model again with transformers' save_pretrained)")
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CheckpointError(f"{path}: {key} {v!r} is not a whole number above 0")
    return v


class _Reader:
    """One config.json, with the family's defaults for absent keys and one-line refusals."""

    def __init__(self, c: dict, path: str, fam: Family):
        self.c, self.path, self.fam = c, path, fam

    def get(self, key: str, default=None):
        return self.c[key] if key in self.c else self.fam.defaults.get(key, default)

    def count(self, key: str, default=REQUIRED):
        return config_count(self.c, key, self.path, self.fam.defaults.get(key, default))

    def number(self, key: str, value, least: float = 0.0, above: bool = True) -> float:
        """`value` (config.json's `key`) as a float above (or at least) `least`."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (value > least if above else value >= least)
        if not ok:
            self.refuse(f"{key} {value!r}", f"a number {'above' if above else 'at least'} {least:g}")
        return float(value)

    def refuse(self, what: str, why: str = "which megatrain's model does not compute") -> None:
        raise CheckpointError(f"{self.path}: {what}: {why}")


def _scaling(r: _Reader, rope: dict, where: str, max_len: int) -> dict:
    """megatrain's rope_scaling keys for one transformers rope_parameters dict (`where` names it in config.json)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind not in ROPE_TYPES:
        r.refuse(f"{where}.rope_type {kind!r}", f"megatrain computes RoPE {', '.join(ROPE_TYPES)}")
    orig = rope.get("original_max_position_embeddings") or max_len
    factor = rope.get("factor")
    if factor is None and kind == "yarn":
        factor = max_len / orig  # transformers' own rule for a yarn factor left out
    out = dict(rope_scaling=kind, rope_factor=r.number(f"{where}.factor", factor, 1.0, above=False))
    if kind == "llama3":
        out.update(rope_original_max_len=orig,
                   rope_low_freq_factor=r.number(f"{where}.low_freq_factor", rope.get("low_freq_factor")),
                   rope_high_freq_factor=r.number(f"{where}.high_freq_factor", rope.get("high_freq_factor")))
    elif kind == "yarn":
        f = out["rope_factor"]
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            r.refuse(f"{where}.mscale {rope['mscale']} with mscale_all_dim {rope['mscale_all_dim']}",
                     "megatrain's YaRN takes the attention factor 0.1 ln(factor) + 1")
        gain = rope.get("attention_factor")
        if gain is not None and not math.isclose(gain, 0.1 * math.log(f) + 1 if f > 1 else 1.0, rel_tol=1e-9):
            r.refuse(f"{where}.attention_factor {gain}", "megatrain's YaRN takes 0.1 ln(factor) + 1")
        if rope.get("truncate", True) is not True:
            r.refuse(f"{where}.truncate {rope['truncate']}", "megatrain's YaRN rounds the correction range")
        out.update(rope_original_max_len=orig, rope_beta_fast=float(rope.get("beta_fast") or 32),
                   rope_beta_slow=float(rope.get("beta_slow") or 1))
    return out


def _rope(r: _Reader, max_len: int) -> dict:
    """RoPE base, scaling and (Gemma 3) the window layers' base, from rope_parameters or the older rope_theta +
    rope_scaling keys."""
    c, fam = r.c, r.fam
    params = c.get("rope_parameters") or {}
    if "rope_local_theta" in fam.free:  # Gemma 3: one dict per layer type
        if "full_attention" in params or "sliding_attention" in params:
            full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        else:
            full, local = dict(params or c.get("rope_scaling") or {}), {}
        full.setdefault("rope_theta", r.get("rope_theta"))
        local.setdefault("rope_theta", r.get("rope_local_base_freq"))
        out = _scaling(r, full, "rope_parameters.full_attention", max_len)
        out["rope_theta"] = r.number("rope_parameters.full_attention.rope_theta", full["rope_theta"])
        kind = local.get("rope_type", local.get("type", "default"))
        if kind != "default":  # scaled: only as the full layers are (megatrain's rope_local_theta=0)
            same = _scaling(r, local, "rope_parameters.sliding_attention", max_len) == \
                {k: v for k, v in out.items() if k != "rope_theta"} and local["rope_theta"] == full["rope_theta"]
            if not same:
                r.refuse(f"rope_parameters.sliding_attention.rope_type {kind!r}", "megatrain's sliding-window layers "
                         "take an unscaled RoPE (model.rope_local_theta) or the full layers' own")
            return out
        out["rope_local_theta"] = r.number("rope_parameters.sliding_attention.rope_theta", local["rope_theta"])
        return out
    rope = params or c.get("rope_scaling") or {}
    where = "rope_parameters" if params else "rope_scaling"
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        r.refuse(f"partial_rotary_factor {partial}", "megatrain rotates every dimension of the head")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and "rope_scaling" not in fam.free:
        r.refuse(f"{where}.rope_type {kind!r}", f"megatrain reads {fam.architecture} with the default RoPE only")
    out = _scaling(r, rope, where, max_len)
    out["rope_theta"] = r.number("rope_theta", rope.get("rope_theta") or r.get("rope_theta") or 10000.0)
    return out


def _windows(r: _Reader, n_layers: int) -> dict:
    """sliding_window (and, from Gemma's layer_types, global_attn_every)."""
    fam = r.fam
    if "sliding_window" not in fam.free:
        return {}
    window = r.count("sliding_window", None)
    if "global_attn_every" not in fam.free:  # Mistral, Phi-3: every layer within the window
        return dict(sliding_window=window or 0)
    types = r.c.get("layer_types")
    if types is None:  # the class's own pattern: every sliding_window_pattern-th layer global
        every = r.get("sliding_window_pattern")
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or \
            not set(types) <= {"full_attention", "sliding_attention"}:
        r.refuse(f"layer_types {types!r}", f"expected {n_layers} of full_attention or sliding_attention")
    if not window or "sliding_attention" not in types:
        return {}
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    every = full[0] + 1 if full else 0
    if any((t == "full_attention") != bool(every and (i + 1) % every == 0) for i, t in enumerate(types)):
        r.refuse(f"layer_types {types}", "megatrain's model.global_attn_every makes every k-th layer global, no "
                                         "other pattern")
    return dict(sliding_window=window, global_attn_every=every)


def model_config_of(c: dict, path: str, fam: Family) -> ModelConfig:
    """config.json (`c`, read from `path`) of a family -> megatrain's ModelConfig; one line for what megatrain cannot
    compute."""
    r = _Reader(c, path, fam)
    V = r.count("vocab_size")
    if fam is GPT2:
        return _gpt2_config(r, V)
    for key in fam.refused_if_set:
        if c.get(key):
            r.refuse(f"{key} {c[key]}")
    for key in fam.ignored:
        if c.get(key) is not None:
            print(f"note: {path}: {key} {c[key]} is not applied by transformers' {fam.architecture}, so megatrain "
                  f"does not apply it either (model.attn_softcap=0)", file=sys.stderr)
    act_key, act = ("hidden_activation", "gelu_pytorch_tanh") if fam.fixed.get("mlp") == "geglu" else \
        ("hidden_act", "silu")
    if r.get(act_key, act) != act:
        r.refuse(f"{act_key} {r.get(act_key)!r}", f"megatrain computes {fam.architecture} with {act}")
    d, nh = r.count("hidden_size"), r.count("num_attention_heads")
    hd = r.count("head_dim", d // nh)
    bias = False
    if "bias" in fam.free:
        bias = bool(c.get("attention_bias", False))
        if bool(c.get("mlp_bias", False)) != bias:
            r.refuse(f"attention_bias {bias} with mlp_bias {bool(c.get('mlp_bias', False))}",
                     "megatrain has biases on every linear layer or on none (or on q/k/v only: Qwen2)")
    n_layers, max_len = r.count("num_hidden_layers"), r.count("max_position_embeddings")
    fields = dict(vocab_size=V, n_layers=n_layers, n_heads=nh, n_kv_heads=r.count("num_key_value_heads", nh),
                  d_model=d, head_dim=hd if hd * nh != d else 0, d_ff=r.count("intermediate_size"),
                  max_seq_len=max_len, norm="rmsnorm", norm_eps=r.number("rms_norm_eps", r.get("rms_norm_eps")),
                  position="rope", bias=bias, tie_embeddings=bool(r.get("tie_word_embeddings")),
                  init_std=r.get("initializer_range", 0.02), **_rope(r, max_len), **_windows(r, n_layers),
                  **{k: v for k, v in fam.fixed.items() if k not in MOE_NEUTRAL})  # (features, not model keys)
    if fam in MOE_FAMILIES:
        fields.update(moe_fields(r, fam))
    if "qkv_bias" in fam.free:
        fields["qkv_bias"] = bool(r.get("qkv_bias"))
    if "attn_scale_dim" in fam.free:
        fields["attn_scale_dim"] = r.count("query_pre_attn_scalar")
    if "attn_softcap" in fam.free:
        fields["attn_softcap"] = r.number("attn_logit_softcapping", r.get("attn_logit_softcapping") or 0.0, 0.0, False)
    if "logit_softcap" in fam.free:
        fields["logit_softcap"] = r.number("final_logit_softcapping", r.get("final_logit_softcapping") or 0.0, 0.0,
                                           False)
    return _checked(r, ModelConfig(**fields))


def _gpt2_config(r: _Reader, V: int) -> ModelConfig:
    c = r.c
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        r.refuse(f"activation_function {act!r}", "megatrain's GeLU is gelu_new's tanh form or the exact gelu")
    if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True) \
            or c.get("add_cross_attention"):
        r.refuse("attention scaled by layer, unscaled or with cross-attention")
    d = r.count("n_embd", 768)
    return _checked(r, ModelConfig(
        vocab_size=V, n_layers=r.count("n_layer", 12), n_heads=r.count("n_head", 12), d_model=d,
        d_ff=r.count("n_inner", 4 * d), max_seq_len=r.count("n_positions", 1024), norm="layernorm",
        norm_eps=c.get("layer_norm_epsilon", 1e-5), position="learned", mlp="gelu",
        gelu="erf" if act == "gelu" else "tanh", bias=True, tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        init_std=c.get("initializer_range", 0.02)))


def _checked(r: _Reader, m: ModelConfig) -> ModelConfig:
    try:
        validate_model(m)
    except ConfigError as e:  # a combination config.json allows and megatrain's checks refuse (heads, ...)
        raise CheckpointError(f"{r.path}: makes {str(e).removeprefix('config key ')}") from None
    return m
