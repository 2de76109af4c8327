"""Tier 1: the model's options, KV cache, masking, init, and the FLOPs formula by hand."""
import math

import pytest
import torch

from megatrain.config import ModelConfig
from megatrain.decode_matmul import project
from megatrain.flops import forward_flops_per_token, train_flops_per_token
from megatrain.model import IGNORE_INDEX, KVCache, Transformer
from megatrain.tasks.lm import mlm_mask

VARIANTS = {
    "llama": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "mlm": dict(objective="mlm"),
}


def small(**kw):
    base = dict(vocab_size=97, n_layers=2, n_heads=4, d_model=32, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_and_loss(name):
    torch.manual_seed(0)
    m = Transformer(small(**VARIANTS[name]))
    x = torch.randint(0, 97, (3, 17))
    logits = m(x[:, :-1])
    assert logits.shape == (3, 16, 97)
    loss = m(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(97)) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_the_head_on_labeled_rows_only_gives_the_whole_heads_loss_and_gradients(fused):
    """sparse_labels (SFT, MLM): the LM head and loss read only the labeled rows; the loss and every gradient are
    those of the head over every row."""
    torch.manual_seed(0)
    m = Transformer(small(fused_kernels=fused))
    x = torch.randint(0, 97, (3, 17))
    y = x[:, 1:].clone()
    y[:, :9] = IGNORE_INDEX  # a prompt of 9 tokens in every row
    y[1, 12] = IGNORE_INDEX
    runs = []
    for sparse in (False, True):
        m.sparse_labels = sparse
        m.zero_grad()
        loss = m(x[:, :-1], y)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-6, atol=1e-6)
    for n, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], g, rtol=1e-5, atol=1e-6, msg=n)
    y[:] = IGNORE_INDEX  # no label at all: the same as the whole head's
    m.sparse_labels = False
    whole = m(x[:, :-1], y)
    m.sparse_labels = True
    assert torch.equal(m(x[:, :-1], y).isnan(), whole.isnan())


LAST_BLOCK = {**VARIANTS, "sandwich": dict(norm_placement="sandwich", qk_norm="head"),
              "moe": dict(moe_experts=4, moe_top_k=2)}  # (a routed-expert last block runs whole, then is cut)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", LAST_BLOCK)
def test_the_last_block_at_a_heads_rows_gives_those_rows_of_the_whole_model(name, fused):
    """features(rows=...): the last block computes its o_proj and MLP only at the rows a head reads; the output and
    every gradient equal those rows of the whole model's, with padding and with packed examples."""
    torch.manual_seed(0)
    m = Transformer(small(fused_kernels=fused, n_layers=3, **LAST_BLOCK[name])).double()  # (exact, but the sums' order)
    x = torch.randint(0, 97, (3, 12))
    segments = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 5 + [2] * 7])
    rows = torch.tensor([11, 12, 15, 19, 30, 35])
    w = torch.randn(len(rows), 32, dtype=torch.float64)
    runs = []
    for some in (False, True):
        m.zero_grad()
        h = m.features(x, segments, rows=rows) if some else m.features(x, segments).reshape(-1, 32)[rows]
        (h * w).sum().backward()
        runs.append((h.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-12, atol=1e-12)
    assert runs[1][1].keys() == runs[0][1].keys()
    for n, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], g, rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("pooling", ["last", "first", "mean"])
def test_a_classifier_scores_the_pooled_token_of_the_whole_models_features(pooling):
    """SequenceClassifier (the last block at the pooled token alone for "last" and "first"): its logits are the
    score of the whole model's final features at that token, or their mean over the real tokens."""
    from megatrain.heads import SequenceClassifier

    torch.manual_seed(0)
    m = SequenceClassifier(small(n_layers=3), n_labels=3, pooling=pooling)
    x = torch.randint(0, 97, (3, 10))
    segments = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [1] * 9 + [0]])
    h = m.features(x, segments)
    pooled = {"last": h[[0, 1, 2], [9, 3, 8]], "first": h[:, 0],
              "mean": torch.stack([h[0].mean(0), h[1, :4].mean(0), h[2, :9].mean(0)])}[pooling]
    torch.testing.assert_close(m(x, segments=segments), m.score(pooled), rtol=1e-5, atol=1e-6)


