"""Slow tier: consolidate and reshard across every layout megatrain trains under, and the HF round-trip matrix.

Each source layout (tp, pp, dp, ZeRO) trains 8 steps from the same seed with checkpoints at 3, 6 and 8. Then:
- consolidate: the step-8 tensors equal DeepSpeed's own zero_to_fp32 (DP layouts) and the checkpoint's own rank
  slices put together by hand (TP/PP layouts), are close to the one-rank run's, and give that layout's logged
  validation loss;
- reshard: the step-3 checkpoint, rewritten for three other layouts, resumes there and trains steps 4-8 with the
  losses the source layout logged for them (rtol 1e-5).
"""
import json
import os

import numpy as np
import pytest
import torch

from distributed import run_distributed
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets

# name: ((tp, pp, dp, zero), reshard targets)
SOURCES = {
    "z0": ((1, 1, 1, 0), [(1, 1, 2, 3), (2, 1, 1, 1), (1, 2, 1, 1)]),
    "dp2z1": ((1, 1, 2, 1), [(1, 1, 1, 0), (2, 1, 2, 3), (1, 1, 2, 2)]),
    "dp2z2": ((1, 1, 2, 2), [(1, 1, 2, 3), (2, 2, 1, 1), (1, 1, 1, 1)]),
    "dp2z3": ((1, 1, 2, 3), [(1, 1, 2, 1), (1, 1, 1, 2), (2, 1, 1, 1)]),  # ZeRO-3 -> ZeRO-1
    "tp2": ((2, 1, 1, 1), [(1, 1, 2, 2), (1, 2, 1, 1), (1, 1, 1, 0)]),
    "pp2": ((1, 2, 1, 1), [(2, 1, 1, 1), (1, 1, 2, 3), (2, 2, 1, 1)]),
    "tp2pp2": ((2, 2, 1, 1), [(1, 1, 2, 3), (1, 1, 1, 1), (2, 1, 2, 2)]),  # (2,2,1) -> (1,1,2) ZeRO-3
    "tp2dp2z3": ((2, 1, 2, 3), [(1, 1, 1, 0), (2, 2, 1, 1), (1, 1, 2, 1)]),
}
COMMON = {"train.max_steps": 8, "checkpoint.interval": 3, "train.eval_interval": 8}


def layout_sets(tp, pp, dp, zero) -> dict:
    return {"parallel.tp": tp, "parallel.pp": pp, "parallel.zero_stage": zero}


def _reshard_then_resume(rank, world, jobs):
    """In a spawned world: write each resharded checkpoint, then resume training from it (steps 4-8)."""
    from megatrain.convert.writer import Job, write_rank

    for job, sets in jobs:
        write_rank(Job(**job))
    run_configs(rank, world, [sets for _, sets in jobs])


