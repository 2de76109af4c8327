"""Mixture of Experts on one rank: routing, the grouped matmul, capacity drops and the auxiliary losses against
references written out by hand here."""
from __future__ import annotations

import math

import pytest
import torch

from megatrain.config import ConfigError, ModelConfig, is_moe_layer
from megatrain.model import Transformer
from megatrain.model_config import validate_model
from megatrain.moe import (AuxLoss, MoE, grouped_linear, load_balancing_loss, moe_layers, route, router_z_loss,
                           take_stats)


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, moe_experts=4, moe_top_k=2, moe_ffn=16,
                max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def reference_moe(layer: MoE, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Token by token, expert by expert: each token's k experts, their outputs weighted and summed."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        logits = layer.router.weight @ flat[t]
        probs = logits.softmax(-1)
        top = probs.topk(cfg.moe_top_k)
        weights = top.values / top.values.sum() if cfg.moe_norm_topk else top.values
        for w, e in zip(weights, top.indices):
            gate, up = (layer.experts.gate_up[e] @ flat[t]).chunk(2)
            out[t] += w * (layer.experts.down[e] @ (torch.nn.functional.silu(gate) * up))
    if layer.shared is not None:
        s = layer.shared(flat)
        out += torch.sigmoid(layer.shared_gate(flat)) * s if layer.shared_gate is not None else s
    return out.view_as(x)


@pytest.mark.parametrize("norm_topk,shared,gate", [(True, 0, False), (False, 1, True), (True, 2, False)])
def test_moe_layer_equals_token_by_token_reference(norm_topk, shared, gate):
    cfg = moe_cfg(moe_norm_topk=norm_topk, moe_shared_experts=shared, moe_shared_gate=gate)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    layer = model.layers[0].mlp
    x = torch.randn(2, 7, cfg.d_model, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_moe(layer, x, cfg), rtol=0, atol=1e-12)


def test_topk_softmax_router_equals_normalised_softmax_topk():
    logits = torch.randn(50, 8, dtype=torch.float64)
    a, _ = route(logits, 2, "topk_softmax", False, 0.0)
    b, _ = route(logits, 2, "softmax_topk", True, 0.0)
    assert torch.equal(a.order, b.order) and torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_equals_the_loop_with_gradients(dtype):
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(int(counts.sum()), 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 24, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(int(counts.sum()), 24, dtype=dtype)
    grads = []
    for loop in (False, True):
        y = grouped_linear(x, w, counts, loop)
        (y * g).sum().backward()
        grads.append((y.detach(), x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    # a broadcast gradient (the backward of a plain .sum()) reaches the grouped matmul as well
    grouped_linear(x, w, counts).sum().backward()
    assert w.grad is not None


def test_load_balancing_loss_equals_the_switch_formula_by_hand():
    # 4 tokens, 3 experts, top-1 routing fixed by the logits; P_i and f_i written out by hand
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    routing, probs = route(logits, 1, "softmax_topk", False, 0.0)
    assert routing.counts.tolist() == [2, 1, 1]
    P = [sum(math.exp(r[i]) / sum(math.exp(v) for v in r) for r in logits.tolist()) / 4 for i in range(3)]
    f = [2 / 4, 1 / 4, 1 / 4]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, P))
    assert load_balancing_loss(probs, routing.counts, 1).item() == pytest.approx(expected, rel=1e-12)
    z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in logits.tolist()) / 4
    assert router_z_loss(logits).item() == pytest.approx(z, rel=1e-12)
    # balanced: exactly 1
    uniform = torch.zeros(6, 3, dtype=torch.float64)
    assert load_balancing_loss(uniform.softmax(-1), torch.tensor([4, 4, 4]), 2).item() == pytest.approx(1.0)


def test_capacity_drops_and_counts_as_a_reference_does():
    torch.manual_seed(1)
    T, E, k, factor = 40, 4, 2, 0.75
    logits = torch.randn(T, E) + torch.tensor([2.0, 0.0, 0.0, -1.0])  # expert 0 overloaded
    routing, _ = route(logits, k, "softmax_topk", True, factor)
    cap = math.ceil(factor * T * k / E)
    # first come, first served in token order (each token's choices in its top-k order)
    seen, kept, dropped = [0] * E, set(), 0
    chosen = logits.softmax(-1).topk(k).indices.tolist()
    for t in range(T):
        for j, e in enumerate(chosen[t]):
            if seen[e] < cap:
                kept.add((t, e))
            else:
                dropped += 1
            seen[e] += 1
    assert int(routing.dropped) == dropped > 0
    flat = torch.tensor(chosen).reshape(-1)
    kept_rows = {(int(r) // k, int(flat[r])) for r in routing.order[routing.keep]}
    assert kept_rows == kept


def test_capacity_layer_output_skips_dropped_rows():
    cfg = moe_cfg(moe_capacity=0.5, moe_norm_topk=False)
    torch.manual_seed(0)
    layer = Transformer(cfg).double().layers[0].mlp
    x = torch.randn(1, 16, cfg.d_model, dtype=torch.float64)
    out = layer(x).reshape(-1, cfg.d_model)
    flat = x.reshape(-1, cfg.d_model)
    logits = layer.router(flat)
    routing, _ = route(logits, 2, "softmax_topk", False, 0.5)
    chosen = logits.softmax(-1).topk(2).indices.reshape(-1)  # row r: token r // 2's (r % 2)-th choice
    expected = torch.zeros_like(flat)
    for r, keep, w in zip(routing.order.tolist(), routing.keep.tolist(), routing.weights):
        t, e = r // 2, int(chosen[r])
        if keep:
            gate, up = (layer.experts.gate_up[e] @ flat[t]).chunk(2)
            expected[t] += w * (layer.experts.down[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert int(layer.stats.dropped) == int(routing.dropped) > 0


def test_aux_loss_gradient_equals_adding_it_to_the_loss():
    cfg = moe_cfg(moe_aux_loss=0.1, moe_z_loss=0.01)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    tokens = torch.randint(0, 64, (2, 12))
    model(tokens, tokens).backward()
    injected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, aux_terms = None, []
    hooks = []
    for _, layer in moe_layers(model):  # recompute each layer's losses from its input, added to the loss
        def grab(mod, args, _out):
            x = args[0].reshape(-1, cfg.d_model)
            logits = mod.router(x)
            routing, probs = route(logits, cfg.moe_top_k, cfg.moe_router, cfg.moe_norm_topk, 0.0)
            aux_terms.append(0.1 * load_balancing_loss(probs, routing.counts, 2) + 0.01 * router_z_loss(logits))
        hooks.append(layer.register_forward_hook(grab))
    for mod in (layer for _, layer in moe_layers(model)):
        mod.aux_coef = mod.z_coef = 0.0
    total = model(tokens, tokens) + sum(aux_terms)
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, injected[n], rtol=1e-10, atol=1e-12, msg=n)
    assert injected["layers.0.mlp.router.weight"].abs().sum() > 0


def test_aux_loss_scale_multiplies_its_gradient():
    out = torch.zeros(3, requires_grad=True)
    aux = torch.tensor(2.0, requires_grad=True)
    AuxLoss.scale = 0.25
    try:
        AuxLoss.apply(out, aux).sum().backward()
    finally:
        AuxLoss.scale = 1.0
    assert aux.grad.item() == 0.25 and out.grad.tolist() == [1.0, 1.0, 1.0]


def test_stats_counted_once_under_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    cfg = moe_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg)
    for block in model.layers:  # the recompute runs each block's forward again inside the backward
        block.forward = lambda x, *a, _f=block.forward: checkpoint(lambda h: _f(h, *a), x, use_reentrant=True)
    tokens = torch.randint(0, 64, (2, 12))
    model(tokens, tokens).backward()
    stats = take_stats(model)
    assert sorted(stats) == [0, 1]
    for s in stats.values():
        assert s.calls == 1 and int(s.load.sum()) == 2 * 12 * cfg.moe_top_k
    assert all(s.calls == 0 for s in take_stats(model).values())
    model.eval()  # evaluation is not counted
    with torch.no_grad():
        model(tokens)
    assert all(s.calls == 0 for s in take_stats(model).values())


def test_moe_layers_rule():
    cfg = moe_cfg(n_layers=6, moe_layers="every 2")
    assert [is_moe_layer(cfg, i) for i in range(6)] == [False, True, False, True, False, True]
    cfg = moe_cfg(n_layers=4, moe_layers="after 1")
    assert [is_moe_layer(cfg, i) for i in range(4)] == [False, True, True, True]
    model = Transformer(moe_cfg(n_layers=3, moe_layers="after 1"))
    assert [type(b.mlp).__name__ for b in model.layers] == ["MLP", "MoE", "MoE"]


@pytest.mark.parametrize("kw,text", [
    (dict(moe_top_k=5), "model.moe_top_k: must be between 1 and model.moe_experts=4"),
    (dict(moe_layers="every 0"), "model.moe_layers: 'every 0' is not one of"),
    (dict(moe_layers="some"), "model.moe_layers: 'some' is not one of"),
    (dict(moe_layers="after 2"), "makes none of the 2 blocks a MoE block"),
    (dict(moe_capacity=-1.0), "model.moe_capacity: must be at least 0"),
    (dict(moe_shared_gate=True), "model.moe_shared_gate: needs a shared expert"),
    (dict(bias=True), "experts have no biases"),
])
def test_moe_config_refusals(kw, text):
    with pytest.raises(ConfigError, match=text.replace("(", r"\(")):
        validate_model(moe_cfg(**kw))


@pytest.mark.parametrize("sets,text", [
    (["parallel.ep=2"], "parallel.ep: 2 needs a MoE model whose model.moe_experts (0) it divides"),
    (["model.moe_experts=3", "parallel.ep=2"], "parallel.ep: 2 needs a MoE model whose model.moe_experts (3)"),
    (["model.moe_experts=4", "parallel.ep=2", "parallel.zero_stage=3"], "expert parallelism needs ZeRO-1 or ZeRO-2"),
    (["model.moe_experts=4", "parallel.ep=2", "parallel.zero_stage=0"], "expert parallelism needs ZeRO-1 or ZeRO-2"),
])
def test_expert_parallel_config_refusals(sets, text):
    from megatrain.config import load_config

    with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", sets)


def test_expert_parallel_must_divide_the_data_parallel_ranks():
    from megatrain.config import load_config
    from megatrain.parallel.topology import check_layout

    cfg = load_config("tiny", ["model.moe_experts=4", "parallel.ep=4", "train.global_batch_size=24"])
    with pytest.raises(ConfigError, match="parallel.ep: 4 does not divide the 6 data-parallel ranks"):
        check_layout(cfg, 6)
