"""Tier 1: megatrain/flops.py's counts against torch's FlopCounterMode, for the shapes the public families use: an
explicit head_dim (attention wider or narrower than d_model), GeGLU, and sliding-window layers between global ones.

FlopCounterMode counts what the kernels compute. PyTorch's SDPA computes every score of its [T, T] matrix (and on
the CPU is not counted at all), so the forward here runs with SDPA swapped for `only_the_visible_keys`: attention
computed query by query over exactly the keys its mask lets it see, each product counted as it is computed.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatrain.config import ModelConfig, head_dim, is_local_layer
from megatrain.flops import block_flops_per_token, forward_flops_per_token, keys_per_query, train_flops_per_token
from megatrain.model import Transformer

from megatrain import cpu_linear

cpu_linear.register_flop_formulas()  # (FlopCounterMode then counts the oneDNN products of the linear layers on a CPU)
MATMULS = {"aten.mm", "aten.addmm", "mkldnn._linear_pointwise"}

SDPA = F.scaled_dot_product_attention


def only_the_visible_keys(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, scale=None, enable_gqa=False):
    """SDPA computed per query over the keys it sees (a contiguous run ending at itself), so the FLOPs counted are
    the attention's own: 2 x head_dim per key for the scores and again for the weighted sum, per head."""
    T = q.shape[2]
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    visible = attn_mask if attn_mask is not None else torch.ones(T, T, dtype=torch.bool).tril()
    if visible.dtype != torch.bool:  # an additive mask (model.window_bias): 0 where seen, -inf elsewhere
        visible = visible == 0
    rows = []
    for i in range(T):
        keys = visible[..., i, :].reshape(-1, T)[0].nonzero().flatten()
        lo, hi = int(keys[0]), int(keys[-1]) + 1
        assert hi - lo == len(keys), "the keys a query sees are a contiguous run"
        scores = (q[:, :, i: i + 1] @ k[:, :, lo:hi].transpose(-1, -2)) * scale
        rows.append(scores.softmax(-1) @ v[:, :, lo:hi])
    return torch.cat(rows, dim=2)


def counted_forward(m: ModelConfig, batch: int, T: int, monkeypatch) -> float:
    """FlopCounterMode's FLOPs per token of a forward (with labels: the LM head and the loss) of a tiny model."""
    torch.manual_seed(0)
    model = Transformer(m)
    x = torch.randint(0, m.vocab_size, (batch, T))
    with torch.no_grad():
        want = model(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", only_the_visible_keys)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        got = model(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", SDPA)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the swapped attention is attention
    return counter.get_total_flops() / x.numel()


def diagonal_half(m: ModelConfig, T: int) -> float:
    """Per token, what the causal convention of a global layer (T / 2 keys a query) leaves out of the exact
    triangle ((T + 1) / 2): half a key per query, on each global layer."""
    global_layers = sum(not is_local_layer(m, i) for i in range(m.n_layers))
    return global_layers * 2 * 2 * m.n_heads * head_dim(m) * 0.5


BASE = dict(vocab_size=96, n_layers=6, n_heads=4, n_kv_heads=2, d_model=48, d_ff=80, max_seq_len=64,
            fused_kernels="off")
