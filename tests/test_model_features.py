"""The architecture features of today's model families (model.* keys of model_config.py) on one process: RoPE scaling
against transformers' own frequency functions, the sliding-window KV cache against recomputing the whole sequence,
and the config's checks. Parity with each family's transformers class is in test_hf_families.py."""
from __future__ import annotations

import math

import pytest
import torch

from megatrain.config import ConfigError, ModelConfig, is_local_layer, load_config
from megatrain.kernels.reference import RopeScaling, rope_frequencies
from megatrain.model import KVCache, ProjectionRMSNorm, Transformer, window_mask

SCALINGS = [
    ("linear", dict(factor=8.0), {}),
    ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
     dict(original_max_len=8192)),
    ("yarn", dict(factor=4.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0),
     dict(original_max_len=4096)),
]


@pytest.mark.parametrize("kind,hf_params,ours", SCALINGS, ids=[s[0] for s in SCALINGS])
def test_rope_scaling_equals_transformers_frequencies(kind, hf_params, ours):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, hd = 500000.0, 128
    hf = LlamaConfig(hidden_size=hd * 4, num_attention_heads=4, max_position_embeddings=131072,
                     rope_parameters=dict(rope_type=kind, rope_theta=theta, **hf_params))
    want, want_gain = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    scaling = RopeScaling(kind, hf_params["factor"], **ours)
    got, gain = rope_frequencies(hd, theta, scaling)
    assert torch.allclose(got.float(), want.float(), rtol=1e-6, atol=0)  # transformers computes them in float32
    assert gain == pytest.approx(want_gain, rel=1e-12)
    if kind == "yarn":
        assert gain == pytest.approx(0.1 * math.log(4.0) + 1)


def test_window_mask_band():
    m = window_mask(6, 3, "cpu")
    assert m.sum(1).tolist() == [1, 2, 3, 3, 3, 3]  # each query sees itself and up to 2 keys before it
    assert not m.triu(1).any()


def _windowed(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=4, n_heads=4, n_kv_heads=2, d_model=64, max_seq_len=48, sliding_window=5,
                global_attn_every=2, rope_local_theta=100.0, rope_theta=10000.0, fused_kernels="off")
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("prompt_len", [2, 9], ids=["prompt-inside-window", "prompt-longer-than-window"])
def test_window_kv_cache_decodes_like_the_whole_sequence(prompt_len):
    """Greedy decoding with the KV cache (a ring of `window` keys on local layers) picks the same tokens as running the
    whole sequence again at every step, over 30 tokens (6 windows)."""
    torch.manual_seed(0)
    cfg = _windowed()
    assert [is_local_layer(cfg, i) for i in range(4)] == [True, False, True, False]
    model = Transformer(cfg).double().eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, prompt_len))
    cache = KVCache(cfg, 2, cfg.max_seq_len, "cpu", torch.float64)
    assert cache.k[0].shape[2] == 5 and cache.k[1].shape[2] == cfg.max_seq_len  # local layers keep their window only
    with torch.no_grad():
        logits = model(tokens, cache=cache, pos=0)[:, -1]
        seq = tokens
        for _ in range(30):
            full = model(seq)[:, -1]
            assert torch.allclose(logits, full, atol=1e-10)
            nxt = full.argmax(-1, keepdim=True)
            logits = model(nxt, cache=cache, pos=seq.shape[1])[:, -1]
            seq = torch.cat([seq, nxt], 1)


def test_window_limits_what_a_token_sees():
    """With a window of 5, the last token's logits do not depend on tokens 5 or more positions back through one layer
    of attention; with two local layers, up to 8 back (each hop sees 4 earlier positions)."""
    torch.manual_seed(0)
    cfg = _windowed(global_attn_every=0, n_layers=2)
    model = Transformer(cfg).double().eval()
    a = torch.randint(0, cfg.vocab_size, (1, 20))
    b = a.clone()
    b[0, :11] = (b[0, :11] + 1) % cfg.vocab_size  # change everything more than 8 positions back from the last
    with torch.no_grad():
        assert torch.allclose(model(a)[0, -1], model(b)[0, -1], atol=1e-12)
        b[0, 11] = (b[0, 11] + 1) % cfg.vocab_size  # 8 back: seen through two hops
        assert not torch.allclose(model(a)[0, -1], model(b)[0, -1], atol=1e-6)