def test_causal_vs_bidirectional():
    torch.manual_seed(0)
    causal, mlm = Transformer(small()), Transformer(small(objective="mlm"))
    mlm.load_state_dict(causal.state_dict())
    x = torch.randint(0, 97, (1, 10))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 97  # change only the last token
    assert torch.allclose(causal(x)[0, :-1], causal(y)[0, :-1])  # the past never sees the future
    assert not torch.allclose(mlm(x)[0, 0], mlm(y)[0, 0])  # bidirectional: everyone sees it


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Transformer(small(n_kv_heads=2))
    mha = Transformer(small())
    sd = gqa.state_dict()
    hd, nh = 8, 4
    for i in range(2):
        w = sd[f"layers.{i}.attn.qkv.weight"]
        q, k, v = w.split([nh * hd, 2 * hd, 2 * hd])
        rep = lambda t: t.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(nh * hd, -1)
        sd[f"layers.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gqa", "gpt2"])
def test_kv_cache_matches_full_forward(name):
    torch.manual_seed(0)
    cfg = small(**VARIANTS[name])
    m = Transformer(cfg).eval()
    x = torch.randint(0, 97, (2, 14))
    full = m(x)
    cache = KVCache(cfg, 2, 32, "cpu", torch.float32)
    steps = [m(x[:, :6], cache=cache, pos=0)] + [m(x[:, t:t + 1], cache=cache, pos=t) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    cache = KVCache(cfg, 2, 32, "cpu", torch.float32)  # the decoding loop's form: the last position's logits only
    with torch.no_grad():
        last = [m.next_logits(x[:, :6], cache, 0)] + [m.next_logits(x[:, t:t + 1], cache, t) for t in range(6, 14)]
    torch.testing.assert_close(torch.stack(last, 1), full[:, 5:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # one row: decode_matmul's one-row products
        cache = KVCache(cfg, 1, 32, "cpu", torch.float32)
        last = [m.next_logits(x[:1, :6], cache, 0)] + [m.next_logits(x[:1, t:t + 1], cache, t) for t in range(6, 14)]
    torch.testing.assert_close(torch.stack(last, 1), full[:1, 5:], rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage():
    m = Transformer(small(tie_embeddings=True))
    assert m.lm_head.weight is m.embed.weight


def test_scaled_init():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=500, n_layers=8, n_heads=4, d_model=256))
    assert abs(m.layers[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(m.layers[0].mlp.down.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2*8)
    assert torch.all(m.layers[0].attn_norm.weight == 1)


def test_mlm_masking_proportions():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 1000, (200, 500))
    tokens[:, 0] = 3  # a special id that is never masked
    inputs, labels = mlm_mask(tokens, mask_id=1, vocab_size=1000, prob=0.15, generator=g, special_ids=(3,))
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    assert not chosen[:, 0].any()
    assert torch.equal(labels[chosen], tokens[chosen])
    masked = (inputs == 1) & chosen
    kept = (inputs == tokens) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.01
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1 - 0.001) < 0.01  # 10% kept (+ random hits itself)
    assert torch.equal(inputs[~chosen], tokens[~chosen])


def test_flops_formula_by_hand():
    """One small config counted matmul by matmul: d=64, 2 layers, 8 heads, 2 KV heads, ff=192, V=100, T=16."""
    cfg = ModelConfig(vocab_size=100, n_layers=2, n_heads=8, n_kv_heads=2, d_model=64, d_ff=192, mlp="swiglu")
    T = 16
    hd = 8
    q = 2 * 64 * (8 * hd)            # x @ Wq
    kv = 2 * 2 * 64 * (2 * hd)       # x @ Wk, x @ Wv (2 KV heads)
    scores = 2 * T * (8 * hd) / 2    # q . k over T keys, causal: half on average
    mix = 2 * T * (8 * hd) / 2       # probs @ v
    o = 2 * (8 * hd) * 64
    mlp = 3 * 2 * 64 * 192           # gate, up, down
    head = 2 * 64 * 100
    per_token = 2 * (q + kv + scores + mix + o + mlp) + head
    assert forward_flops_per_token(cfg, T) == per_token
    assert train_flops_per_token(cfg, T) == 3 * per_token
    gelu = ModelConfig(vocab_size=100, n_layers=1, n_heads=8, d_model=64, d_ff=256, mlp="gelu", objective="mlm")
    assert forward_flops_per_token(gelu, T, causal=False) == (
        2 * 64 * 3 * 64 + 2 * 2 * T * 64 + 2 * 64 * 64 + 2 * 2 * 64 * 256 + 2 * 64 * 100)


def test_param_count_matches_formula():
    cfg = ModelConfig(vocab_size=100, n_layers=2, n_heads=8, n_kv_heads=2, d_model=64, d_ff=192)
    m = Transformer(cfg)
    per_layer = 64 * (64 + 2 * 16) + 64 * 64 + 3 * 64 * 192 + 2 * 64
    assert m.num_params() == 2 * per_layer + 2 * 100 * 64 + 64


@pytest.mark.parametrize("name", ["llama", "gpt2", "mlm"])
def test_packed_examples_compute_what_each_example_computes_alone(name):
    """Several examples in one row (segments 1, 2, ...) and right padding (segment 0): attention never crosses an
    example and positions restart at each, so each example's hidden states equal those of the example run alone."""
    torch.manual_seed(0)
    m = Transformer(small(**VARIANTS[name])).eval()
    a, b, c = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 3))
    row = torch.cat([a, b, c, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # 15 tokens + 4 of padding
    segments = torch.tensor([[1] * 5 + [2] * 7 + [3] * 3 + [0] * 4])
    with torch.no_grad():
        packed = m.features(row, segments)
        alone = [m.features(x) for x in (a, b, c)]
    torch.testing.assert_close(packed[:, :5], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 5:12], alone[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 12:15], alone[2], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed).all()  # padding rows attend to themselves, never to nothing
    # one example per row needs no segments: the same numbers as the fast (is_causal) path
    with torch.no_grad():
        torch.testing.assert_close(m.features(b, torch.ones_like(b)), alone[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
def test_decoding_products_equal_the_layers_own(bias, kernel, monkeypatch):
    """decode_matmul: a decoding step's few rows through the decode_linear kernel (or weight @ x.T without it), and
    the LM head's any rows, give what the nn.Linear gives; with autograd on, the layer itself runs (and gradients
    flow)."""
    from megatrain import decode_matmul

    if kernel and not decode_matmul.kernel_built():
        pytest.skip("megatrain._C is not built")
    if not kernel:  # (as with an extension built before decode_linear existed)
        monkeypatch.setattr(decode_matmul, "kernel_built", lambda: False)
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40, bias=bias)
    shapes = [(1, 1, 24), (2, 1, 24), (3, 1, 24), (8, 1, 24), (4, 4, 24), (3, 7, 24)]  # 1, 2, 3, 8, 16, 21 rows
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            got = project(layer, x)
            assert got.shape == shape[:-1] + (40,) and got.is_contiguous()
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-6)
            for rows in (1, 5, 21):  # the LM head's form: any number of rows
                h = torch.randn(rows, 24)
                torch.testing.assert_close(project(layer, h, most_rows=None), layer(h), rtol=1e-5, atol=1e-6)
    with torch.no_grad(), monkeypatch.context() as m:  # a module without megatrain's kernels never asks for it
        m.setattr(decode_matmul, "kernel_built", lambda: pytest.fail("decode_linear asked for with fused=False"))
        x = torch.randn(2, 1, 24)
        torch.testing.assert_close(project(layer, x, fused=False), layer(x), rtol=1e-5, atol=1e-6)
    calls = []  # a layer with hooks (ZeRO-3 gathers its weight in one) runs itself
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        project(layer, torch.randn(2, 1, 24))
    assert calls == [1]
    hook.remove()
    x = torch.randn(2, 1, 24, requires_grad=True)
    project(layer, x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
