"""Tier 3: every TP layer equals its unsplit twin, forward and backward, over 2 gloo ranks."""
import pytest
import torch

from distributed import run_distributed


def _check_layers(rank, world):
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatrain.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                                    vocab_parallel_cross_entropy)

    g = dist.new_group(list(range(world)))
    torch.manual_seed(0)  # same full tensors on every rank
    x = torch.randn(2, 6, 8, requires_grad=True)
    w1, b1 = torch.randn(12, 8), torch.randn(12)
    w2, b2 = torch.randn(8, 12), torch.randn(8)
    # column -> row equals the unsplit two-layer product, forward and backward
    col = ColumnParallelLinear(w1.chunk(world)[rank], b1.chunk(world)[rank], g)
    row = RowParallelLinear(w2.chunk(world, dim=1)[rank], b2, g)
    y = row(torch.relu(col(x)))
    ref_w1, ref_w2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y_ref = F.linear(torch.relu(F.linear(xr, ref_w1, b1)), ref_w2, b2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y ** 2).sum().backward()
    (y_ref ** 2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col.weight.grad, ref_w1.grad.chunk(world)[rank], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row.weight.grad, ref_w2.grad.chunk(world, dim=1)[rank], rtol=1e-5, atol=1e-5)
    # vocab-parallel embedding
    emb_w = torch.randn(10, 4)
    ids = torch.randint(0, 10, (3, 5))
    emb = VocabParallelEmbedding(emb_w.chunk(world)[rank], g)
    out = emb(ids)
    torch.testing.assert_close(out, F.embedding(ids, emb_w))
    out.sum().backward()
    full = emb_w.clone().requires_grad_()
    F.embedding(ids, full).sum().backward()
    torch.testing.assert_close(emb.weight.grad, full.grad.chunk(world)[rank])
    # vocab-parallel cross-entropy, with ignored labels, never holding the full logits
    logits = torch.randn(7, 10)
    labels = torch.randint(0, 10, (7,))
    labels[2] = -100
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, labels, g)
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full, labels, ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    (loss * 3).backward()
    (ref * 3).backward()
    torch.testing.assert_close(shard.grad, full.grad.chunk(world, dim=-1)[rank], rtol=1e-5, atol=1e-6)


def _check_model(rank, world):
    """The whole Transformer under apply_tp (with and without sequence parallel) equals the unsplit one."""
    import torch.distributed as dist

    from megatrain.config import ModelConfig
    from megatrain.model import Transformer
    from megatrain.parallel.parallelize import apply_tp, check_tp_drift

    g = dist.new_group(list(range(world)))
    variants = [dict(), dict(n_kv_heads=2), dict(norm="layernorm", position="learned", mlp="gelu", bias=True,
                                                   tie_embeddings=True)]
    for kw in variants:
        for sp in (False, True):
            cfg = ModelConfig(vocab_size=64, n_layers=2, n_heads=4, d_model=32, max_seq_len=16, **kw)
            torch.manual_seed(0)
            ref = Transformer(cfg)
            torch.manual_seed(0)
            tp = apply_tp(Transformer(cfg), g, sequence_parallel=sp)
            tokens = torch.randint(0, 64, (2, 9))
            loss_ref = ref(tokens[:, :-1], tokens[:, 1:])
            loss_tp = tp(tokens[:, :-1], tokens[:, 1:])
            torch.testing.assert_close(loss_tp, loss_ref, rtol=1e-5, atol=1e-6, msg=f"{kw} sp={sp}")
            loss_ref.backward()
            loss_tp.backward()
            # the unsplit layer's gradient, sliced, equals the TP layer's
            full = ref.layers[0].mlp.down.weight.grad
            torch.testing.assert_close(tp.layers[0].mlp.down.weight.grad, full.chunk(world, dim=1)[rank], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tp.norm.weight.grad, ref.norm.weight.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tp.layers[1].attn_norm.weight.grad, ref.layers[1].attn_norm.weight.grad,
                                       rtol=1e-5, atol=1e-6)
            check_tp_drift(tp, g, step=1)  # identical replicas: passes
    # one rank's norm weight drifts: the check names it on every rank
    with torch.no_grad():
        if rank == 1:
            tp.layers[1].mlp_norm.weight[0] += 1e-3
    try:
        check_tp_drift(tp, g, step=7)
    except RuntimeError as e:
        assert "layers.1.mlp_norm.weight" in str(e) and "step 7" in str(e), e
    else:
        raise AssertionError("drift not detected")


@pytest.mark.parametrize("check", [_check_layers, _check_model])
@pytest.mark.slow
def test_tensor_parallel_equals_unsplit(check):
    run_distributed(check, 2, timeout=180)


def _check_dropout_streams(rank, world):
    """Attention dropout draws its own masks on each TP rank (parallel/rng.py), and the same masks again when a
    checkpointed block is recomputed. The two ranks' heads are made identical, so equal masks would give equal
    attention outputs: before the per-rank stream they did."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatrain.config import ModelConfig
    from megatrain.model import Transformer
    from megatrain.parallel.parallelize import apply_activation_checkpointing, apply_tp
    from megatrain.parallel.rng import apply_tp_dropout_streams, tp_stream_seed

    g = dist.new_group(list(range(world)))
    cfg = ModelConfig(vocab_size=64, n_layers=1, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=16, dropout=0.5)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # rank 1's heads (q 2-3, kv 1) := rank 0's heads (q 0-1, kv 0)
        w, hd = model.layers[0].attn.qkv.weight, 8
        w[2 * hd: 4 * hd] = w[0: 2 * hd]
        w[4 * hd + hd: 4 * hd + 2 * hd] = w[4 * hd: 4 * hd + hd]
        w[6 * hd + hd: 6 * hd + 2 * hd] = w[6 * hd: 6 * hd + hd]
    apply_tp(model, g)
    apply_tp_dropout_streams(model, sequence_parallel=False, seed=tp_stream_seed(1234, 0, rank))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        y = sdpa(*args, **kwargs)
        seen.append(y.detach().clone())
        return y

    F.scaled_dot_product_attention = record
    try:
        tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)  # the default stream alike on both ranks, as Run.start_rng seeds a TP group
        model.eval()
        model(tokens)
        model.train()
        model(tokens)
        import deepspeed

        deepspeed.init_distributed("gloo")  # deepspeed.checkpointing asks DeepSpeed's comm for the rank
        apply_activation_checkpointing(model, "full")
        loss = model(tokens, tokens)
        loss.backward()  # the block is recomputed: its attention runs again
    finally:
        F.scaled_dot_product_attention = sdpa
    mine = torch.stack(seen)
    other = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(other, mine, group=g)
    assert torch.equal(other[0][0], other[1][0])  # eval: the two ranks' heads compute the same
    assert not torch.equal(other[0][1], other[1][1])  # training: each rank drops its own pattern
    torch.testing.assert_close(mine[3], mine[2], rtol=0, atol=0)  # the recompute drew the forward's masks


@pytest.mark.slow
def test_attention_dropout_differs_across_tp_ranks_and_replays_on_recompute():
    run_distributed(_check_dropout_streams, 2, timeout=180)
