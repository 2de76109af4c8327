"""The architecture features of model.* (head_dim, qkv_bias, qk_norm, norm placement, embed_scale, geglu, windows,
soft-capping, RoPE scaling) under every kind of parallelism: the same numbers as the one-rank model.

Default tier: the split table's rules for the new parameters, each rank's share of attention and the MLP (cut by the
table) adding up to the whole, and the pipeline's stage modules chained equal to the model. Slow tier: the model
under apply_tp (with sequence parallelism, activation checkpointing, fused kernels or not, LoRA) over 2 gloo ranks,
every gradient equal to the unsplit one's slice; and `pretrain` runs under TP, SP, PP and ZeRO-3 with one rank's
losses.
"""
import copy

import pytest
import torch

from distributed import run_distributed
from test_sharding import assert_splits_and_reassembles
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets
from megatrain.config import ModelConfig
from megatrain.model import Transformer
from megatrain.parallel.sharding import REPLICATED, Split, shard, split_of

# model keys of each feature set (on a GQA model: 4 query heads, 2 KV heads); small caps and windows, so they bite
FEATURES = {
    "head_dim": dict(head_dim=12),
    "qkv_bias": dict(qkv_bias=True),
    "qk_norm_head": dict(qk_norm="head", head_dim=12),
    "qk_norm_full": dict(qk_norm="full"),
    "sandwich_geglu": dict(norm_placement="sandwich", norm_one_plus=True, embed_scale=True, mlp="geglu"),
    "post": dict(norm_placement="post", qk_norm="full"),
    "window": dict(sliding_window=4, global_attn_every=2, rope_local_theta=1000.0),
    "softcap": dict(attn_softcap=2.0, logit_softcap=3.0, attn_scale_dim=16),
    "llama3": dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=8, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=8),
    "tied_softcap_scale": dict(tie_embeddings=True, logit_softcap=3.0, embed_scale=True),
}


