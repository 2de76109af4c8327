"""Shared by the training tests: a tiny byte-level dataset and a small, fast config."""
import json
import os

import numpy as np

from conftest import make_documents, write_jsonl


def make_byte_dataset(tmp_path) -> str:
    from megatrain.data.preprocess import preprocess

    prefix = str(tmp_path / "data" / "tiny")
    os.makedirs(tmp_path / "data", exist_ok=True)
    preprocess([write_jsonl(tmp_path / "data" / "c.jsonl", make_documents(400, seed=1, max_words=80))], "byte", prefix,
               append_eod=True)
    return prefix


def small_sets(data: str, ckpt: str, **over) -> list[str]:
    sets = {
        "data.path": data, "data.tokenizer": "byte", "data.seq_len": 32, "data.split": "95,5,0",
        "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 64,
        "train.max_steps": 6, "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.lr": 1e-2,
        "train.min_lr": 1e-3, "train.warmup_steps": 1, "train.log_interval": 1, "train.eval_interval": 3,
        "train.eval_iters": 2, "checkpoint.dir": ckpt, "checkpoint.interval": 3, "logging.tensorboard": False,
        "logging.peak_tflops": 1.0,
    }
    sets.update(over)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]


def set_args(sets: list[str]) -> list[str]:
    """small_sets() as command-line arguments: ['a.b=1', ...] -> ['--set', 'a.b=1', ...]."""
    return [arg for s in sets for arg in ("--set", s)]


def losses(ckpt: str, kind: str = "train", key: str | None = None) -> dict[int, float]:
    """Step -> the train (or eval) loss of a run's metrics.jsonl; `key` another train column (grad_norm)."""
    rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
    key = key or ("loss" if kind == "train" else "val_loss")
    out = {}
    for r in rows:  # a resumed run appends: the later row for a step wins
        if r.get("kind", "train") == kind and key in r:
            out[r["step"]] = r[key]
    return out


def run_configs(rank, world, runs):
    """In a spawned rank: train each run in turn in this one process group: a list of --set strings on the tiny
    preset, or (preset, sets) with preset None for no config file."""
    from megatrain.config import load_config
    from megatrain.pretrain import run

    for item in runs:
        preset, sets = item if isinstance(item, tuple) else ("tiny", item)
        run(load_config(preset, sets))


def assert_close_curves(a: dict, b: dict, rtol: float, steps=None):
    """b's values within rtol of a's at `steps` (default: every step of a). Fails when there is nothing to compare
    (an empty curve, no steps), when b lacks a step, and on a NaN or inf on either side: two runs that both diverged
    do not match, and an empty comparison proves nothing."""
    steps = sorted(a) if steps is None else list(steps)
    assert steps, f"nothing to compare: no steps (reference curve {a!r})"
    missing = [s for s in steps if s not in a or s not in b]
    assert not missing, f"steps {missing} missing from a curve: {a!r} vs {b!r}"
    got = np.array([b[s] for s in steps], dtype=np.float64)
    want = np.array([a[s] for s in steps], dtype=np.float64)
    bad = [s for s, x, y in zip(steps, want, got) if not (np.isfinite(x) and np.isfinite(y))]
    assert not bad, f"not finite at steps {bad}: {a!r} vs {b!r}"
    np.testing.assert_allclose(got, want, rtol=rtol, err_msg=f"steps {steps}")


# A local multiple-choice lm-eval task over a jsonl file {question, choices, answer} (format with data=PATH).
LM_EVAL_CHOICE_TASK = """task: mt_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""
