"""Sequence-length warmup (train.seq_len_warmup_*): the schedule, the batch transform, the served-sample accounting
through the training loop's micro-batches, a training run that logs its lengths, and an exact resume after kill -9
in the middle of the warmup."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distributed import run_distributed
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, set_args, small_sets

from megatrain.config import ConfigError, load_config, validate_world
from megatrain.config import seq_len_warmup_lengths as valid_lengths
from megatrain.model import Documents
from megatrain.parallel.topology import Layout
from megatrain.tasks.base import Batch
from megatrain.tasks.lm import CausalLM
from megatrain.tasks.seq_warmup import step_length, warmup_length
from megatrain.training.loop import global_targets, micro_batches


def warmup_cfg(seq_len: int, start: int, steps: int, keep: bool, *more: str):
    return load_config("tiny", [f"data.seq_len={seq_len}", f"model.max_seq_len={max(seq_len, 128)}",
                                f"train.seq_len_warmup_start={start}", f"train.seq_len_warmup_steps={steps}",
                                f"train.seq_len_warmup_keep_tokens={str(keep).lower()}", *more])


# --- the schedule -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,start,steps,keep", [(128, 8, 10, True), (128, 16, 37, True), (128, 8, 10, False),
                                                      (96, 24, 7, True), (100, 8, 13, False), (2048, 64, 1000, True),
                                                      (2048, 64, 1000, False), (64, 32, 1, True)])
def test_the_schedule_grows_by_valid_lengths_from_start_to_seq_len_at_step_n(seq_len, start, steps, keep):
    cfg = warmup_cfg(seq_len, start, steps, keep)
    lengths = [warmup_length(cfg, s) for s in range(steps + 20)]
    assert lengths[0] == start
    assert lengths[steps:] == [seq_len] * 20  # reaches data.seq_len at step N and stays there
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))  # monotone
    valid = valid_lengths(seq_len, keep)
    for s, n in enumerate(lengths[:steps]):
        assert start <= n < seq_len and n % 8 == 0 and (not keep or seq_len % n == 0), (s, n)
        ramp = start + (seq_len - start) * s / steps
        assert n <= ramp and not any(n < m <= ramp for m in valid), (s, n, ramp)  # the largest valid length


def test_off_or_over_the_warmup_every_step_is_full_length_and_batches_stay_as_made():
    off = load_config("tiny", [])
    assert {warmup_length(off, s) for s in range(50)} == {off.data.seq_len}
    assert {step_length(off, s) for s in range(50)} == {None}  # (a fine-tuning batch is as long as its examples)
    on = warmup_cfg(128, 8, 10, True)
    assert [step_length(on, s) for s in (0, 9, 10, 11)] == [8, 64, None, None]


@pytest.mark.parametrize("sets,match", [
    (["train.seq_len_warmup_steps=-1"], "train.seq_len_warmup_steps: must be at least 0"),
    (["train.seq_len_warmup_steps=5", "train.seq_len_warmup_start=4"],
     "train.seq_len_warmup_start: must be at least 8"),
    (["train.seq_len_warmup_steps=5", "train.seq_len_warmup_start=128"], "128 is not below data.seq_len=128"),
    (["train.seq_len_warmup_steps=5", "train.seq_len_warmup_start=20", "train.seq_len_warmup_keep_tokens=false"],
     "train.seq_len_warmup_start: 20 is not a multiple of 8; e.g. 16 or 24"),
    (["train.seq_len_warmup_steps=5", "train.seq_len_warmup_start=24"],
     "train.seq_len_warmup_start: 24 does not divide data.seq_len=128 .*; e.g. 16 or 32"),
    (["train.seq_len_warmup_steps=5", "data.seq_len=100"], "set train.seq_len_warmup_keep_tokens=false"),
    (["train.seq_len_warmup_steps=5", "finetune.task=sft"], "for pretraining only"),
    (["train.seq_len_warmup_steps=5", "parallel.pp=2"], "with parallel.pp=2; the pipeline needs one sequence length"),
    (["train.seq_len_warmup_steps=5", "parallel.cp=16", "model.n_heads=16", "model.n_kv_heads=16"],
     "rows split over parallel.cp = 16 ranks, which does not divide the warmup lengths"),
])
def test_bad_warmup_values_name_the_key_and_the_fix(sets, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config("tiny", sets)
    assert "\n" not in str(e.value)


def test_a_batch_is_reshaped_or_truncated_tokens_labels_and_segments_alike():
    B, T, L = 2, 16, 8
    tokens = torch.arange(B * T).view(B, T)
    segments = torch.tensor([[1] * 5 + [2] * 11, [1] * 12 + [2] * 4])  # documents, per row
    batch = Batch(tokens, tokens + 1000, segments)
    kept = batch.shortened(L, keep_tokens=True)
    assert kept.tokens.shape == kept.labels.shape == kept.segments.shape == (B * T // L, L)
    for b in range(B):
        for k in range(T // L):  # sample b's chunk k is row b*T/L + k
            row = b * (T // L) + k
            assert torch.equal(kept.tokens[row], tokens[b, k * L:(k + 1) * L])
            assert torch.equal(kept.labels[row], tokens[b, k * L:(k + 1) * L] + 1000)
            assert torch.equal(kept.segments[row], segments[b, k * L:(k + 1) * L])
    # a chunk starting mid-document is a row whose first span starts at 0; the boundaries are the sample's
    assert [[(lo, hi) for lo, hi, _ in spans] for spans in Documents.of(kept.segments).spans] == [
        [(0, 5), (5, 8)], [(0, 8)], [(0, 8)], [(0, 4), (4, 8)]]
    cut = batch.shortened(L, keep_tokens=False)
    assert torch.equal(cut.tokens, tokens[:, :L]) and torch.equal(cut.labels, tokens[:, :L] + 1000)
    assert torch.equal(cut.segments, segments[:, :L])
    assert Batch(tokens, tokens).shortened(L, True).segments is None


# --- served samples, through the loop's micro-batches -----------------------------------------------------------

class NumberedSamples:
    """Sample i holds tokens i*(T+1) + [0, T]: every (sample, position) can be read back from a token or label."""

    def __init__(self, seq_len: int):
        self.width = seq_len + 1

    def __getitem__(self, i: int) -> np.ndarray:
        return np.arange(i * self.width, (i + 1) * self.width, dtype=np.int64)


@pytest.mark.parametrize("keep,cp", [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_every_sample_is_served_once_and_its_targets_as_the_mode_says(keep, cp):
    """Over a run through and past the warmup on 4 data-parallel ranks (2 replicas of 2 context-parallel ranks with
    cp=2): each step serves G samples, each sample id of [0, steps x G) in exactly one step; with keep_tokens every
    target (sample, position) exactly once, else the first L of each sample; the targets the loss normalises by and
    the tokens counted are those trained on."""
    T, steps, n_steps, dp = 64, 6, 9, 4
    cfg = warmup_cfg(T, 8, steps, keep, "train.global_batch_size=16", "train.micro_batch_size=2", f"parallel.cp={cp}")
    G, accum, layout = cfg.train.global_batch_size, validate_world(cfg, dp), Layout(tp=1, pp=1, dp=dp, cp=cp)
    data, task = NumberedSamples(T), CausalLM()
    seen: dict[int, int] = {}  # sample id -> the step that served it
    targets: dict[int, list[int]] = {}  # sample id -> the label positions trained on
    for step in range(n_steps):
        L = warmup_length(cfg, step)
        per_step = T if keep else L
        for r in range(dp):
            run = SimpleNamespace(cfg=cfg, layout=layout, dp_rank=r, grad_accum=accum)
            batches = micro_batches(run, task, data, step, "cpu")
            assert all(b.tokens.shape[1] == L // cp and b.labels.shape == b.tokens.shape for b in batches)
            # what train_step counts: every rank the same global figures
            assert global_targets(run, task, batches) == G * per_step
            assert layout.dp * sum(b.real_tokens() for b in batches) == G * per_step
            for b in batches:
                for label, token in zip(b.labels.flatten().tolist(), b.tokens.flatten().tolist()):
                    sample, pos = divmod(label, T + 1)
                    assert token == label - 1  # the input is the position before its target, in the same sample
                    assert seen.setdefault(sample, step) == step, f"sample {sample} at steps {seen[sample]}, {step}"
                    targets.setdefault(sample, []).append(pos)
        served = [s for s, at in seen.items() if at == step]
        assert sorted(served) == list(range(step * G, (step + 1) * G))  # consumed_samples grows by G, as without warmup
    assert sorted(seen) == list(range(n_steps * G))
    for sample, positions in targets.items():
        L = warmup_length(cfg, seen[sample])
        assert sorted(positions) == list(range(1, (T if keep else L) + 1)), (sample, L)


# --- training -----------------------------------------------------------------------------------------------------

def _rows(ckpt: str) -> list[dict]:
    return [r for r in map(json.loads, open(os.path.join(ckpt, "metrics.jsonl"))) if r.get("kind", "train") == "train"]


def test_a_warmup_run_trains_and_logs_each_steps_length(tmp_path):
    """Both modes, one process: the logged seq_len follows the schedule, the tokens per step are the whole batch's
    (keep) or the cut one's (truncate), the loss is finite, and evaluation runs (at data.seq_len)."""
    data = make_byte_dataset(tmp_path)
    warm = {"train.seq_len_warmup_steps": 4, "train.seq_len_warmup_start": 8}
    keep, cut = str(tmp_path / "keep"), str(tmp_path / "cut")
    runs = [small_sets(data, keep, **warm),
            small_sets(data, cut, **warm, **{"train.seq_len_warmup_keep_tokens": False})]
    run_distributed(run_configs, 1, runs, timeout=300)
    for ck, lengths in ((keep, [8, 8, 16, 16, 32, 32]), (cut, [8, 8, 16, 24, 32, 32])):
        rows = _rows(ck)
        assert [r["seq_len"] for r in rows] == lengths
        G, T = 8, 32
        tokens = [round(r["tokens_per_s"] * r["seconds_per_step"]) for r in rows]  # one step per row
        assert tokens == ([G * T] * 6 if ck == keep else [G * n for n in lengths])
        assert all(np.isfinite(r["loss"]) for r in rows)
        assert sorted(losses(ck, "eval")) == [3, 6]
        saved = json.load(open(os.path.join(ck, "step00000006", "megatrain.json")))
        assert saved["consumed_samples"] == 6 * G


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("keep", [True, False])
def test_kill_9_mid_warmup_and_rerun_continues_the_uninterrupted_curve(tmp_path, keep):
    """The run is killed (SIGKILL) inside its step-4 save, mid-warmup; the same command rerun resumes from step 2 and
    every step's loss, length and evaluation equals the uninterrupted run's."""
    data = make_byte_dataset(tmp_path)
    over = {"train.seq_len_warmup_steps": 6, "train.seq_len_warmup_start": 8,
            "train.seq_len_warmup_keep_tokens": keep, "train.max_steps": 8, "checkpoint.interval": 2,
            "train.eval_interval": 4}

    def pretrain(ck: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "megatrain.cli", "pretrain", "--config", "tiny",
                               *set_args(small_sets(data, ck, **over))], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, **(env or {})))

    ref, ck = str(tmp_path / "ref"), str(tmp_path / "victim")
    r = pretrain(ref)
    assert r.returncode == 0, r.stderr[-3000:]
    r = pretrain(ck, {"MEGATRAIN_FAULTS": "kill_mid_save@step=4"})
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    assert open(os.path.join(ck, "latest")).read() == "step00000002"
    assert max(losses(ck)) == 4  # it had trained through step 4 (lengths 8, 8, 16, 16)
    r = pretrain(ck)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ck}/step00000002 at step 2" in r.stdout, r.stdout[-3000:]
    a, b = losses(ref), losses(ck)
    print("step  uninterrupted  resumed  |diff|")
    for s in sorted(a):
        print(f"{s:>4}  {a[s]:.8f}  {b.get(s, float('nan')):.8f}  {abs(a[s] - b.get(s, float('nan'))):.2e}")
    assert_close_curves(a, b, rtol=1e-6)
    assert_close_curves(losses(ref, "eval"), losses(ck, "eval"), rtol=1e-6)
    assert losses(ref, key="seq_len") == losses(ck, key="seq_len")
    assert losses(ck, key="seq_len")[8] == 32


@pytest.mark.slow
def test_under_context_parallelism_a_warmup_run_trains_as_one_rank_does(tmp_path):
    """cp=2 on 2 ranks: the samples are shortened before each rank takes its half of every row, so the lengths and
    the losses are the one-rank run's."""
    data = make_byte_dataset(tmp_path)
    warm = {"train.seq_len_warmup_steps": 4, "train.seq_len_warmup_start": 8, "train.eval_interval": 0}
    one, two = str(tmp_path / "one"), str(tmp_path / "cp2")
    run_distributed(run_configs, 1, [small_sets(data, one, **warm)], timeout=300)
    run_distributed(run_configs, 2, [small_sets(data, two, **warm, **{"parallel.cp": 2})], timeout=300)
    assert losses(two, key="seq_len") == losses(one, key="seq_len") == {1: 8, 2: 8, 3: 16, 4: 16, 5: 32, 6: 32}
    assert_close_curves(losses(one), losses(two), rtol=1e-5)