def _cfg(fused: str = "auto", **kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=16, fused_kernels=fused)
    return ModelConfig(**{**base, **kw})


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """The model with every vector (norm weights, biases) moved off its initial value, so each one matters."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


# -- the split table -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("tp", [1, 2])
def test_every_new_parameter_splits_and_reassembles_exactly(name, tp):
    assert_splits_and_reassembles(_model(_cfg(**FEATURES[name])), tp)


def test_the_table_cuts_the_new_parameters_with_their_heads():
    """head_dim apart from d_model / n_heads sizes the q|k|v parts (and the bias's); qk_norm=full's weights go with
    each rank's heads; qk_norm=head's, and the post norms, are whole on every rank."""
    cfg = _cfg(head_dim=12, qkv_bias=True, qk_norm="full", norm_placement="sandwich")
    assert split_of("layers.0.attn.qkv.weight", cfg) == Split(0, (48, 24, 24))
    assert split_of("layers.1.attn.qkv.bias", cfg) == Split(0, (48, 24, 24))
    assert split_of("layers.0.attn.o_proj.weight", cfg) == Split(1)
    for n in ("layers.0.attn.q_norm.weight", "layers.1.attn.k_norm.weight"):
        assert split_of(n, cfg) == Split(0)
        assert split_of(n, _cfg(qk_norm="head", head_dim=12)) == REPLICATED
    for n in ("layers.0.attn_post_norm.weight", "layers.1.mlp_post_norm.weight", "layers.0.attn_norm.weight"):
        assert split_of(n, cfg) == REPLICATED
    # rank r's query-norm slice is the weight of rank r's query rows of qkv (row i of q is weighted by q_norm[i])
    q_rows = torch.arange(48 + 24 + 24).float()
    for r in range(2):
        mine = shard(q_rows, split_of("layers.0.attn.qkv.bias", cfg), 2, r)[:24]
        assert torch.equal(shard(torch.arange(48).float(), split_of("layers.0.attn.q_norm.weight", cfg), 2, r), mine)
        kv = shard(q_rows, split_of("layers.0.attn.qkv.bias", cfg), 2, r)[24:36] - 48
        assert torch.equal(shard(torch.arange(24).float(), split_of("layers.0.attn.k_norm.weight", cfg), 2, r), kv)


@pytest.mark.parametrize("name", FEATURES)
def test_meta_build_materializes_to_the_same_model(name):
    """What parallelize starts from: the model built on the meta device (the RoPE tables, scaled or local, still
    computed on the CPU), then filled, equals the model built with values: weights, tables, logits."""
    from megatrain.parallel.parallelize import build_on_meta, materialize

    cfg = _cfg(**FEATURES[name])
    torch.manual_seed(7)
    want = Transformer(cfg)
    model = build_on_meta(cfg)
    materialize(model, seed=7)
    got = dict(model.named_buffers()) | dict(model.named_parameters())
    for n, t in [*want.named_buffers(), *want.named_parameters()]:
        assert torch.equal(got[n], t), n
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    assert torch.equal(model(tokens), want(tokens))


# -- each rank's share adds up (the cut, without collectives) ---------------------------------------------------


def _rank_share(module: torch.nn.Module, prefix: str, cfg: ModelConfig, tp: int, r: int) -> torch.nn.Module:
    """A copy of `module` holding TP rank r's slices of its parameters, as the split table cuts them; attention's
    head counts divided as apply_tp does. Row-parallel biases are dropped (added once, after the sum)."""
    share = copy.deepcopy(module)
    for pname, p in list(share.named_parameters()):
        owner, leaf = share.get_submodule(pname.rpartition(".")[0]), pname.rpartition(".")[2]
        split = split_of(f"{prefix}.{pname}", cfg)
        keep = split.dim is not None or pname.endswith("norm.weight")  # (not a row-parallel bias)
        setattr(owner, leaf, torch.nn.Parameter(shard(p.detach(), split, tp, r).clone()) if keep else None)
    if hasattr(share, "n_heads"):
        share.n_heads, share.n_kv = share.n_heads // tp, share.n_kv // tp
    return share


@pytest.mark.parametrize("name", [n for n in FEATURES if FEATURES[n].get("qk_norm") != "full"])
def test_each_ranks_heads_and_mlp_slice_add_up_to_the_whole(name):
    """Attention is per head and the MLP per hidden unit: the TP ranks' outputs (this rank's heads through its slice
    of o_proj) sum to the unsplit layer's, forward and backward; a weight every rank holds whole (qk_norm=head's) gets
    a share of its gradient on each rank, which sum to the whole one (apply_tp marks it to be summed over TP).
    (qk_norm=full needs the ranks' sum of squares mid-layer: the slow tier checks it over real ranks.)"""
    cfg = _cfg(**FEATURES[name])
    model = _model(cfg)
    x = torch.randn(2, 12, cfg.d_model)
    for i, block in enumerate(model.layers):
        rope = model.rope_of(block, slice(0, 12), x.dtype)
        for sub, prefix, call in ((block.attn, f"layers.{i}.attn", lambda m, h: m(h, rope)),
                                  (block.mlp, f"layers.{i}.mlp", lambda m, h: m(h))):
            sub.zero_grad()
            want = call(sub, x)
            want.pow(2).sum().backward()
            shares = [_rank_share(sub, prefix, cfg, 2, r) for r in range(2)]
            got = sum(call(s, x) for s in shares)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {prefix}")
            got.pow(2).sum().backward()
            for pname, p in sub.named_parameters():
                split = split_of(f"{prefix}.{pname}", cfg)
                if split.dim is not None:  # each rank's slice of the gradient
                    for r, s in enumerate(shares):
                        torch.testing.assert_close(s.get_parameter(pname).grad, shard(p.grad, split, 2, r),
                                                   rtol=1e-5, atol=1e-6, msg=f"{name} {prefix}.{pname}")
                elif pname.endswith("norm.weight"):  # replicated, partial on each rank: the sum is the whole
                    total = sum(s.get_parameter(pname).grad for s in shares)
                    torch.testing.assert_close(total, p.grad, rtol=1e-5, atol=1e-6, msg=f"{name} {prefix}.{pname}")
                    assert not torch.allclose(shares[0].get_parameter(pname).grad, p.grad)  # one rank's is partial


# -- the pipeline's stage modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FEATURES)
def test_pipeline_stage_modules_chained_equal_the_model(name):
    """EmbedPipe (embed_scale), a BlockPipe per block (its own RoPE tables: local theta, scaling), the final norm and
    HeadPipe (logit soft-capping; the tied head too) give the model's logits."""
    from megatrain.parallel.pipeline import BlockPipe, EmbedPipe, FinalNormPipe, HeadPipe, _tied_head_forward

    cfg = _cfg(**FEATURES[name], max_seq_len=32)
    model = _model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    embed = EmbedPipe(model)
    x = embed(tokens)
    for block in model.layers:
        x = BlockPipe(block, model, 1)(x)
    x = FinalNormPipe(model)(x)
    logits = _tied_head_forward(embed, x) if cfg.tie_embeddings else HeadPipe(model)(x)
    want = model(tokens)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    if cfg.logit_softcap:
        assert logits.abs().max() < cfg.logit_softcap


# -- slow tier: apply_tp over 2 ranks ----------------------------------------------------------------------------


def _check_features_under_tp(rank, world):
    """Each feature set through apply_tp (with and without sequence parallelism; with activation checkpointing none,
    selective, full; fused kernels and the reference; LoRA) against the unsplit model: the loss, and every
    parameter's gradient equals the unsplit gradient's slice; after an SGD step the replicas are still equal (the
    drift check), which a qk_norm=head weight is only if its partial gradients are summed over TP."""
    import deepspeed
    import torch.distributed as dist

    from megatrain.heads import apply_lora
    from megatrain.parallel.parallelize import apply_activation_checkpointing, apply_tp, check_tp_drift

    deepspeed.init_distributed("gloo")  # deepspeed.checkpointing asks DeepSpeed's comm for the rank
    g = dist.new_group(list(range(world)))
    cases = []  # each set without and with sequence parallelism; checkpointing and the kernels in turn
    for i, (n, kw) in enumerate(FEATURES.items()):
        cases += [(n, kw, False, ("none", "full")[i % 2], ("auto", "off")[i % 2]),
                  (n, kw, True, ("selective", "none")[i % 2], ("off", "auto")[i % 2])]
    cases.append(("softcap", FEATURES["softcap"], True, "selective", "auto"))  # soft-capped attention recomputed
    cases.append(("lora", dict(qkv_bias=True, head_dim=12, qk_norm="head"), False, "selective", "auto"))
    cases.append(("softcap", FEATURES["softcap"], True, "selective", "auto"))  # soft-capped attention recomputed
    cases.append(("lora", dict(qkv_bias=True, head_dim=12, qk_norm="full"), True, "none", "off"))
    for name, kw, sp, ckpt, fused in cases:
        where = f"{name} sp={sp} ckpt={ckpt} fused={fused}"
        cfg = _cfg(fused, **kw)
        ref = _model(cfg)
        if name == "lora":
            apply_lora(ref, 2, 4.0, 0.0, "qkv,o_proj,gate_up,down")
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    if n.endswith("lora_B"):
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        tp = apply_activation_checkpointing(apply_tp(copy.deepcopy(ref), g, sequence_parallel=sp), ckpt)
        tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(5))
        loss_ref = ref(tokens[:, :-1], tokens[:, 1:])
        loss_tp = tp(tokens[:, :-1], tokens[:, 1:])
        torch.testing.assert_close(loss_tp, loss_ref, rtol=1e-5, atol=1e-6, msg=where)
        loss_ref.backward()
        loss_tp.backward()
        full = dict(ref.named_parameters())
        for n, p in tp.named_parameters():
            if not p.requires_grad:
                assert full[n].grad is None, (where, n)
                continue
            assert getattr(p, "tensor_model_parallel", False) == (not split_of(n, cfg).replicated), (where, n)
            assert p.grad is not None, f"{where}: {n} got no gradient"  # (a checkpoint below frozen embeddings)
            want = shard(full[n].grad, split_of(n, cfg), world, rank)
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=f"{where}: {n}")
        with torch.no_grad():
            for p in tp.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
        check_tp_drift(tp, g, step=1)


