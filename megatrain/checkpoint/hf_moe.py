"""The Mixture-of-Experts families' name maps and config.json translation (their Family tables are in
hf_families.py, beside the dense ones, and share its lookups).

    MixtralForCausalLM   Mistral's block with every MLP a MoE: router block_sparse_moe.gate, experts w1 (gate),
                         w3 (up), w2 (down); softmax, top-k, renormalised (model.moe_router=topk_softmax)
    Qwen2MoeForCausalLM  Qwen2's attention (q/k/v biases); MoE blocks every decoder_sparse_step-th layer but
                         mlp_only_layers, the others dense MLPs of intermediate_size; a shared expert
                         (shared_expert_intermediate_size) behind a sigmoid gate (shared_expert_gate)
    Qwen3MoeForCausalLM  Qwen3's attention (per-head QK-norm), Qwen2-MoE's layer pattern, no shared expert
    OlmoeForCausalLM     pre-norm blocks, QK-norm over the whole projection (qk_norm=full), every MLP a MoE

Hugging Face files hold one Linear weight per expert (what transformers' save_pretrained writes and the Hub's
checkpoints hold; transformers stacks them in memory as megatrain does). A Family's layer names with EXPERT ("{e}")
in them are such per-expert tensors: the megatrain tensor stacks them along its first dimension, each expert's
rows fused in the order the names give ([gate; up]).

transformers computes every expert for every token it routes (dropless): model.moe_capacity > 0 has no class.
router_aux_loss_coef <-> model.moe_aux_loss (a coefficient each; transformers' loss, computed only with
output_router_logits, is top_k times megatrain's per-layer one and taken over the layers together);
router_z_loss_coef, where a config.json has it, <-> model.moe_z_loss.
"""
from __future__ import annotations

from megatrain.checkpoint.reader import CheckpointError
from megatrain.config import ModelConfig
from megatrain.model_config import ffn_width, is_moe_layer, moe_ffn_width, moe_layer_rule, shared_ffn_width

EXPERT = "{e}"  # in a Family's layer names: one HF tensor per expert

_SWIGLU_EXPERTS = {"mlp.experts.gate_up": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
                   "mlp.experts.down": ("mlp.experts.{e}.down_proj.weight",), "mlp.router.weight": ("mlp.gate.weight",)}
MIXTRAL_MOE = {"mlp.router.weight": ("block_sparse_moe.gate.weight",),
               "mlp.experts.gate_up": ("block_sparse_moe.experts.{e}.w1.weight",  # gate
                                       "block_sparse_moe.experts.{e}.w3.weight"),  # up
               "mlp.experts.down": ("block_sparse_moe.experts.{e}.w2.weight",)}
QWEN_MOE = dict(_SWIGLU_EXPERTS)  # Qwen3-MoE, OLMoE (their dense blocks: mlp.gate_proj / up_proj / down_proj)
QWEN2_MOE = {**_SWIGLU_EXPERTS,
             "mlp.shared.gate_up.weight": ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"),
             "mlp.shared.down.weight": ("mlp.shared_expert.down_proj.weight",),
             "mlp.shared_gate.weight": ("mlp.shared_expert_gate.weight",)}

# what a model's MoE layers need a class to compute (beside hf_families.features), when it has none
MOE_NEUTRAL = dict(moe=False, moe_layers="all", moe_shared=False, moe_shared_gate=False, moe_norm_topk=False,
                   moe_capacity=0.0)
# the architectures megatrain refuses by name: what they compute that megatrain's model does not
REFUSED = {
    "DeepseekV3ForCausalLM": ("kv_lora_rank", "its multi-head latent attention (keys and values through a low-rank "
                              "projection, kv_lora_rank / q_lora_rank, with a separate RoPE part) is not megatrain's "
                              "attention, which projects full queries, keys and values"),
    "GptOssForCausalLM": ("swiglu_limit", "megatrain's model has no attention sinks, no biases on experts and no "
                          "clamped SwiGLU (swiglu_limit, swiglu_alpha)"),
}


def refuse_architecture(c: dict, path: str, arch: str) -> None:
    """One line for an architecture megatrain knows and cannot compute (before any weight is read)."""
    if arch in REFUSED:
        key, why = REFUSED[arch]
        value = f" {c[key]}" if key in c else ""
        raise CheckpointError(f"{path}: architecture {arch} ({key}{value}): {why}; megatrain cannot convert it")


