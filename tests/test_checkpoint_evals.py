"""Evaluation beside the validation loss (training/checkpoint_evals.py): train.eval_sets logged as val_loss/NAME, and
train.eval_tasks's lm-eval scores of each saved checkpoint, from a background process, at that checkpoint's step."""
import json
import os
import subprocess
import sys

import pytest

from distributed import run_distributed
from training_utils import LM_EVAL_CHOICE_TASK, losses, make_byte_dataset, run_configs, small_sets

from megatrain.config import ConfigError, load_config
from megatrain.training.checkpoint_evals import scores


@pytest.mark.parametrize("sets,says", [
    (["train.eval_sets={a/b: data/x}"], "'a/b' is not a name to log val_loss/NAME under"),
    (["train.eval_sets=[data/x]"], "expected a mapping of NAME: PATH"),
    (["train.eval_sets={web: data/x}", "train.eval_interval=0"], "which is 0 (never); set train.eval_interval"),
    (["train.eval_tasks_limit=1.5"], "1.5 is neither a count of examples"),
    (["train.eval_tasks=hellaswag", "model.objective=mlm"], "lm-eval scores causal language models"),
])
def test_bad_evaluation_keys_are_refused_in_one_line(sets, says):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", sets)
    assert says in str(e.value)


def test_lm_evals_results_become_one_scalar_per_task_and_metric():
    results = {"mt_choice": {"alias": "mt_choice", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25},
               "mt_generate": {"exact_match,none": 1, "bad,none": True}}
    assert scores(results) == {"lm_eval/mt_choice/acc": 0.5, "lm_eval/mt_choice/acc_norm": 0.25,
                               "lm_eval/mt_generate/exact_match": 1.0}


def _other_dataset(tmp_path) -> str:
    from conftest import make_documents, write_jsonl

    from megatrain.data.preprocess import preprocess

    prefix = str(tmp_path / "other" / "tiny")
    os.makedirs(tmp_path / "other")
    preprocess([write_jsonl(tmp_path / "other" / "c.jsonl", make_documents(300, seed=7, max_words=60))], "byte", prefix,
               append_eod=True)
    return prefix


@pytest.mark.timeout(600)
def test_each_eval_set_is_logged_under_its_name_and_the_training_data_gives_the_validation_loss(tmp_path):
    """eval_sets {same: data.path, other: another dataset}: at every evaluation val_loss/same equals val_loss (the same
    validation windows), val_loss/other is its own; `megatrain plot` draws both by default."""
    data, other = make_byte_dataset(tmp_path), _other_dataset(tmp_path)
    ck = str(tmp_path / "ck")
    over = {"train.max_steps": 4, "train.eval_interval": 2, "checkpoint.interval": 0,
            "train.eval_sets": {"same": data, "other": other}}
    run_distributed(run_configs, 1, [small_sets(data, ck, **over)], timeout=300)
    val, same, other_loss = losses(ck, "eval"), losses(ck, "eval", "val_loss/same"), losses(ck, "eval", "val_loss/other")
    assert sorted(val) == sorted(same) == sorted(other_loss) == [2, 4]
    assert all(same[s] == val[s] and other_loss[s] != val[s] for s in val)
    from megatrain.plot import plot

    drawn = plot([ck], output=str(tmp_path / "curves.png"))
    assert {"val_loss/same", "val_loss/other"} <= set(drawn)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_checkpoint_is_scored_by_lm_eval_in_the_background_at_its_step(tmp_path):
    """train.eval_tasks with a local multiple-choice task: the checkpoints of steps 3 and 6 are scored while training
    goes on (or at its end); metrics.jsonl holds lm_eval/mt_choice/acc at steps 3 and 6, the numbers `megatrain
    lm-eval` gives on those checkpoints; `megatrain plot` draws them."""
    pytest.importorskip("lm_eval")
    data = make_byte_dataset(tmp_path)
    with open(tmp_path / "choice.jsonl", "w") as f:
        for i, word in enumerate(["fox", "king", "horse", "queen", "cat", "dog"]):
            f.write(json.dumps({"question": f"the {word} was", "choices": [" quick", " lazy", " brown"],
                                "answer": i % 3}) + "\n")
    os.makedirs(tmp_path / "tasks")
    (tmp_path / "tasks" / "mt_choice.yaml").write_text(LM_EVAL_CHOICE_TASK.format(data=tmp_path / "choice.jsonl"))
    ck = str(tmp_path / "ck")
    over = {"train.max_steps": 6, "train.eval_interval": 0, "checkpoint.interval": 3, "train.eval_tasks": "mt_choice",
            "train.eval_tasks_include": str(tmp_path / "tasks")}
    run_distributed(run_configs, 1, [small_sets(data, ck, **over)], timeout=600)
    acc = losses(ck, "eval", "lm_eval/mt_choice/acc")
    assert sorted(acc) == [3, 6], acc
    for step in (3, 6):
        out = tmp_path / f"by_hand_{step}.json"
        r = subprocess.run([sys.executable, "-m", "megatrain.cli", "lm-eval", "--checkpoint", ck, "--tag",
                            f"step{step:08d}", "--tasks", "mt_choice", "--include-path", str(tmp_path / "tasks"),
                            "--output", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert scores(json.loads(out.read_text()))["lm_eval/mt_choice/acc"] == acc[step]
    from megatrain.plot import plot

    drawn = plot([ck], output=str(tmp_path / "curves.png"))
    assert drawn["lm_eval/mt_choice/acc"][ck]["steps"] == [3, 6]
