"""Background checkpoint saves (checkpoint.async_save, checkpoint/async_save.py): the same checkpoints and the same
resumed curve as synchronous saves; `latest` moves only once every file is on disk, so a kill in the middle of the
background write leaves it naming the checkpoint before; a failed background write stops the run as a synchronous
one does. The kill -9 campaign over async saves is in test_reliability.py."""
import collections
import io
import os
import signal

import pytest
import torch

from distributed import run_distributed
from test_reliability import _complete, error_line, pretrain
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets

from megatrain.checkpoint import manifest
from megatrain.checkpoint.async_save import host_copy
from megatrain.checkpoint.io import load_rank_file


def test_a_host_copy_shares_nothing_with_the_state_and_saves_the_same_bytes():
    base = torch.arange(10.0)
    p = torch.nn.Parameter(torch.ones(3))
    state = {"view": base[2:5], "whole": base, "tied": base, "nested": collections.OrderedDict(p=p, l=[1, (2, None)])}
    copy = host_copy(state)
    want = io.BytesIO()
    torch.save(state, want)
    base += 100  # training goes on
    assert torch.equal(copy["view"], torch.tensor([2.0, 3.0, 4.0])) and copy["whole"][0] == 0
    assert copy["view"].untyped_storage().data_ptr() == copy["whole"].untyped_storage().data_ptr()  # views kept
    assert copy["whole"] is copy["tied"] or torch.equal(copy["whole"], copy["tied"])
    assert isinstance(copy["nested"], collections.OrderedDict) and isinstance(copy["nested"]["p"], torch.nn.Parameter)
    got = io.BytesIO()
    torch.save(copy, got)
    assert got.getvalue() == want.getvalue()


def _tensors(path: str) -> dict:
    """Every tensor of a rank file by its place in the nesting."""
    out = {}

    def walk(x, where):
        if isinstance(x, torch.Tensor):
            out[where] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")

    walk(load_rank_file(path), "")
    return out


def _run_then_rerun_from_step_4(rank, world, runs, ck, rerun):
    """In a spawned rank: the runs, then `latest` of `ck` pointed back at step 4 and `rerun` (which resumes there)."""
    run_configs(rank, world, runs)
    with open(os.path.join(ck, "latest"), "w") as f:
        f.write("step00000004")
    run_configs(rank, world, [rerun])


