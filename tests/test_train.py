"""Training through real DeepSpeed over gloo: one rank (default tier) and several (slow tier)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import run_distributed
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets


def megatrain_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatrain.cli", *args], capture_output=True, text=True, timeout=300)


def _rewind_latest(ckpt: str, step: int) -> None:
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write(f"step{step:08d}")


def test_single_rank_trains_saves_resumes_and_generates(tmp_path):
    data = make_byte_dataset(tmp_path)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_distributed(run_configs, 1, [small_sets(data, a), small_sets(data, b, **{"checkpoint.interval": 3})], timeout=300)
    full = losses(a)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert full[6] < full[1] - 0.3  # it learns
    assert open(os.path.join(a, "latest")).read() == "step00000006"
    assert {"step00000003", "step00000006"} <= set(os.listdir(a))
    # stop after step 3 (rewind `latest`), rerun the same command: steps 4-6 continue the same curve
    _rewind_latest(b, 3)
    run_distributed(run_configs, 1, [small_sets(data, b)], timeout=300)
    assert_close_curves(full, losses(b), rtol=1e-6, steps=[4, 5, 6])
    marks = [json.loads(x) for x in open(os.path.join(b, "metrics.jsonl")) if '"resume"' in x]
    assert marks == [{"step": 3, "kind": "resume"}]  # where megatrain plot draws the resume
    # generation from the checkpoint in this (non-distributed) process, with the KV cache
    from megatrain.generate import generate, load_model

    model, saved = load_model(a)
    assert saved["step"] == 6 and saved["consumed_samples"] == 48
    out = generate(model, torch.tensor([[72, 101]]), max_new_tokens=10, temperature=0)
    assert out.shape == (1, 12)
    # greedy decoding with the cache equals argmax of full forwards
    x = out[:, :2]
    for _ in range(10):
        x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    assert torch.equal(x, out)
    # the command line: text out; a prompt longer than the model reads is one error line
    r = megatrain_cli("generate", "--checkpoint", a, "--prompt", "He", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("He"), r.stderr
    r = megatrain_cli("generate", "--checkpoint", a, "--prompt", "x" * 64)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("megatrain generate: error: --prompt is 64 "
                                                                               "tokens"), r.stderr
    # megatrain.json: the config as asked (vocab_size 0: the tokenizer's, padded) and what the run derived from it
    from megatrain.resolved import saved_config

    path = os.path.join(a, "step00000006", "megatrain.json")
    state = json.load(open(path))
    assert state["config"]["model"]["vocab_size"] == 0
    assert state["resolved"]["model"]["vocab_size"] == model.cfg.vocab_size == 320  # 259 byte pieces, padded to 64
    assert {k: state["resolved"][k] for k in ("tokenizer", "seq_len", "max_steps", "labels")} == dict(
        tokenizer="byte", seq_len=32, max_steps=6, labels=[])
    # a checkpoint saved without `resolved` held the derived values in its config: it reads the same
    state["config"] = saved_config(state).to_dict()
    del state["resolved"]
    with open(path, "w") as f:
        json.dump(state, f)
    os.remove(os.path.join(a, "step00000006", "manifest.json"))  # (nor a manifest: it was saved before either)
    old, saved = load_model(a)
    assert saved["config"]["model"]["vocab_size"] == 320
    assert all(torch.equal(t, old.state_dict()[k]) for k, t in model.state_dict().items())


@pytest.mark.slow
def test_time_limit_saves_exits_and_leaves_the_stop_note(tmp_path, monkeypatch):
    """train.exit_duration_minutes: save, exit cleanly, tell a job script (MEGATRAIN_STOP_FILE); the rerun resumes."""
    data = make_byte_dataset(tmp_path)
    ck, note = str(tmp_path / "ck"), tmp_path / "stopped"
    monkeypatch.setenv("MEGATRAIN_STOP_FILE", str(note))  # the spawned rank inherits it
    run_distributed(run_configs, 1, [small_sets(data, ck, **{"train.exit_duration_minutes": 1e-6,
                                                             "checkpoint.interval": 0})], timeout=300)
    assert note.read_text() == "time limit (train.exit_duration_minutes) at step 1\n"
    assert open(os.path.join(ck, "latest")).read() == "step00000001"
    note.unlink()
    run_distributed(run_configs, 1, [small_sets(data, ck, **{"checkpoint.interval": 0})], timeout=300)
    assert sorted(losses(ck)) == [1, 2, 3, 4, 5, 6] and not note.exists()
    assert open(os.path.join(ck, "latest")).read() == "step00000006"


def _stop_reasons(rank, world):
    import signal
    import time

    import torch.distributed as dist

    from megatrain.training.loop import StopRequest

    stop = StopRequest(0)
    assert stop.reason(1, "cpu", log_step=True) is None
    if rank == 1:  # srun signals each task itself: one rank may see USR1 a step before the others
        os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.reason(2, "cpu", log_step=True) == "SIGUSR1"
    if rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.reason(3, "cpu", log_step=True) == "SIGTERM"  # disagreeing ranks: the later entry of REASONS wins

    # Between log steps the ranks look only at the step they agreed on, set by the slowest rank's step time.
    stop = StopRequest(0)
    stop.CHECK_SECONDS = 1.0
    time.sleep(0.05 if rank == 0 else 0.2)  # one step: rank 1 is the slow one, so it sets the next check
    assert stop.reason(1, "cpu", log_step=True) is None
    agreed = [None] * world
    dist.all_gather_object(agreed, stop.next_check)
    assert agreed[0] == agreed[1] and 2 <= agreed[0] <= 1 + int(1.0 / 0.2), agreed
    if rank == 0:
        os.kill(os.getpid(), signal.SIGUSR1)
    for step in range(2, agreed[0]):  # no collective here: rank 1 would hang in one rank 0 never joined
        assert stop.reason(step, "cpu", log_step=False) is None
    assert stop.reason(agreed[0], "cpu", log_step=False) == "SIGUSR1"


@pytest.mark.slow
def test_every_rank_records_the_stop_reason_of_the_rank_that_was_signalled():
    run_distributed(_stop_reasons, 2, timeout=120)


@pytest.mark.slow
def test_mlm_objective_trains_and_logs_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = make_byte_dataset(tmp_path)
    ck = str(tmp_path / "mlm")
    run_distributed(run_configs, 1, [small_sets(data, ck, **{"model.objective": "mlm", "train.max_steps": 8,
                                                             "logging.tensorboard": True, "logging.wandb": True})],
                    timeout=300)
    curve = losses(ck)
    assert np.mean([curve[7], curve[8]]) < np.mean([curve[1], curve[2]])
    rows = [json.loads(line) for line in open(os.path.join(ck, "metrics.jsonl"))]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[0])
    assert all(np.isfinite(r["grad_norm"]) for r in rows if "grad_norm" in r)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(ck, "tensorboard")))
    assert os.path.isdir(os.path.join(ck, "wandb"))
    r = megatrain_cli("generate", "--checkpoint", ck)
    assert r.returncode == 1 and "generate needs a causal LM checkpoint" in r.stderr.strip().splitlines()[-1], r.stderr


def test_wandb_keeps_one_run_across_restarts(tmp_path, monkeypatch):
    """A resumed or requeued run logs into the same W&B run (before, every start made a new one)."""
    from megatrain.config import load_config
    from megatrain.training.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config("tiny", [f"checkpoint.dir={tmp_path}", "logging.wandb=true", "logging.tensorboard=false"])
    ids = []
    for start in (0, 5):
        logger = MetricsLogger(cfg, str(tmp_path), 10, start, enabled=True)
        ids.append(logger.wandb.id)
        logger.close()
    assert ids[0] == ids[1] == open(tmp_path / "wandb_id").read()


def test_zero0_clips_as_torch_does_and_skips_a_non_finite_gradient():
    """SkipNonFinite (fp32 ZeRO-0 without a pipeline): one foreach norm gives the reported norm and the clip, equal to
    torch's clip_grad_norm_ (parameters without a gradient left out); a NaN gradient skips the update."""
    from megatrain.training.engine import SkipNonFinite

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(10, 5)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    ours[1].grad = ref[1].grad = None
    opt = SkipNonFinite(torch.optim.SGD(ours, lr=0.1), clip=1.0)
    want = torch.nn.utils.clip_grad_norm_([q for q in ref if q.grad is not None], 1.0)
    opt.step()
    torch.optim.SGD(ref, lr=0.1).step()
    assert float(opt._global_grad_norm) == pytest.approx(float(want), rel=1e-6) and float(want) > 1.0
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q)
    before = [p.detach().clone() for p in ours]
    ours[0].grad = torch.full_like(ours[0], float("nan"))
    opt.step()
    assert opt.overflow and all(torch.equal(p, b) for p, b in zip(ours, before))


