"""Slow tier: every Hugging Face family trains as megatrain's own model does. Tiny random models of transformers'
classes (test_hf_families.tiny_hf) with a byte-level tokenizer: imported at tp=1 and tp=2, each trains 3 steps with
the same losses; a LoRA fine-tune (classify and sft) straight from each family's folder under TP=2 x ZeRO-2 equals one
rank; lm-eval on the import gives the numbers of lm-eval's own `hf` model on its export."""
import json

import pytest

from distributed import run_distributed
from test_finetune import finetune_runs, ft_sets, sentiment, write
from test_hf_families import tiny_hf
from test_lmeval import TASKS
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets

# one case a family (Llama with llama3 RoPE scaling; the windowed ones with a window shorter than the sequence)
FAMILIES = ["llama-llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"]
VOCAB = dict(vocab_size=320, bos_token_id=258, eos_token_id=256, pad_token_id=257)  # the byte tokenizer's ids


def gap(a: dict, b: dict) -> float:
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in a)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: (its Hugging Face folder with a byte-level tokenizer, its from-hf import at tp=1, at tp=2)}."""
    from megatrain.convert.hf import from_hf
    from megatrain.data import build_tokenizer
    from megatrain.data.tokenizer import save_hf_tokenizer

    tmp = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        src = tiny_hf(name, str(tmp / name), **VOCAB)
        save_hf_tokenizer(build_tokenizer("byte"), src)
        one, two = str(tmp / f"{name}-tp1"), str(tmp / f"{name}-tp2")
        assert from_hf(src, one, [], 1) == 0  # with the parity check (logits and greedy tokens against transformers)
        assert from_hf(src, two, ["parallel.tp=2"], 2, verify=False) == 0  # the same weights, cut for tp=2
        out[name] = (src, one, two)
    return out


@pytest.mark.slow
def test_each_family_imported_at_tp1_and_tp2_trains_with_the_same_losses(families, tmp_path):
    data = make_byte_dataset(tmp_path)

    def sets(name: str, tp: int) -> list[str]:
        over = {"train.max_steps": 3, "checkpoint.interval": 0, "train.eval_interval": 3, "train.lr": 3e-3,
                "parallel.tp": tp, "checkpoint.init": families[name][tp]}
        return [s for s in small_sets(data, str(tmp_path / f"{name}-{tp}"), **over)
                if not s.startswith(("model.", "data.tokenizer"))]  # shape and tokenizer: the import's

    run_distributed(run_configs, 1, [(None, sets(n, 1)) for n in FAMILIES], timeout=900)
    run_distributed(run_configs, 2, [(None, sets(n, 2)) for n in FAMILIES], timeout=900)
    for name in FAMILIES:
        one, two = str(tmp_path / f"{name}-1"), str(tmp_path / f"{name}-2")
        assert len(losses(one)) == 3
        print(f"{name}: losses tp=1 {losses(one)}, largest relative gap at tp=2 {gap(losses(one), losses(two)):.1e}")
        assert_close_curves(losses(one), losses(two), rtol=1e-5)
        assert_close_curves(losses(one, "eval"), losses(two, "eval"), rtol=1e-5)


@pytest.mark.slow
def test_lora_from_each_familys_folder_under_tp2_zero2_equals_one_rank(families, tmp_path):
    """finetune.init = the Hugging Face folder itself (read through from-hf's maps): LoRA on classify and sft."""
    files = {"classify": write(tmp_path / "c.jsonl", sentiment(32, 0)),
             "sft": write(tmp_path / "s.jsonl", [{"prompt": f"add {i % 7} and {i % 5}", "response": str(i % 7 + i % 5)}
                                                 for i in range(32)])}
    lora = {"finetune.lora_rank": 4, "finetune.lora_alpha": 8.0, "train.max_steps": 4, "train.eval_interval": 2,
            "checkpoint.interval": 0, "finetune.max_seq_len": 48}

    def runs(world: int) -> list:
        over = {**lora, **({"parallel.tp": 2, "parallel.zero_stage": 2} if world == 4 else {})}
        return [(f"finetune-{task}", ft_sets(families[name][0], str(tmp_path / f"{name}-{task}-{world}"), f, f, **over))
                for name in FAMILIES for task, f in files.items()]

    run_distributed(finetune_runs, 1, runs(1), timeout=900)
    run_distributed(finetune_runs, 4, runs(4), timeout=1200)
    for name in FAMILIES:
        for task in files:
            one, four = (str(tmp_path / f"{name}-{task}-{w}") for w in (1, 4))
            assert len(losses(one)) == 4
            print(f"{name} {task}: losses {losses(one)}, largest relative gap at 4 ranks "
                  f"{gap(losses(one), losses(four)):.1e}")
            assert_close_curves(losses(one), losses(four), rtol=1e-5)
            assert_close_curves(losses(one, "eval"), losses(four, "eval"), rtol=1e-5)


@pytest.mark.slow
def test_lm_eval_on_each_import_equals_lm_evals_hf_model_on_its_export(families, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from lm_eval.tasks import TaskManager

    from megatrain.convert.hf import to_hf
    from megatrain.lmeval import MegatrainLM, evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"question": f"the {w} was", "choices": [" quick", " lazy dog", " brown"], "answer": i % 3,
             "text": f"the {w} jumps over a lazy dog near river stone"} for i, w in enumerate(["fox", "king", "horse"])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks, tasks_dir = ["mt_choice", "mt_rolling"], tmp_path / "tasks"
    tasks_dir.mkdir()
    for task in tasks:
        (tasks_dir / f"{task}.yaml").write_text(TASKS[task].format(data=str(data)))
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # built once: only the local tasks
    for name in FAMILIES:
        export = str(tmp_path / f"{name}-hf")
        assert to_hf(families[name][1], export, verify=False) == 0
        ours = evaluate(MegatrainLM(families[name][1], batch_size=4), tasks, manager=manager)
        theirs = evaluate(HFLM(pretrained=export, batch_size=4, device="cpu"), tasks, manager=manager)
        compared = 0
        for task in tasks:
            for key, value in theirs[task].items():
                if isinstance(value, float) and "stderr" not in key:
                    assert ours[task][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (name, task, key)
                    compared += 1
        assert compared >= 4, (name, theirs)


@pytest.mark.slow
def test_the_docs_end_to_end_example_runs(tmp_path):
    """docs/checkpoints.md's "Every family, end to end" block, run as written for one family (Gemma 3, the one with
    the most features): make the folder, import, fine-tune, export, load with transformers."""
    import os
    import re
    import subprocess
    import sys

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "checkpoints.md")).read()
    section = page[page.index("### Every family, end to end"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    loop = "for family in llama qwen2 qwen3 gemma3 phi3 olmo2 mixtral qwen2_moe qwen3_moe olmoe; do"
    assert loop in block
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", "-e", "-c", block.replace(loop, "for family in gemma3; do")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("(same)") == 2 and r.stdout.strip().endswith("Gemma3ForCausalLM"), r.stdout[-2000:]