@pytest.mark.slow
def test_consolidate_and_reshard_every_layout(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megatrain.checkpoint.reader import CheckpointReader
    from megatrain.config import load_config
    from megatrain.resolved import saved_config
    from megatrain.convert.writer import target_config
    from megatrain.data import build_gpt_datasets
    from megatrain.generate import load_model

    data = make_byte_dataset(tmp_path)
    ref = str(tmp_path / "ref")
    by_world = {1: [small_sets(data, ref, **COMMON, **{"parallel.zero_stage": 0, "checkpoint.dir": ref})]}
    for name, ((tp, pp, dp, zero), _) in SOURCES.items():
        by_world.setdefault(tp * pp * dp, []).append(small_sets(data, str(tmp_path / name), **COMMON,
                                                                **layout_sets(tp, pp, dp, zero)))
    for world, runs in by_world.items():
        run_distributed(run_configs, world, runs, timeout=900)

    # consolidate: exact against DeepSpeed's reader, close to the one-rank run, the layout's own validation loss
    with CheckpointReader(ref) as r:
        reference = dict(r.tensors())
    cfg = load_config("tiny", small_sets(data, ref, **{"model.vocab_size": 320}))
    _, valid, _ = build_gpt_datasets(data, cfg.data.split, 32, [64, 2 * 8, 0], cfg.train.seed)
    batches = [torch.from_numpy(np.stack([valid[i] for i in (2 * j, 2 * j + 1)])) for j in range(8)]
    for name, ((tp, pp, dp, zero), _) in SOURCES.items():
        ck = str(tmp_path / name)
        with CheckpointReader(ck) as r:
            got = dict(r.tensors())
            zero_run = 0 if dp == pp == 1 and zero in (1, 2) else zero  # one data-parallel rank: ZeRO-1/2 run as 0
            assert r.layout == dict(tp=tp, pp=pp, dp=dp, zero_stage=zero_run)
        assert set(got) == set(reference)
        if tp == pp == 1 and zero > 0:
            ds = get_fp32_state_dict_from_zero_checkpoint(ck)
            for k in got:
                assert torch.equal(got[k], ds[k]), (name, k)
        elif zero < 3:
            _check_against_rank_files(ck, got, tp, pp)
        for k in got:
            torch.testing.assert_close(got[k], reference[k], rtol=1e-3, atol=2e-4, msg=f"{name} {k}")
        model, _ = load_model(ck)
        with torch.no_grad():
            val = np.mean([model(b[:, :-1], b[:, 1:]).item() for b in batches])
        np.testing.assert_allclose(val, losses(ck, "eval")[8], rtol=1e-5, err_msg=name)

    # reshard every source's step-3 checkpoint to three layouts; resume each for steps 4-8
    jobs_by_world: dict[int, list] = {}
    for name, (_, targets) in SOURCES.items():
        src = str(tmp_path / name)
        saved = json.load(open(os.path.join(src, "step00000003", "megatrain.json")))
        for tp, pp, dp, zero in targets:
            out = str(tmp_path / f"{name}-to-{tp}{pp}{dp}{zero}")
            sets = [f"{k}={v}" for k, v in layout_sets(tp, pp, dp, zero).items()]
            tcfg, world = target_config(saved_config(saved), sets, tp * pp * dp)
            job = dict(cfg=tcfg.to_dict(), source=src, tag="step00000003", hf_dir=None, trust_pickle=False, tmp=out,
                       step=3, consumed_samples=24)
            resume = small_sets(data, out, **COMMON, **layout_sets(tp, pp, dp, zero))
            jobs_by_world.setdefault(world, []).append((job, resume))
    for world, jobs in jobs_by_world.items():
        run_distributed(_reshard_then_resume, world, jobs, timeout=1500)
    for name, (_, targets) in SOURCES.items():
        src_curve = losses(str(tmp_path / name))
        for tp, pp, dp, zero in targets:
            out = str(tmp_path / f"{name}-to-{tp}{pp}{dp}{zero}")
            got = losses(out)
            assert sorted(got) == [4, 5, 6, 7, 8], (name, out)
            assert_close_curves(src_curve, got, rtol=1e-5, steps=[4, 5, 6, 7, 8])
            print(f"{name} -> tp {tp} pp {pp} dp {dp} ZeRO-{zero}: steps 4-8 max rel. difference "
                  f"{max(abs(got[s] - src_curve[s]) / src_curve[s] for s in got):.1e}")


def _check_against_rank_files(ck: str, got: dict, tp: int, pp: int) -> None:
    """The weights every rank saved itself (DeepSpeed's module files), put together through the sharding table."""
    from megatrain.checkpoint.io import read_latest
    from megatrain.resolved import saved_config
    from megatrain.parallel.sharding import canonical_name, split_of, unshard

    tag = read_latest(ck)
    folder = os.path.join(ck, tag)
    cfg = saved_config(json.load(open(os.path.join(folder, "megatrain.json")))).model
    slices: dict[str, dict[int, torch.Tensor]] = {}
    for f in sorted(os.listdir(folder)):
        if pp > 1 and f.startswith("layer_"):  # layer_{i}-model_{tp}-model_states.pt
            layer, tp_rank = int(f[6:8]), int(f.split("-model_")[1][:2])
            sd = torch.load(os.path.join(folder, f), weights_only=True)
            named = {canonical_name(f"{layer}.{k}", cfg.n_layers): v for k, v in sd.items()}
        elif pp == 1 and f.startswith("mp_rank_"):
            tp_rank = int(f[8:10])
            named = torch.load(os.path.join(folder, f), weights_only=False)["module"]
        else:
            continue
        for k, v in named.items():
            if k in got:
                slices.setdefault(k, {})[tp_rank] = v.float()
    assert set(slices) == set(got)
    for k, by_rank in slices.items():
        split = split_of(k, cfg)
        full = unshard([by_rank[r] for r in range(tp)], split) if not split.replicated else by_rank[0]
        assert torch.equal(full, got[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "mistral", "gpt2"])
def test_hf_round_trips(kind, tp, tmp_path):
    """Random tiny transformers models -> from-hf under tp -> to-hf: the same tensors, logits within 1e-5."""
    from test_convert import hf_round_trip

    hf_round_trip(kind, tmp_path, tp=tp)
