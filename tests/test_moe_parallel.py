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


def _check_moe_under_ep(rank, world, tp):
    """Each rank its own tokens; the experts spread over the EP ranks (TP-split too when tp > 1). Each rank's loss
    equals the one-rank model's on its tokens, and the gradients, summed as DeepSpeed reduces them (dense ones over
    every rank's batch, an expert's over its replicas), equal the one-rank model's on all the tokens."""
    import deepspeed
    import torch.distributed as dist

    from megatrain.parallel.expert import apply_ep, local_experts
    from megatrain.parallel.parallelize import apply_tp
    from megatrain.parallel.sharding import is_expert_param

    deepspeed.init_distributed("gloo")
    ep = world // tp
    tp_rank, ep_rank = rank % tp, rank // tp
    tp_groups = [dist.new_group([e * tp + t for t in range(tp)]) for e in range(ep)]
    ep_groups = [dist.new_group([e * tp + t for e in range(ep)]) for t in range(tp)]
    solo = [dist.new_group([r]) for r in range(world)]  # the expert-data-parallel groups (one rank each here)
    for name, kw in MOE_SETS.items():
        if name == "capacity":
            continue  # capacity is per rank's batch: not the one-rank model on all tokens
        cfg = moe_cfg(**kw)
        ref = _model(cfg)
        model = apply_ep(apply_tp(copy.deepcopy(ref), tp_groups[ep_rank]), ep_groups[tp_rank], solo[rank])
        batches = torch.randint(0, 64, (ep, 2, 13), generator=torch.Generator().manual_seed(5))
        mine = batches[ep_rank]
        loss = model(mine[:, :-1], mine[:, 1:])
        torch.testing.assert_close(loss, ref(mine[:, :-1], mine[:, 1:]), rtol=1e-10, atol=1e-12, msg=name)
        loss.backward()
        sum(ref(b[:, :-1], b[:, 1:]) for b in batches).backward()
        full = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            want = full[n].grad
            if is_expert_param(n):
                want = want[local_experts(cfg.moe_experts, ep, ep_rank)]  # summed over the EP peers' rows already
                got = p.grad
            else:  # each rank's share of the batch: summed over the replicas
                got = p.grad.clone()
                dist.all_reduce(got, group=ep_groups[tp_rank])
            want = shard(want, split_of(n, cfg), tp, tp_rank)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"{name}: {n}")


@pytest.mark.slow
def test_moe_under_expert_parallelism_equals_the_one_rank_model():
    """tp=2 x ep=2 on 4 ranks (ep alone: the pretraining test below)."""
    run_distributed(_check_moe_under_ep, 4, 2, timeout=300)


# -- slow tier: pretraining under expert parallelism, against one rank ---------------------------------------------

MOE_RUN = {"model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_ffn": 32, "model.moe_aux_loss": 0.01,
           "train.max_steps": 10, "parallel.zero_stage": 1, "train.eval_interval": 0, "checkpoint.interval": 5,
           "train.precision": "fp32"}


@pytest.fixture(scope="module")
def moe_data(tmp_path_factory):
    from training_utils import make_byte_dataset

    return make_byte_dataset(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, moe_data):
    """The one-rank run every layout is compared with: its losses by step."""
    from training_utils import losses

    return losses(_pretrain(tmp_path_factory.mktemp("one"), moe_data, "one", 1))


def _pretrain(tmp_path, data, name: str, world: int, **over) -> str:
    from training_utils import run_configs, small_sets

    ckpt = str(tmp_path / name)
    run_distributed(run_configs, world, [small_sets(data, ckpt, **{**MOE_RUN, **over})], timeout=420)
    return ckpt


