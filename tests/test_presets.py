"""Tier 1: the public-family presets in configs/ have their models' published shapes.

Each preset's parameter count (megatrain's own, from a meta-device build) equals the count its model card publishes
(the safetensors total of the Hugging Face checkpoint), and the count transformers gives its class built on the meta
device from the published config.json values. No download: the figures are in the tables below.
"""
import pytest
import torch

from megatrain.config import is_local_layer, load_config
from megatrain.planning.memory import total_params

# preset: (published parameters, source: the Hugging Face repository whose model card / safetensors index gives it)
PUBLISHED = {
    "llama3.1-8b": (8_030_261_248, "meta-llama/Llama-3.1-8B"),
    "llama3.2-1b": (1_235_814_400, "meta-llama/Llama-3.2-1B"),
    "qwen2.5-0.5b": (494_032_768, "Qwen/Qwen2.5-0.5B"),
    "qwen2.5-7b": (7_615_616_512, "Qwen/Qwen2.5-7B"),
    "qwen3-0.6b": (596_049_920, "Qwen/Qwen3-0.6B"),
    "qwen3-8b": (8_190_735_360, "Qwen/Qwen3-8B"),
    "gemma3-1b": (999_885_952, "google/gemma-3-1b-pt"),
    "phi3-mini": (3_821_079_552, "microsoft/Phi-3-mini-4k-instruct"),
    "olmo2-7b": (7_298_617_344, "allenai/OLMo-2-1124-7B"),
}

_LLAMA3 = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
# preset: (transformers class names, the published config.json values that shape the model)
TRANSFORMERS = {
    "llama3.1-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, **_LLAMA3), tie_word_embeddings=False)),
    "llama3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(factor=32.0, **_LLAMA3), tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=False)),
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True)),
    "qwen3-8b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False)),
    "gemma3-1b": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
        tie_word_embeddings=True)),
    "phi3-mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=2047, tie_word_embeddings=False)),
    "olmo2-7b": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=500000.0,
        tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
        sliding_window=None, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False)),
    "olmoe-1b-7b": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_preset_has_its_published_parameter_count(preset):
    """Within 0.1% of the published count, as asked of a preset; all nine are in fact exactly equal."""
    published, _source = PUBLISHED[preset]
    ours = total_params(load_config(preset).model)
    assert abs(ours / published - 1) <= 1e-3, (preset, ours, published)
    assert ours == published


@pytest.mark.parametrize("preset", TRANSFORMERS)
def test_preset_matches_its_transformers_class_on_the_meta_device(preset):
    """The same shapes as transformers' class for the family, built from the published config.json values: equal
    parameter counts (a tied weight counted once in both), the same head size, vocabulary and depth, and for the
    models with sliding windows the same window layers and window."""
    import transformers

    config_name, model_name, values = TRANSFORMERS[preset]
    hf_cfg = getattr(transformers, config_name)(**values)
    with torch.device("meta"):
        hf = getattr(transformers, model_name)(hf_cfg)
    m = load_config(preset).model
    assert total_params(m) == sum(p.numel() for p in hf.parameters())
    hf_head = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert (m.vocab_size, m.n_layers, m.d_model, m.head_dim, m.max_seq_len, m.norm_eps, m.tie_embeddings) == (
        hf_cfg.vocab_size, hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_head, hf_cfg.max_position_embeddings,
        hf_cfg.rms_norm_eps, hf_cfg.tie_word_embeddings)
    assert m.sliding_window == (getattr(hf_cfg, "sliding_window", None) or 0)
    if m.sliding_window and hasattr(hf_cfg, "layer_types"):
        local = ["sliding_attention" if is_local_layer(m, i) else "full_attention" for i in range(m.n_layers)]
        assert local == list(hf_cfg.layer_types)
    rope = hf_cfg.rope_parameters
    if "full_attention" in rope:  # Gemma 3: the global layers' RoPE and the window layers'
        rope, local_rope = rope["full_attention"], rope["sliding_attention"]
        assert m.rope_local_theta == local_rope["rope_theta"]
    assert m.rope_theta == rope["rope_theta"]
    assert m.rope_scaling == (rope.get("rope_type") if rope.get("rope_type") not in (None, "default") else "none")
    if m.rope_scaling == "llama3":
        assert (m.rope_factor, m.rope_original_max_len, m.rope_low_freq_factor, m.rope_high_freq_factor) == (
            rope["factor"], rope["original_max_position_embeddings"], rope["low_freq_factor"],
            rope["high_freq_factor"])