@pytest.mark.slow
def test_two_ranks_match_one_rank_at_every_zero_stage(tmp_path):
    """Same global batch, fp32: the per-step losses and gradient norms of 2 ranks equal 1 rank's for ZeRO 1/2/3 (to
    1e-5; the norm is clipped to 1 in the first steps, by DeepSpeed's ZeRO optimizers there and by SkipNonFinite in
    the ZeRO-0 reference); a ZeRO-3 checkpoint consolidates with DeepSpeed's zero_to_fp32 to the same validation loss; 2-rank
    ZeRO-2 and ZeRO-3 runs resume on the same curve."""
    data = make_byte_dataset(tmp_path)
    ref = str(tmp_path / "ref")
    run_distributed(run_configs, 1, [small_sets(data, ref, **{"parallel.zero_stage": 0})], timeout=300)
    runs = {s: str(tmp_path / f"z{s}") for s in (1, 2, 3)}
    run_distributed(run_configs, 2, [small_sets(data, d, **{"parallel.zero_stage": s}) for s, d in runs.items()], timeout=600)
    assert max(losses(ref, key="grad_norm").values()) > 1.0  # the clip is at work
    for s, d in runs.items():
        assert_close_curves(losses(ref), losses(d), rtol=1e-5)
        assert_close_curves(losses(ref, "eval"), losses(d, "eval"), rtol=1e-5)
        assert_close_curves(losses(ref, key="grad_norm"), losses(d, key="grad_norm"), rtol=1e-5)

    # DeepSpeed's own consolidation of the ZeRO-3 checkpoint gives the same validation loss in one process
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megatrain.config import load_config
    from megatrain.data import build_gpt_datasets
    from megatrain.model import Transformer

    sd = get_fp32_state_dict_from_zero_checkpoint(runs[3])
    cfg = load_config("tiny", small_sets(data, runs[3], **{"model.vocab_size": 320}))
    model = Transformer(cfg.model)
    model.load_state_dict(sd)
    model.eval()
    _, valid, _ = build_gpt_datasets(data, cfg.data.split, 32, [48, 2 * 8, 0], cfg.train.seed)
    with torch.no_grad():  # eval_iters=2 global batches of 8, in micro-batches of 2 consecutive samples
        per_micro = []
        for j in range(8):
            tok = torch.from_numpy(np.stack([valid[i] for i in (2 * j, 2 * j + 1)]))
            per_micro.append(model(tok[:, :-1], tok[:, 1:]).item())
    np.testing.assert_allclose(np.mean(per_micro), losses(runs[3], "eval")[6], rtol=1e-5)
    # and `megatrain generate`'s loader reads the same ZeRO-3 weights
    from megatrain.generate import load_model

    loaded, _ = load_model(runs[3])
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(loaded(x), model(x))

    # stop-and-resume with 2 ranks: rewind to step 3 and rerun
    for s in (2, 3):
        _rewind_latest(runs[s], 3)
    run_distributed(run_configs, 2, [small_sets(data, runs[s], **{"parallel.zero_stage": s}) for s in (2, 3)], timeout=600)
    for s in (2, 3):
        assert_close_curves(losses(ref), losses(runs[s]), rtol=1e-5, steps=[4, 5, 6])


@pytest.mark.slow
def test_masked_loss_is_normalised_over_the_whole_global_batch(tmp_path):
    """MLM masks a different number of tokens in every micro-batch: the loss is the mean over every masked token of
    the global batch, so micro-batches of 1, 2 or 8 (8, 4 or 1 accumulation steps) give the same losses and updates."""
    data = make_byte_dataset(tmp_path)
    runs = {mb: str(tmp_path / f"mb{mb}") for mb in (1, 2, 8)}
    common = {"model.objective": "mlm", "train.max_steps": 4, "checkpoint.interval": 0, "train.eval_interval": 4}
    run_distributed(run_configs, 1, [small_sets(data, d, **common, **{"train.micro_batch_size": mb})
                                     for mb, d in runs.items()], timeout=300)
    for mb in (2, 8):
        assert_close_curves(losses(runs[1]), losses(runs[mb]), rtol=1e-5)
        assert_close_curves(losses(runs[1], "eval"), losses(runs[mb], "eval"), rtol=1e-5)