@pytest.mark.slow
def test_pretraining_under_expert_parallelism_has_the_one_rank_losses(tmp_path, moe_data, one_rank):
    """Dropless, fp32: EP=2 on 2 ranks, EP=2 x DP=2 (ZeRO-2), TP=2 x EP=2 (sequence parallel) and PP=2 x EP=2 on 4 give one rank's
    losses over 10 steps (1e-5) and resume bit for bit; the expert-load figures are in metrics.jsonl."""
    from training_utils import losses

    one = one_rank
    runs = {"ep2": (2, {"parallel.ep": 2}),
            "ep2_dp2_zero2": (4, {"parallel.ep": 2, "parallel.zero_stage": 2}),
            "tp2_sp_ep2": (4, {"parallel.ep": 2, "parallel.tp": 2, "parallel.sequence_parallel": True}),
            "pp2_ep2": (4, {"parallel.ep": 2, "parallel.pp": 2})}
    curves = {}
    for name, (world, over) in runs.items():
        got = curves[name] = losses(_pretrain(tmp_path, moe_data, name, world, **over))
        assert sorted(got) == sorted(one) == list(range(1, 11)), name
        for s in one:
            assert abs(got[s] - one[s]) <= 1e-5 * abs(one[s]), (name, s, got[s], one[s])
    for name in ("ep2_dp2_zero2", "pp2_ep2"):  # resumed from step 5 under the same layout: bit-exact
        (tmp_path / name / "latest").write_text("step00000005")
        resumed = losses(_pretrain(tmp_path, moe_data, name, 4, **runs[name][1]))
        assert {s: resumed[s] for s in range(6, 11)} == {s: curves[name][s] for s in range(6, 11)}, name
    import json

    rows = [json.loads(line) for line in open(tmp_path / "ep2" / "metrics.jsonl")]
    last = [r for r in rows if r.get("kind", "train") == "train"][-1]
    assert last["moe_dropped"] == 0 and last["moe_aux"] > 0
    # every step routes micro-batch tokens x top-k rows per layer: 8 sequences x 32 tokens x 2
    assert sum(last[f"moe.0.tokens_{k}"] for k in ("min", "max")) <= 8 * 32 * 2


@pytest.mark.slow
def test_reshard_expert_parallel_checkpoint_to_one_rank_and_back(tmp_path, moe_data, one_rank):
    """EP=2 (ZeRO-2, 2 ranks) saved at step 5 -> reshard to EP=1 on one rank -> reshard back to EP=2: both continue
    the one-rank loss curve to step 10 (1e-5), optimizer state included; consolidate reads every expert."""
    from megatrain.checkpoint.reader import CheckpointReader
    from megatrain.convert.writer import reshard
    from training_utils import losses

    one = one_rank
    ep2 = _pretrain(tmp_path, moe_data, "ep2", 2, **{"parallel.ep": 2, "parallel.zero_stage": 2})
    (tmp_path / "ep2" / "latest").write_text("step00000005")
    ep1 = str(tmp_path / "ep1")
    reshard(ep2, ep1, ["parallel.ep=1", "parallel.zero_stage=1"], 1)
    back = str(tmp_path / "back")
    reshard(ep1, back, ["parallel.ep=2", "parallel.zero_stage=2"], 2)
    with CheckpointReader(ep2) as a, CheckpointReader(back) as b:  # every expert, its moments too
        assert a.layout["ep"] == b.layout["ep"] == 2
        for name in a.names():
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a.tensor(name, key), b.tensor(name, key)), (name, key)
    curves = {"ep1": losses(_pretrain(tmp_path, moe_data, "ep1", 1, **{"parallel.zero_stage": 1})),
              "back": losses(_pretrain(tmp_path, moe_data, "back", 2, **{"parallel.ep": 2, "parallel.zero_stage": 2}))}
    for name, got in curves.items():
        for s in range(6, 11):
            assert abs(got[s] - one[s]) <= 1e-5 * abs(one[s]), (name, s, got[s], one[s])


@pytest.mark.slow
def test_dropped_tokens_logged_under_expert_parallelism_equal_a_reference(tmp_path, moe_data):
    """A capacity factor under EP=2: the dropped rows metrics.jsonl logs for each layer and step equal the count the
    test makes itself, micro-batch by micro-batch, with the checkpoint's model (train.lr 0: the weights never move)."""
    import json

    import numpy as np

    from megatrain.data import build_gpt_datasets
    from megatrain.generate import load_model
    from megatrain.moe import take_stats

    over = {"parallel.ep": 2, "model.moe_capacity": 0.5, "train.lr": 0.0, "train.min_lr": 0.0, "train.max_steps": 2,
            "checkpoint.interval": 0}
    ckpt = _pretrain(tmp_path, moe_data, "capacity", 2, **over)
    rows = {r["step"]: r for r in map(json.loads, open(f"{ckpt}/metrics.jsonl")) if r.get("kind", "train") == "train"}
    model, state = load_model(ckpt)
    model.train()  # (the layers count what they route only in training)
    train, _, _ = build_gpt_datasets(moe_data, "95,5,0", 32, [2 * 8, 0, 0], state["config"]["train"]["seed"])
    for step in (0, 1):
        for start in range(step * 8, step * 8 + 8, 2):  # the global batch, micro-batch by micro-batch (2 samples)
            tokens = torch.from_numpy(np.stack([train[i] for i in (start, start + 1)]))
            with torch.no_grad():
                model(tokens[:, :-1])
        dropped = {layer: int(s.dropped) for layer, s in take_stats(model).items()}
        assert sum(dropped.values()) > 0
        for layer, n in dropped.items():
            assert rows[step + 1][f"moe.{layer}.dropped"] == n, (step, layer)
        assert rows[step + 1]["moe_dropped"] == sum(dropped.values())
