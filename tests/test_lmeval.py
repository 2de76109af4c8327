"""lm-evaluation-harness on a megatrain checkpoint: the same numbers as lm-eval's own `hf` model on the checkpoint's
`convert to-hf` export, for each kind of request (loglikelihood, loglikelihood_rolling, generate_until), on local
task YAMLs over local jsonl (no download)."""
import json
import os

import pytest

from test_convert import cli, trained  # noqa: F401  (the module-scoped trained checkpoint)
from training_utils import LM_EVAL_CHOICE_TASK

lm_eval = pytest.importorskip("lm_eval")

TASKS = {
    "mt_choice": LM_EVAL_CHOICE_TASK,
    "mt_rolling": """task: mt_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""",
    "mt_generate": """task: mt_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 12, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
}


@pytest.mark.slow
def test_megatrain_lm_gives_the_numbers_of_lm_evals_hf_model_on_the_export(trained, tmp_path, monkeypatch):  # noqa: F811
    from lm_eval.models.huggingface import HFLM

    from megatrain.lmeval import MegatrainLM, evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, ck = trained
    hf_dir = str(tmp_path / "hf")
    assert cli("convert", "to-hf", ck, "--output", hf_dir).returncode == 0
    rows = [{"question": f"the {w} was", "choices": [" quick", " lazy dog", " brown"], "answer": i % 3,
             "text": f"the {w} jumps over a lazy dog near river stone", "target": " near"}
            for i, w in enumerate(["fox", "king", "horse", "queen", "castle", "sword"])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    for name, text in TASKS.items():
        (tasks_dir / f"{name}.yaml").write_text(text.format(data=str(data)))
    ours = evaluate(MegatrainLM(ck, batch_size=4), list(TASKS), str(tasks_dir))
    theirs = evaluate(HFLM(pretrained=hf_dir, batch_size=4, device="cpu"), list(TASKS), str(tasks_dir))
    compared = 0
    for task in TASKS:
        for key, value in theirs[task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours[task][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, key)
                compared += 1
    assert compared >= 6
    # the command line prints the table
    r = cli("lm-eval", "--checkpoint", ck, "--tasks", "mt_choice", "--include-path", str(tasks_dir),
            "--output", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("mt_choice: acc") and os.path.isfile(tmp_path / "r.json")
    bad = cli("lm-eval", "--checkpoint", ck, "--tasks", "no_such_task", "--include-path", str(tasks_dir))
    assert bad.returncode == 1 and "no lm-eval task named 'no_such_task'" in bad.stderr.strip().splitlines()[-1]
