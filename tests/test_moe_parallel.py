"""Mixture of Experts split over ranks: tensor parallelism (each expert TP-split) and expert parallelism (the experts
spread over ranks, tokens exchanged by all-to-all), in gloo processes, against the one-rank model."""
import copy

import pytest
import torch

from distributed import run_distributed
from megatrain.config import ModelConfig
from megatrain.model import Transformer
from megatrain.parallel.sharding import shard, split_of

MOE_SETS = {
    "plain": dict(),
    "shared_gate": dict(moe_shared_experts=1, moe_shared_gate=True, moe_norm_topk=False),
    "every2_zloss": dict(n_layers=3, moe_layers="every 2", moe_z_loss=0.01, moe_router="topk_softmax"),
    "capacity": dict(moe_capacity=0.75),
    "gelu": dict(mlp="gelu", moe_shared_experts=1),
}


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=16, moe_experts=4,
                moe_top_k=2, moe_ffn=16, moe_aux_loss=0.1)
    return ModelConfig(**{**base, **kw})


def _model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).double()


def _check_moe_under_tp(rank, world):
    import deepspeed
    import torch.distributed as dist

    from megatrain.parallel.parallelize import apply_activation_checkpointing, apply_tp, check_tp_drift

    deepspeed.init_distributed("gloo")
    g = dist.new_group(list(range(world)))
    for i, (name, kw) in enumerate(MOE_SETS.items()):
        for sp in (False, True):
            where = f"{name} sp={sp}"
            cfg = moe_cfg(**kw)
            ref = _model(cfg)
            tp = apply_activation_checkpointing(apply_tp(copy.deepcopy(ref), g, sequence_parallel=sp),
                                                ("none", "full")[(i + sp) % 2])
            tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(5))
            loss_ref, loss_tp = ref(tokens[:, :-1], tokens[:, 1:]), tp(tokens[:, :-1], tokens[:, 1:])
            torch.testing.assert_close(loss_tp, loss_ref, rtol=1e-10, atol=1e-12, msg=where)
            loss_ref.backward()
            loss_tp.backward()
            full = dict(ref.named_parameters())
            for n, p in tp.named_parameters():
                assert p.grad is not None, f"{where}: {n} got no gradient"
                want = shard(full[n].grad, split_of(n, cfg), world, rank)
                torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=f"{where}: {n}")
            with torch.no_grad():
                for p in tp.parameters():
                    p -= 0.5 * p.grad
            check_tp_drift(tp, g, step=1)


@pytest.mark.slow
def test_moe_under_tensor_parallelism_equals_the_unsplit_model():
    """Loss and every gradient (the router's and the aux losses' included) equal the one-rank model's, float64."""
    run_distributed(_check_moe_under_tp, 2, timeout=300)
