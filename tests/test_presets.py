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