def test_projection_norm_is_rms_over_the_whole_projection():
    torch.manual_seed(0)
    norm = ProjectionRMSNorm(12, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight.double()
    assert torch.allclose(norm.double()(x), want, atol=1e-12)


def test_one_plus_norm_starts_as_identity_scale_and_sandwich_adds_norms():
    cfg = _windowed(norm_one_plus=True, norm_placement="sandwich", qk_norm="head", head_dim=24)
    model = Transformer(cfg)
    names = dict(model.named_parameters())
    assert not names["layers.0.attn_norm.weight"].any() and not names["layers.0.attn.q_norm.weight"].any()
    assert names["layers.0.attn.q_norm.weight"].shape == (24,)
    assert names["layers.0.attn.qkv.weight"].shape == ((4 + 2 * 2) * 24, 64)
    assert names["layers.0.attn.o_proj.weight"].shape == (64, 4 * 24)
    assert {"layers.0.attn_post_norm.weight", "layers.0.mlp_post_norm.weight"} <= set(names)
    post = Transformer(_windowed(norm_placement="post", qk_norm="full"))
    names = dict(post.named_parameters())
    assert "layers.0.attn_norm.weight" not in names and "layers.0.mlp_post_norm.weight" in names
    assert names["layers.0.attn.q_norm.weight"].shape == (64,) and names["layers.0.attn.k_norm.weight"].shape == (32,)


def test_logit_softcap_is_cap_tanh_of_the_logits():
    torch.manual_seed(0)
    capped = Transformer(_windowed(logit_softcap=2.0, init_std=1.0)).double().eval()
    plain = Transformer(_windowed(init_std=1.0)).double().eval()
    plain.load_state_dict(capped.state_dict())
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        raw, logits = plain(tokens), capped(tokens)
    assert raw.abs().max() > 4 and logits.abs().max() < 2.0
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-12)


BAD = [
    ("model.rope_scaling=llama3", "rope_original_max_len"),
    ("model.rope_scaling=linear", None),  # factor 1 is a valid (if useless) linear scaling
    ("model.rope_factor=0.5", None),  # unused without rope_scaling
    ("model.global_attn_every=6", "needs model.sliding_window"),
    ("model.qk_norm=full", None),
    ("model.norm_one_plus=true", None),
    ("model.head_dim=-1", "model.head_dim: must be at least 0"),
    ("model.head_dim=33", "head size 33 must be even"),
    ("model.attn_softcap=-1", "model.attn_softcap"),
    ("model.qk_norm=per_head", "not one of none, head, full"),
]


@pytest.mark.parametrize("override,error", BAD, ids=[b[0] for b in BAD])
def test_model_feature_keys_are_checked(override, error):
    if error is None:
        load_config("tiny", [override])
        return
    with pytest.raises(ConfigError, match=error):
        load_config("tiny", [override])


def test_head_dim_apart_from_d_model():
    cfg = load_config("tiny", ["model.head_dim=64", "model.n_heads=4", "model.d_model=96"])
    assert cfg.model.head_dim == 64  # 96 / 4 = 24 would be the derived size; 4 x 64 = 256 is attention's width
    with pytest.raises(ConfigError, match="not divisible by model.n_heads"):
        load_config("tiny", ["model.n_heads=5", "model.d_model=96"])


def test_fused_kernels_compute_the_same_features():
    """megatrain's fused ops (rms_norm with 1 + w, rope with YaRN's gain, the loss) against the plain PyTorch path on
    a model using every feature; GeGLU, the projection norm and capped attention run the reference either way."""
    from megatrain import kernels

    if not kernels.built():
        pytest.skip("megatrain's extension is not built")
    kw = dict(norm_one_plus=True, norm_placement="sandwich", qk_norm="head", head_dim=24, mlp="geglu", embed_scale=True,
              rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16, attn_softcap=20.0, qkv_bias=True)
    torch.manual_seed(0)
    plain = Transformer(_windowed(**kw))
    fused = Transformer(_windowed(**kw, fused_kernels="on"))
    fused.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 97, (2, 20))
    assert torch.allclose(fused(tokens), plain(tokens), atol=1e-5)
    assert torch.allclose(fused(tokens, tokens), plain(tokens, tokens), atol=1e-5)


def test_window_layers_keep_one_mask_for_the_backward():
    """Every window layer passes the one cached additive mask: autograd saves it once, not once a layer."""
    torch.manual_seed(0)
    cfg = _windowed(global_attn_every=0, n_layers=4)
    model = Transformer(cfg)
    T = 20
    saved = []

    def keep(t):
        if t.dim() == 2 and t.shape == (T, T):
            saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(torch.randint(0, 97, (2, T)), torch.randint(0, 97, (2, T)))
    assert len(saved) == 4 and len(set(saved)) == 1