def moe_features(m: ModelConfig) -> dict:
    """The MoE part of hf_families.features, in one normal form (a rule that makes every block MoE is "all")."""
    if not m.moe_experts:
        return dict(MOE_NEUTRAL)
    every = all(is_moe_layer(m, i) for i in range(m.n_layers))
    shared = shared_ffn_width(m) > 0
    return dict(moe=True, moe_layers="all" if every else m.moe_layers, moe_shared=shared,
                moe_shared_gate=shared and m.moe_shared_gate,
                moe_norm_topk=m.moe_router == "topk_softmax" or m.moe_norm_topk,
                moe_capacity=m.moe_capacity)


def say_moe(k: str, v) -> str | None:
    """A MoE feature as the model keys that set it (None: not a MoE feature)."""
    if k == "moe":
        return "moe_experts>0" if v else "moe_experts=0"
    if k == "moe_shared":
        return "moe_shared_experts>0" if v else "moe_shared_experts=0"
    return None


def moe_config_kwargs(m: ModelConfig, architecture: str) -> dict:
    """The config.json keys of a MoE class for `m` (beside hf_families.hf_config_kwargs' common ones)."""
    kw = dict(num_experts_per_tok=m.moe_top_k, router_aux_loss_coef=m.moe_aux_loss, output_router_logits=False)
    if m.moe_z_loss:
        kw["router_z_loss_coef"] = m.moe_z_loss
    if architecture == "MixtralForCausalLM":
        return dict(kw, num_local_experts=m.moe_experts, intermediate_size=moe_ffn_width(m), router_jitter_noise=0.0)
    kw.update(num_experts=m.moe_experts, norm_topk_prob=moe_features(m)["moe_norm_topk"])
    if architecture == "OlmoeForCausalLM":
        return dict(kw, intermediate_size=moe_ffn_width(m), clip_qkv=None)
    kind, n = moe_layer_rule(m)  # Qwen2-MoE, Qwen3-MoE: dense blocks of intermediate_size between the MoE ones
    kw.update(intermediate_size=ffn_width(m), moe_intermediate_size=moe_ffn_width(m),
              decoder_sparse_step=n if kind == "every" else 1,
              mlp_only_layers=list(range(n)) if kind == "after" else [])
    if architecture == "Qwen2MoeForCausalLM":
        kw["shared_expert_intermediate_size"] = shared_ffn_width(m)
    return kw


def _layer_rule(r, n_layers: int) -> str:
    """Qwen-MoE's decoder_sparse_step and mlp_only_layers as model.moe_layers (one line when no rule matches)."""
    step = r.count("decoder_sparse_step", 1)
    only = r.c.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        r.refuse(f"mlp_only_layers {only!r}", "expected a list of layer indices")
    moe = [i not in only and (i + 1) % step == 0 for i in range(n_layers)]
    rules = ["all"] + [f"every {n}" for n in range(2, n_layers + 1)] + [f"after {k}" for k in range(1, n_layers)]
    for rule in rules:
        probe = ModelConfig(n_layers=n_layers, moe_experts=1, moe_top_k=1, moe_layers=rule)
        if [is_moe_layer(probe, i) for i in range(n_layers)] == moe:
            return rule
    r.refuse(f"decoder_sparse_step {step} with mlp_only_layers {only}",
             f"MoE blocks {[i for i in range(n_layers) if moe[i]]}; megatrain's model.moe_layers makes every block, "
             f"every N-th or all after the first K a MoE block, no other pattern")
    return ""


def moe_fields(r, fam) -> dict:
    """config.json's MoE keys (`r`: hf_families' reader of it) -> megatrain's model.moe_* keys."""
    arch, n_layers = fam.architecture, r.count("num_hidden_layers")
    # Mixtral's key; Qwen3-MoE's configuration class writes it too, where older files have num_experts
    experts = r.count("num_local_experts" if arch == "MixtralForCausalLM" or "num_local_experts" in r.c else
                      "num_experts")
    out = dict(moe_experts=experts, moe_top_k=r.count("num_experts_per_tok"),
               moe_aux_loss=r.number("router_aux_loss_coef", r.get("router_aux_loss_coef", 0.0), 0.0, False),
               moe_z_loss=r.number("router_z_loss_coef", r.get("router_z_loss_coef", 0.0), 0.0, False))
    if arch == "MixtralForCausalLM":  # softmax over the k best logits = softmax, top-k, renormalised
        return dict(out, moe_router="topk_softmax", moe_ffn=r.count("intermediate_size"))
    out["moe_norm_topk"] = bool(r.get("norm_topk_prob", False))
    if arch == "OlmoeForCausalLM":
        return dict(out, moe_ffn=r.count("intermediate_size"))
    out.update(moe_ffn=r.count("moe_intermediate_size"), moe_layers=_layer_rule(r, n_layers))
    if arch == "Qwen2MoeForCausalLM":
        out.update(moe_shared_experts=1, moe_shared_ffn=r.count("shared_expert_intermediate_size"),
                   moe_shared_gate=True)
    return out