FEATURES = {
    "head_dim_wider": dict(head_dim=16),  # attention 64 wide over a 48 residual stream (Qwen3, Gemma 3 1B)
    "head_dim_narrower": dict(head_dim=8),
    "geglu": dict(mlp="geglu"),
    "window_every_layer": dict(sliding_window=5),  # Phi-3 / Mistral
    "window_5_to_1": dict(sliding_window=5, global_attn_every=3),  # Gemma's local:global pattern
    "gemma3_like": dict(head_dim=16, mlp="geglu", sliding_window=5, global_attn_every=3, norm_placement="sandwich",
                        qk_norm="head", norm_one_plus=True, embed_scale=True, tie_embeddings=True, attn_scale_dim=12),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_forward_flops_equal_flopcountermode(feature, monkeypatch):
    """Every matmul of a forward: the projections at n_heads x head_dim, three MLP matrices for GeGLU, the LM head,
    and attention over exactly the keys each query reads, a window layer's band counted exactly; the one stated
    difference is the causal convention of the global layers (half the diagonal)."""
    m = ModelConfig(**BASE, **FEATURES[feature])
    T = 16  # longer than the window: it cuts
    counted = counted_forward(m, 2, T, monkeypatch)
    assert forward_flops_per_token(m, T) + diagonal_half(m, T) == counted
    if m.global_attn_every:  # a window block counts fewer keys than a global one
        assert block_flops_per_token(m, T, layer=0)[2] < block_flops_per_token(m, T, layer=m.global_attn_every - 1)[2]


def test_window_keys_per_query_formula():
    """(T w - w (w - 1) / 2) / T keys a query on a window layer, min(T, w) counted whole; a window of at least T is a
    global layer (T / 2 causal, T whole)."""
    m = ModelConfig(n_layers=4, sliding_window=512, global_attn_every=2)
    T = 4096
    exact = sum(min(i + 1, 512) for i in range(T)) / T
    assert keys_per_query(m, T, True, 0) == exact == (T * 512 - 512 * 511 / 2) / T
    assert keys_per_query(m, T, False, 0) == 512
    assert keys_per_query(m, T, True, 1) == T / 2 and keys_per_query(m, T, False, 1) == T  # global (1 + 1) % 2 == 0
    assert keys_per_query(m, 300, True, 0) == 150 and keys_per_query(m, 512, True, 0) == 256  # window >= T
    # the mean over blocks is what the per-block counts add up to
    total = sum(sum(block_flops_per_token(m, T, layer=i)) for i in range(m.n_layers))
    assert m.n_layers * sum(block_flops_per_token(m, T)) == pytest.approx(total, rel=1e-12)
    assert forward_flops_per_token(m, T) == pytest.approx(total + 2 * m.d_model * m.vocab_size, rel=1e-12)


@pytest.mark.parametrize("feature", ["head_dim_wider", "geglu", "gemma3_like"])
def test_train_flops_with_frozen_blocks_equal_flopcountermode(feature):
    """Forward and backward with the first two blocks frozen (finetune.freeze): the 3x count plus
    frozen_flops_adjustment is autograd's count, the projections at head_dim and GeGLU's three matrices included
    (attention's products left out of both: seq_len 0 in the formula, SDPA not counted on the CPU)."""
    from megatrain.flops import frozen_flops_adjustment

    m = ModelConfig(**BASE, **FEATURES[feature])
    torch.manual_seed(0)
    model = Transformer(m)
    # (a tied head is the embedding: it stays trainable, and every block then runs its backward for the input's
    # gradient; untied, the embedding is frozen too and the first two blocks run none)
    frozen = ("layers.0.", "layers.1.") + (() if m.tie_embeddings else ("embed.",))
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(frozen)
    x = torch.randint(0, m.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    assert set(map(str, counter.get_flop_counts()["Global"])) <= MATMULS  # no attention kernel
    counted = counter.get_total_flops() / x.numel()
    assert train_flops_per_token(m, 0) + frozen_flops_adjustment(model, m, 0) == counted
    assert frozen_flops_adjustment(model, m, 0) < 0


def test_whole_attention_of_a_window_model_counts_each_window_whole():
    """whole_attention (PaLM's convention): a window layer counts min(T, w) keys a query, a global layer T."""
    m = ModelConfig(**BASE, sliding_window=5, global_attn_every=3)
    T = 16
    whole = dataclasses.replace(m, sliding_window=0, global_attn_every=0)
    diff = train_flops_per_token(whole, T, whole_attention=True) - train_flops_per_token(m, T, whole_attention=True)
    local_layers = sum(is_local_layer(m, i) for i in range(m.n_layers))
    assert diff == 3 * local_layers * 2 * 2 * m.n_heads * head_dim(m) * (T - 5)


# -- Mixture of Experts: FLOPs and MFU count the active parameters --

MOE = dict(BASE, moe_experts=4, moe_top_k=2, moe_ffn=24)


def test_moe_flops_equal_a_hand_count():
    """A MoE block's feed-forward counts its top_k experts, the shared MLP and its gate, and the router, not every
    expert: the whole forward of a 6-block model with MoE in blocks 1, 3, 5 (moe_layers 'every 2') written out."""
    m = ModelConfig(**dict(MOE, moe_layers="every 2", moe_shared_experts=1, moe_shared_gate=True))
    T, d, hd = 16, 48, 12  # head_dim = 48 / 4
    attn_proj = 2 * d * (4 * hd + 2 * 2 * hd) + 2 * 4 * hd * d
    attn_mix = 2 * 2 * 4 * hd * T / 2
    dense_mlp = 2 * d * 80 * 3
    moe_mlp = 2 * d * (2 * 24) * 3 + 2 * d * 24 * 3 + 2 * d * 1 + 2 * d * 4  # 2 experts, shared, its gate, router
    hand = 6 * (attn_proj + attn_mix) + 3 * dense_mlp + 3 * moe_mlp + 2 * d * 96
    assert forward_flops_per_token(m, T) == hand
    assert train_flops_per_token(m, T) == 3 * hand
    assert block_flops_per_token(m, T, layer=0)[1] == dense_mlp and block_flops_per_token(m, T, layer=1)[1] == moe_mlp
    assert block_flops_per_token(m, T)[1] == (dense_mlp + moe_mlp) / 2  # the mean over the blocks


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_moe_flops_equal_a_dense_model_of_k_experts_width_plus_the_router(mlp):
    """E experts top-k: the FLOPs of a dense model whose MLP is k x moe_ffn wide, plus 2 x d x E per block (the
    router), whatever E."""
    T = 16
    for experts in (4, 8, 64):
        m = ModelConfig(**dict(MOE, mlp=mlp, moe_experts=experts))
        dense = ModelConfig(**dict(BASE, mlp=mlp, d_ff=2 * 24))
        router = m.n_layers * 2 * m.d_model * experts
        assert forward_flops_per_token(m, T) == forward_flops_per_token(dense, T) + router
        assert train_flops_per_token(m, T) == train_flops_per_token(dense, T) + 3 * router


def test_moe_flops_are_twice_the_active_matrices():
    """Without attention's products (seq_len 0), a forward is 2 FLOPs per active parameter of every matrix a token
    multiplies by (planning.memory.active_params less the norms and the embedding lookup): Mixtral's shape."""
    from megatrain.config import load_config
    from megatrain.planning.memory import active_params

    m = load_config("mixtral-8x7b").model
    norms = (2 * m.n_layers + 1) * m.d_model
    assert forward_flops_per_token(m, 0) == 2 * (active_params(m) - norms - m.vocab_size * m.d_model)


def moe_model(m: ModelConfig) -> Transformer:
    """A MoE Transformer whose experts run one matmul per expert (what FlopCounterMode counts on the CPU)."""
    torch.manual_seed(0)
    model = Transformer(m)
    for layer in model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.loop = True
    return model


@pytest.mark.parametrize("feature", ["every_layer", "every_2_shared_gated"])
def test_moe_forward_flops_equal_flopcountermode(feature, monkeypatch):
    """The routed experts' matmuls FlopCounterMode counts (T x k rows through experts of moe_ffn, dropless), the
    router and the shared MLP: the formula's count, less the causal convention's half diagonal as for dense blocks."""
    extra = {} if feature == "every_layer" else dict(moe_layers="every 2", moe_shared_experts=1, moe_shared_gate=True)
    m = ModelConfig(**dict(MOE, **extra))
    T = 16
    model = moe_model(m)
    x = torch.randint(0, m.vocab_size, (2, T))
    monkeypatch.setattr(F, "scaled_dot_product_attention", only_the_visible_keys)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert forward_flops_per_token(m, T) + diagonal_half(m, T) == counter.get_total_flops() / x.numel()


def test_moe_train_flops_with_frozen_experts_equal_flopcountermode():
    """Block 0 frozen, and block 2's experts frozen (its router trains): frozen_flops_adjustment weighs each expert
    tensor by the share of it a token runs through (top_k / E), and the count is autograd's."""
    from megatrain.flops import frozen_flops_adjustment

    m = ModelConfig(**MOE)
    model = moe_model(m)
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(("layers.0.", "embed.", "layers.2.mlp.experts."))
    x = torch.randint(0, m.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    counted = counter.get_total_flops() / x.numel()
    assert train_flops_per_token(m, 0) + frozen_flops_adjustment(model, m, 0) == counted