# -- Mixture-of-Experts presets: total and active parameters --


def moe_counts(V: int, L: int, d: int, q: int, kv: int, qk_norm: int, E: int, k: int, ff: int) -> tuple[int, int]:
    """(total, active) parameters of an untied, bias-free MoE Transformer whose every block is a MoE of E SwiGLU
    experts of width ff (no shared expert), written out: attention q (d x q), k and v (d x kv), o (q x d), its QK
    norms (qk_norm elements), two RMSNorms, the router (E x d), each expert 3 x d x ff; the embedding and the head
    (V x d each) and the final norm. Active: of the E experts of a block only the k a token runs through."""
    attn = d * q + 2 * d * kv + q * d + qk_norm + 2 * d
    expert = 3 * d * ff
    rest = 2 * V * d + d
    return L * (attn + E * d + E * expert) + rest, L * (attn + E * d + k * expert) + rest


# preset: (the exact counts written out, the model card's rounded (total, active), in billions)
MOE_PUBLISHED = {
    # Mixtral 8x7B: "46.7B total parameters ... 12.9B per token" (Mistral AI's announcement, Mixtral paper)
    "mixtral-8x7b": (moe_counts(32000, 32, 4096, 32 * 128, 8 * 128, 0, 8, 2, 14336), (46.7, 12.9)),
    # Qwen3-30B-A3B: "30.5B in total and 3.3B activated" (model card). The exact active count, 3,353,032,704,
    # rounds to 3.4B: the card's 3.3B is truncated (with the embedding and the head counted, as for its 30.5B).
    "qwen3-30b-a3b": (moe_counts(151936, 48, 2048, 32 * 128, 4 * 128, 2 * 128, 128, 8, 768), (30.5, 3.3)),
    # OLMoE-1B-7B-0924: "1B active and 7B total" in its name, "6.9B total, 1.3B active" in the OLMoE paper; its QK
    # norms span the whole projections (qk_norm full: 2048 + 2048)
    "olmoe-1b-7b": (moe_counts(50304, 16, 2048, 16 * 128, 16 * 128, 2 * 2048, 64, 8, 1024), (6.9, 1.3)),
}
TRUNCATED = {("qwen3-30b-a3b", "active")}
# the counts above, as numbers (the totals are also transformers' counts: test_preset_matches_its_transformers_class)
EXACT = {"mixtral-8x7b": (46_702_792_704, 12_879_925_248), "qwen3-30b-a3b": (30_532_122_624, 3_353_032_704),
         "olmoe-1b-7b": (6_919_161_856, 1_282_017_280)}  # published figures rounded down, not to the nearest


@pytest.mark.parametrize("preset", MOE_PUBLISHED)
def test_moe_preset_has_its_published_total_and_active_parameters(preset):
    """The preset's total (a meta-device build) and active (planning.memory.active_params) parameter counts equal the
    counts written out from the published architecture, and round to the published figures."""
    from megatrain.planning.memory import active_params

    (total, active), published = MOE_PUBLISHED[preset]
    m = load_config(preset).model
    assert (total_params(m), active_params(m)) == (total, active)
    for kind, exact, rounded in (("total", total, published[0]), ("active", active, published[1])):
        if (preset, kind) in TRUNCATED:
            assert int(exact / 1e8) / 10 == rounded, (preset, kind, exact)
        else:
            assert round(exact / 1e9, 1) == rounded, (preset, kind, exact)
    assert (total, active) == EXACT[preset]


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"])
def test_moe_preset_routes_as_its_transformers_class(preset):
    """The experts, top-k, expert width and the top-k weights' normalisation of the published config.json; Mixtral's
    softmax over the two best logits is the softmax over all then normalised (its transformers code)."""
    import transformers

    config_name, _, values = TRANSFORMERS[preset]
    hf = getattr(transformers, config_name)(**values)
    m = load_config(preset).model
    experts = getattr(hf, "num_local_experts", None) or hf.num_experts
    width = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
    assert (m.moe_experts, m.moe_top_k, m.moe_ffn, m.moe_shared_experts, m.moe_layers) == (
        experts, hf.num_experts_per_tok, width, 0, "all")
    normalised = m.moe_router == "topk_softmax" or m.moe_norm_topk
    assert normalised == getattr(hf, "norm_topk_prob", True)