@pytest.mark.slow
def test_every_feature_under_tensor_parallelism_equals_the_unsplit_model():
    run_distributed(_check_features_under_tp, 2, timeout=300)


# -- slow tier: pretraining under TP, SP, PP, ZeRO-3 ---------------------------------------------------------------

# `pretrain --config tiny` with each feature set (small_sets' 2-layer GQA model, data.seq_len 32 > the window)
PRETRAIN_SETS = {
    "head_dim": {"model.head_dim": 64, "model.n_heads": 4, "model.d_model": 192},
    "qkv_bias": {"model.qkv_bias": True},
    "qk_norm_head": {"model.qk_norm": "head"},
    "qk_norm_full": {"model.qk_norm": "full"},
    "sandwich_geglu": {"model.norm_placement": "sandwich", "model.norm_one_plus": True, "model.embed_scale": True,
                       "model.mlp": "geglu"},
    "post": {"model.norm_placement": "post"},
    "window": {"model.sliding_window": 16, "model.global_attn_every": 2, "model.rope_theta": 1e6,
               "model.rope_local_theta": 10000.0},
    "softcap": {"model.attn_softcap": 30.0, "model.logit_softcap": 20.0},
    "llama3": {"model.rope_scaling": "llama3", "model.rope_factor": 8.0, "model.rope_original_max_len": 16},
    "yarn": {"model.rope_scaling": "yarn", "model.rope_factor": 4.0, "model.rope_original_max_len": 16},
}
PRETRAIN_LAYOUTS = {  # run name: (feature set, layout); every one runs on 2 ranks
    **{f"{s}/tp2": (s, {"parallel.tp": 2}) for s in PRETRAIN_SETS},
    **{f"{s}/{name}": (s, over) for s in ("sandwich_geglu", "qk_norm_full")
       for name, over in (("tp2_sp", {"parallel.tp": 2, "parallel.sequence_parallel": True}),
                          ("pp2", {"parallel.pp": 2}))},
    # partial gradients summed over TP under ZeRO-3 (and recomputed attention)
    "qk_norm_head/tp2_zero3_selective": ("qk_norm_head", {"parallel.tp": 2, "parallel.zero_stage": 3,
                                                          "train.activation_checkpointing": "selective"}),
}
PRETRAIN_COMMON = {"train.max_steps": 3, "checkpoint.interval": 0, "train.eval_interval": 3, "train.eval_iters": 1,
                   "parallel.drift_check_interval": 1}  # replicas compared after every step


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Every feature set trained on one rank, then every (set, layout) of PRETRAIN_LAYOUTS on two: one process group
    for each world size (a few seconds a run). Returns the runs' directory."""
    root = tmp_path_factory.mktemp("features")
    data = make_byte_dataset(root)

    def sets(run: str, feature: str, over: dict) -> list[str]:
        return small_sets(data, str(root / run), **PRETRAIN_COMMON, **PRETRAIN_SETS[feature], **over)

    run_distributed(run_configs, 1, [sets(f"{s}/ref", s, {}) for s in PRETRAIN_SETS], timeout=600)
    run_distributed(run_configs, 2, [sets(run, s, over) for run, (s, over) in PRETRAIN_LAYOUTS.items()], timeout=900)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("run", PRETRAIN_LAYOUTS)