def test_async_saves_hold_what_sync_saves_hold_and_resume_to_the_same_curve(tmp_path, monkeypatch, capfd):
    """Saves at every step, synchronous and in the background (the step-2 save made slow so that the next one waits
    for it), 6 steps; the background run again from its step-4 checkpoint: the same files with the same tensors (fp32:
    equal), each background checkpoint with its manifest, and the same losses (1e-6). The wait is one line on the
    log."""
    data = make_byte_dataset(tmp_path)
    sync, bg = str(tmp_path / "sync"), str(tmp_path / "async")
    over = {"train.max_steps": 6, "checkpoint.interval": 1, "train.eval_interval": 0}
    on = {**over, "checkpoint.async_save": True}
    monkeypatch.setenv("MEGATRAIN_FAULTS", "slow_async_write@step=2")
    run_distributed(_run_then_rerun_from_step_4, 1, [small_sets(data, sync, **over), small_sets(data, bg, **on)],
                    bg, small_sets(data, bg, **on), timeout=300)
    out = capfd.readouterr().out
    waits = [line for line in out.splitlines() if line.startswith("waited ")]
    assert any("for checkpoint step00000002 to finish writing in the background before saving step00000003" in w
               for w in waits), out[-3000:]
    assert all(" s for checkpoint step" in w for w in waits), waits
    assert "resumed from" in out and "step00000004 at step 4" in out, out[-3000:]
    assert sorted(losses(bg)) == [1, 2, 3, 4, 5, 6]
    assert_close_curves(losses(sync), losses(bg), rtol=1e-6)
    assert open(os.path.join(bg, "latest")).read() == "step00000006"  # the last save: committed before the end
    for step in range(1, 7):
        tag = f"step{step:08d}"
        a, b = os.path.join(sync, tag), os.path.join(bg, tag)
        assert sorted(os.listdir(a)) == sorted(os.listdir(b)), (tag, os.listdir(a), os.listdir(b))
        assert manifest.MANIFEST_FILE in os.listdir(b) and manifest.verify(b, "full") is None
        for name in os.listdir(a):
            if name.endswith(".pt"):
                ta, tb = _tensors(os.path.join(a, name)), _tensors(os.path.join(b, name))
                if name.startswith("rng_rank"):  # (numpy's and Python's generators are not seeded: torch's are)
                    ta, tb = {"torch": ta["/torch"]}, {"torch": tb["/torch"]}
                assert sorted(ta) == sorted(tb), (tag, name)
                bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
                assert not bad, (tag, name, bad)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_kill_in_the_middle_of_the_background_write_leaves_latest_on_the_checkpoint_before(tmp_path):
    """SIGKILL in the writer thread after the first file of step 4's save: `latest` names step 2, complete (with
    its manifest); the rerun resumes there and its losses equal the uninterrupted run's."""
    data = make_byte_dataset(tmp_path)
    over = {"train.max_steps": 6, "checkpoint.interval": 2, "train.eval_interval": 0, "checkpoint.async_save": True}
    ref, ck = str(tmp_path / "ref"), str(tmp_path / "ck")
    r = pretrain(data, ck, env={"MEGATRAIN_FAULTS": "kill_mid_async_write@step=4"}, **over)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert open(os.path.join(ck, "latest")).read() == "step00000002"
    assert _complete(ck, "step00000002", 1)
    assert os.path.isfile(os.path.join(ck, "step00000002", manifest.MANIFEST_FILE))
    assert not os.path.isfile(os.path.join(ck, "step00000004", "megatrain.json"))  # never committed
    r = pretrain(data, ck, **over)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step00000002 at step 2" in r.stdout, r.stdout[-3000:]
    assert pretrain(data, ref, **over).returncode == 0
    assert_close_curves(losses(ref), losses(ck), rtol=1e-6)
    assert open(os.path.join(ck, "latest")).read() == "step00000006"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_failed_background_write_stops_the_run_as_a_failed_save_does(tmp_path):
    """ENOSPC in the writer after the first file of step 6's save: one line, the partial step folder removed, `latest`
    still names step 3, and the rerun resumes from there."""
    data = make_byte_dataset(tmp_path)
    ck = str(tmp_path / "ck")
    over = {"train.eval_interval": 0, "checkpoint.keep_last": 1, "checkpoint.async_save": True}
    line = error_line(pretrain(data, ck, env={"MEGATRAIN_FAULTS": "enospc@step=6"}, **over))
    assert "saving checkpoint step00000006 in" in line and "latest still names step00000003" in line, line
    assert open(os.path.join(ck, "latest")).read() == "step00000003"
    assert "step00000006" not in os.listdir(ck)
    r = pretrain(data, ck, **over)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(ck)) == [1, 2, 3, 4, 5, 6] and open(os.path.join(ck, "latest")).read() == "step00000006"


def _pretrain_then_finetune(rank, world, lm, ft):
    from test_finetune import finetune_runs

    run_configs(rank, world, [lm])
    finetune_runs(rank, world, [("finetune-classify", ft)])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fine_tuning_with_background_saves_points_best_at_a_complete_checkpoint(tmp_path):
    """A classify fine-tune saving in the background, evaluated every 2 steps: `best` names a committed checkpoint
    (megatrain.json and manifest) of the evaluation with the best accuracy, and the run's test of it reads it."""
    import json

    from test_finetune import ft_sets, sentiment, write

    tmp = tmp_path / "lm"
    tmp.mkdir()
    data = make_byte_dataset(tmp)
    lm = str(tmp / "ck")
    train, valid = write(tmp_path / "train.jsonl", sentiment(120, 0)), write(tmp_path / "valid.jsonl", sentiment(30, 1))
    out = str(tmp_path / "clf")
    sets = ft_sets(lm, out, train, valid, **{"finetune.test_file": valid, "train.eval_interval": 2,
                                             "checkpoint.interval": 2, "checkpoint.async_save": True})
    run_distributed(_pretrain_then_finetune, 1, small_sets(data, lm, **{"train.max_steps": 2, "checkpoint.interval": 0,
                                                                         "train.eval_interval": 0}), sets, timeout=300)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [x for x in rows if x.get("kind") == "eval"]
    best = open(os.path.join(out, "best")).read()
    first_best = [e["step"] for e in evals if e["val_accuracy"] == max(x["val_accuracy"] for x in evals)][0]
    assert best == f"step{first_best:08d}", (best, evals)
    for name in ("megatrain.json", manifest.MANIFEST_FILE):
        assert os.path.isfile(os.path.join(out, best, name)), name
    assert manifest.check(os.path.join(out, best), "full") is None
    assert open(os.path.join(out, "latest")).read() == "step00000008"
    assert [x for x in rows if x.get("kind") == "test"]
