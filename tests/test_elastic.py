"""Elastic resume (checkpoint.elastic, training/elastic.py): the same run continued under another layout reshards
`latest` into a step folder of its own and goes on with the losses the uninterrupted run logs; each sample is
served once across the layouts."""
import json
import os
from types import SimpleNamespace

import pytest

from distributed import run_distributed
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets

from megatrain.config import load_config, validate_world
from megatrain.parallel.topology import Layout
from megatrain.tasks.base import micro_batch_ids


# --- tier 1: which samples each step serves ------------------------------------------------------------------------

def test_a_run_continued_under_other_layouts_serves_each_sample_once():
    """The legs of the slow test below: steps 0-19 on 2 data-parallel ranks (micro batch 2), 20-24 on 1 rank (micro
    batch 4: 2 accumulation steps), 25-29 on 2 ranks with tp=2 (one replica), 30-34 on 2 ranks under ZeRO-3 with micro
    batch 1: every sample id of [0, 35 x G) is served exactly once, each in the step whose global batch it belongs to."""
    legs = [(range(0, 20), 2, 1, 2), (range(20, 25), 1, 1, 4), (range(25, 30), 2, 2, 2), (range(30, 35), 2, 1, 1)]
    seen: dict[int, int] = {}
    for steps, world, tp, micro in legs:
        cfg = load_config("tiny", [f"parallel.tp={tp}", f"train.micro_batch_size={micro}", "train.global_batch_size=8"])
        layout = Layout(tp=tp, pp=1, dp=world // tp)
        accum = validate_world(cfg, world)
        G = cfg.train.global_batch_size
        for step in steps:
            served = []
            for r in range(layout.dp):
                for m in range(accum):
                    served += micro_batch_ids(step, m, cfg, layout.replicas, layout.replica(r)).tolist()
            for s in served:
                assert seen.setdefault(s, step) == step, f"sample {s} served at steps {seen[s]} and {step}"
            assert sorted(served) == list(range(step * G, (step + 1) * G))
    assert sorted(seen) == list(range(35 * 8))


# --- tier 2/3: real runs --------------------------------------------------------------------------------------------

def _folders(ck: str) -> list[str]:
    return sorted(t for t in os.listdir(ck) if t.startswith("step"))


@pytest.mark.timeout(600)
def test_a_single_rank_run_resumed_under_another_zero_stage_continues_its_curve(tmp_path, monkeypatch, capfd):
    """Stopped at step 3 under ZeRO-0; rerun to step 4 under ZeRO-2, which one rank runs as ZeRO-0 (no change of
    layout, nothing resharded); rerun under ZeRO-3: latest is resharded into step00000004-tp1-pp1-dp1-zero3 (the
    original kept) and every logged loss equals the uninterrupted ZeRO-0 run's (fp32, 1e-6)."""
    data = make_byte_dataset(tmp_path)
    over = {"train.max_steps": 6, "train.eval_interval": 0, "checkpoint.interval": 0, "parallel.zero_stage": 0}
    ref, ck = str(tmp_path / "ref"), str(tmp_path / "ck")
    run_distributed(run_configs, 1, [small_sets(data, ref, **over)], timeout=300)
    monkeypatch.setenv("MEGATRAIN_FAULTS", "stop@step=3,stop@step=4")
    run_distributed(run_configs, 1, [small_sets(data, ck, **over)], timeout=300)
    assert _folders(ck) == ["step00000003"]
    run_distributed(run_configs, 1, [small_sets(data, ck, **{**over, "parallel.zero_stage": 2})], timeout=300)
    assert "resharded" not in capfd.readouterr().out and _folders(ck)[-1] == "step00000004"
    run_distributed(run_configs, 1, [small_sets(data, ck, **{**over, "parallel.zero_stage": 3})], timeout=300)
    out = capfd.readouterr().out
    assert open(os.path.join(ck, "latest")).read() == "step00000006"
    assert {"step00000004", "step00000004-tp1-pp1-dp1-zero3", "step00000006"} <= set(_folders(ck))
    assert f"into {ck}/step00000004-tp1-pp1-dp1-zero3" in out and "step00000004 stays as it was" in out
    state = json.load(open(os.path.join(ck, "step00000004-tp1-pp1-dp1-zero3", "megatrain.json")))
    assert state["layout"]["zero_stage"] == 3 and state["step"] == 4
    assert_close_curves(losses(ref), losses(ck), rtol=1e-6)


@pytest.mark.timeout(600)
def test_elastic_false_refuses_another_layout_in_one_line(tmp_path):
    from megatrain.config import ConfigError

    data = make_byte_dataset(tmp_path)
    ck = str(tmp_path / "ck")
    over = {"train.max_steps": 2, "train.eval_interval": 0, "checkpoint.interval": 0, "parallel.zero_stage": 0}
    run_distributed(run_configs, 1, [small_sets(data, ck, **over)], timeout=300)
    with pytest.raises(AssertionError) as e:
        run_distributed(run_configs, 1, [small_sets(data, ck, **{**over, "train.max_steps": 4, "parallel.zero_stage": 3,
                                                                 "checkpoint.elastic": False})], timeout=300)
    assert ConfigError.__name__ in str(e.value) and "set checkpoint.elastic=true to reshard it here" in str(e.value)
    assert _folders(ck) == ["step00000002"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_run_stopped_and_rerun_on_other_layouts_logs_the_uninterrupted_losses(tmp_path, monkeypatch):
    """A 2-rank ZeRO-2 run stopped at step 20, rerun as 1 rank (stopped at 25), as 2 ranks with tp=2 (stopped at
    30), then as 2 ranks under ZeRO-3 to step 35: every logged loss equals the uninterrupted 2-rank ZeRO-2 run's (fp32,
    1e-5), and each rerun resharded latest into a folder of its layout."""
    data = make_byte_dataset(tmp_path)
    over = {"train.max_steps": 35, "train.eval_interval": 0, "checkpoint.interval": 0, "parallel.zero_stage": 2,
            "train.log_interval": 1}
    ref, ck = str(tmp_path / "ref"), str(tmp_path / "ck")
    run_distributed(run_configs, 2, [small_sets(data, ref, **over)], timeout=300)
    monkeypatch.setenv("MEGATRAIN_FAULTS", "stop@step=20,stop@step=25,stop@step=30")
    legs = [(2, {}), (1, {"train.micro_batch_size": 4}), (2, {"parallel.tp": 2}), (2, {"parallel.zero_stage": 3})]
    for world, change in legs:
        run_distributed(run_configs, world, [small_sets(data, ck, **{**over, **change})], timeout=300)
    # (one data-parallel rank's ZeRO-2 runs as ZeRO-0)
    assert {"step00000020", "step00000020-tp1-pp1-dp1-zero0", "step00000025", "step00000025-tp2-pp1-dp1-zero0",
            "step00000030", "step00000030-tp1-pp1-dp2-zero3", "step00000035"} == set(_folders(ck))
    assert_close_curves(losses(ref), losses(ck), rtol=1e-5)
    assert sorted(losses(ck)) == list(range(1, 36))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_restarts_a_killed_rank_and_the_run_finishes_on_the_uninterrupted_curve(tmp_path):
    """torchrun's elastic agent (c10d rendezvous on localhost, --max-restarts): rank 1 SIGKILLed after step 5 (in the
    job's first start only), torchrun restarts both ranks, they resume from latest (step 4) by themselves and finish
    step 8 with every loss of the uninterrupted 2-rank run (fp32, 1e-6)."""
    import signal
    import subprocess
    import sys

    from training_utils import set_args

    from megatrain.training.dist_env import free_port

    data = make_byte_dataset(tmp_path)
    over = {"train.max_steps": 8, "train.eval_interval": 0, "checkpoint.interval": 2, "parallel.zero_stage": 2,
            "parallel.timeout_minutes": 2}
    ref, ck = str(tmp_path / "ref"), str(tmp_path / "ck")
    run_distributed(run_configs, 2, [small_sets(data, ref, **over)], timeout=300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2", "--max-restarts=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=megatrain-elastic-test",
           "--rdzv-conf=last_call_timeout=1",
           "-m", "megatrain.pretrain", "--config", "tiny", *set_args(small_sets(data, ck, **over))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env=dict(os.environ, MEGATRAIN_FAULTS="kill@step=5@rank=1@restart=0"))
    try:
        out, _ = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    assert p.returncode == 0, out[-4000:]
    assert "resumed from" in out and "at step 4" in out, out[-4000:]
    assert out.count("megatrain pretrain |") == 2, out[-4000:]  # one restart was enough (gloo found its peers)
    assert open(os.path.join(ck, "latest")).read() == "step00000008"
    assert_close_curves(losses(ref), losses(ck), rtol=1e-6)