def test_each_feature_pretrains_under_parallelism_with_one_ranks_losses(pretrained, run):
    feature = PRETRAIN_LAYOUTS[run][0]
    ref, got = str(pretrained / feature / "ref"), str(pretrained / run)
    assert_close_curves(losses(ref), losses(got), rtol=1e-5)
    assert_close_curves(losses(ref, "eval"), losses(got, "eval"), rtol=1e-5)
    if "pp" not in run:  # a pipeline logs the norm only where DeepSpeed keeps one (not fp32 ZeRO-0/1)
        # (5e-5: a later step's norm is over weights Adam has moved, and it moves a weight whose gradient is rounding
        # noise by up to lr a step either way, as the NOTE below says: soft-capping under TP, fp32 products summed in
        # halves through oneDNN's blocks, reached 1.7e-5 at step 3)
        assert_close_curves(losses(ref, key="grad_norm"), losses(got, key="grad_norm"), rtol=5e-5)
    # the final checkpoint, its slices put together by the split table (TP), the stage names (PP) or ZeRO-3's
    # partitions, is the one-rank model. NOTE: atol: Adam moves a weight whose gradient is rounding noise (the key
    # bias: softmax ignores it) by up to lr a step either way; a wrong cut moves the logits by O(1)
    from megatrain.generate import load_model

    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(got)[0](tokens), load_model(ref)[0](tokens), rtol=0, atol=5e-3)
