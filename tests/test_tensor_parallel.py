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
def test_tensor_parallel_equals_unsplit(check):
    run_distributed(check, 2, timeout=180)
