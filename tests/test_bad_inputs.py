"""Bad input never ends in a traceback: a table of broken files, values and commands, as a new user would try them.
Each must exit 1 with exactly one line `megatrain CMD: error: ...` that names the file or key, and leave no output
behind (README "Failures and recovery")."""
import gzip
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from cli_server import CliServer
from training_utils import LM_EVAL_CHOICE_TASK, make_byte_dataset, set_args, small_sets


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A byte-level dataset, a 2-step checkpoint, a jsonl corpus, files broken in every way the table needs."""
    w = tmp_path_factory.mktemp("bad")
    data = make_byte_dataset(w)
    ck = str(w / "ck")
    r = subprocess.run([sys.executable, "-m", "megatrain.cli", "pretrain", "--config", "tiny",
                        *set_args(small_sets(data, ck, **{"train.max_steps": 2, "train.eval_interval": 0,
                                                           "checkpoint.interval": 0}))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (w / "good.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(50)))
    (w / "empty.jsonl").write_text("")
    (w / "all_blank.jsonl").write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    (w / "latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 5)
    (w / "not_json.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with gzip.open(w / "full.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": f"doc {i} " * 40}) + "\n" for i in range(200)))
    raw = (w / "full.jsonl.gz").read_bytes()
    (w / "truncated.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    shutil.copy(w / "good.jsonl", w / "plain_named.jsonl.gz")
    for name in ("trunc", "badidx", "badmeta", "dtype"):
        for ext in ("bin", "idx", "meta.json"):
            shutil.copy(f"{data}.{ext}", w / f"{name}.{ext}")
    with open(w / "trunc.bin", "r+b") as f:
        f.truncate(os.path.getsize(w / "trunc.bin") // 2)
    with open(w / "badidx.idx", "r+b") as f:
        f.write(b"NOTANIDX")
    (w / "badmeta.meta.json").write_text("{not json")
    idx = bytearray((w / "dtype.idx").read_bytes())
    (w / "dtype.idx").write_bytes(bytes(idx))
    bad_ck = w / "bad_latest"
    shutil.copytree(ck, bad_ck)
    (bad_ck / "latest").write_text("step00000099")
    bad_state = w / "bad_state"
    shutil.copytree(ck, bad_state)
    (bad_state / "step00000002" / "megatrain.json").write_text("{oops")
    trunc_ck = w / "trunc_ck"
    shutil.copytree(ck, trunc_ck)
    for f in (trunc_ck / "step00000002").iterdir():
        if f.name.endswith("model_states.pt"):
            f.write_bytes(f.read_bytes()[:100])
    (w / "hosts_bad").write_text("node1 slots=two\n")
    (w / "hosts_dup").write_text("node1 slots=1\nnode1 slots=1\n")
    (w / "hosts_ok").write_text("node1 slots=1\nnode2 slots=1\n")
    (w / "dup_key.yaml").write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    (w / "null_section.yaml").write_text("?\n")  # a mapping whose key is null (found by the long fuzz run)
    (w / "not_a_dir").write_text("x")
    # a dataset made with a 400-piece sentencepiece tokenizer (pretrained with data.tokenizer=byte: refused)
    for argv in (["train-tokenizer", "--input", str(w / "data" / "c.jsonl"), "--vocab-size", "400", "--output", str(w / "sp")],
                 ["preprocess", "--input", str(w / "good.jsonl"), "--tokenizer", f"sp:{w}/sp/tokenizer.model",
                  "--output-prefix", str(w / "sp_data")]):
        r = subprocess.run([sys.executable, "-m", "megatrain.cli", *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    return dict(w=str(w), data=data, ck=ck)


@pytest.fixture(scope="module")
def cli():
    """Every case's command forked from one process that imported torch and DeepSpeed once (tests/cli_server.py)."""
    with CliServer() as server:
        yield server


def _run(argv: list[str], world: dict, cli: CliServer) -> subprocess.CompletedProcess:
    return cli.run([a.format(**world) for a in argv], cwd=world["w"], timeout=300)


def pretrain(*sets, out="{w}/out_run"):
    """The fixture's small run (its checkpoint's shape), with these --set values last."""
    base = small_sets("{data}", out, **{"train.max_steps": 2, "train.eval_interval": 0})
    return ["pretrain", "--config", "tiny", *set_args(base), *[a for s in sets for a in ("--set", s)]]


# (id, argv, text the error line must contain, a path that must not exist afterwards or None)
CASES = [
    # preprocess
    ("empty jsonl", ["preprocess", "--input", "{w}/empty.jsonl", "--tokenizer", "byte", "--output-prefix", "{w}/o1"],
     "empty.jsonl", "{w}/o1.bin"),
    ("every document empty", ["preprocess", "--input", "{w}/all_blank.jsonl", "--tokenizer", "byte", "--output-prefix",
                              "{w}/o2"], "no document", "{w}/o2.bin"),
    ("truncated gzip", ["preprocess", "--input", "{w}/truncated.jsonl.gz", "--tokenizer", "byte", "--output-prefix",
                        "{w}/o3"], "truncated.jsonl.gz", "{w}/o3.bin"),
    ("plain text named .gz", ["preprocess", "--input", "{w}/plain_named.jsonl.gz", "--tokenizer", "byte",
                              "--output-prefix", "{w}/o4"], "plain_named.jsonl.gz", "{w}/o4.bin"),
    ("malformed jsonl line", ["preprocess", "--input", "{w}/not_json.jsonl", "--tokenizer", "byte", "--output-prefix",
                              "{w}/o5"], "not_json.jsonl:2", "{w}/o5.bin"),
    ("missing input", ["preprocess", "--input", "{w}/nope.jsonl", "--tokenizer", "byte", "--output-prefix", "{w}/o6"],
     "nope.jsonl", "{w}/o6.bin"),
    ("output prefix is a directory", ["preprocess", "--input", "{w}/good.jsonl", "--tokenizer", "byte", "--output-prefix",
                                      "{w}/dir_prefix/"], "--output-prefix", "{w}/dir_prefix/.bin"),
    ("unknown tokenizer spec", ["preprocess", "--input", "{w}/good.jsonl", "--tokenizer", "bogus:x", "--output-prefix",
                                "{w}/o7"], "bogus", "{w}/o7.bin"),
    ("missing json key", ["preprocess", "--input", "{w}/good.jsonl", "--tokenizer", "byte", "--json-key", "body",
                          "--output-prefix", "{w}/o8"], "body", "{w}/o8.bin"),
    ("workers 0", ["preprocess", "--input", "{w}/good.jsonl", "--tokenizer", "byte", "--workers", "0",
                   "--output-prefix", "{w}/o9"], "--workers", "{w}/o9.bin"),
    # data-info
    ("data-info truncated .bin", ["data-info", "{w}/trunc"], "trunc", None),
    ("data-info corrupt .idx", ["data-info", "{w}/badidx"], "badidx.idx", None),
    ("data-info invalid meta.json", ["data-info", "{w}/badmeta"], "badmeta.meta.json", None),
    ("data-info missing", ["data-info", "{w}/nothing"], "nothing", None),
    ("data-info document out of range", ["data-info", "{data}", "--doc", "100000"], "--doc 100000", None),
    # train-tokenizer
    ("train-tokenizer empty file", ["train-tokenizer", "--input", "{w}/empty.jsonl", "--vocab-size", "300", "--output",
                                    "{w}/tok1"], "empty.jsonl", "{w}/tok1"),
    ("train-tokenizer vocab 0", ["train-tokenizer", "--input", "{w}/good.jsonl", "--vocab-size", "0", "--output",
                                 "{w}/tok2"], "--vocab-size", "{w}/tok2"),
    # pretrain: config
    ("unknown key", pretrain("train.max_step=5", out="{w}/run1"), "train.max_step", "{w}/run1"),
    ("mistyped value", pretrain("train.lr=fast", out="{w}/run2"), "train.lr", "{w}/run2"),
    ("negative lr", pretrain("train.lr=-1", out="{w}/run3"), "train.lr", "{w}/run3"),
    ("split not numbers", pretrain("data.split=abc", out="{w}/run4"), "data.split", "{w}/run4"),
    ("negative checkpoint interval", pretrain("checkpoint.interval=-5", out="{w}/run5"), "checkpoint.interval", "{w}/run5"),
    ("negative keep_last", pretrain("checkpoint.keep_last=-1", out="{w}/run6"), "checkpoint.keep_last", "{w}/run6"),
    ("impossible layout", pretrain("parallel.tp=3", out="{w}/run7"), "parallel.tp", "{w}/run7"),
    ("zero stage 5", pretrain("parallel.zero_stage=5", out="{w}/run8"), "parallel.zero_stage", "{w}/run8"),
    ("YAML key given twice", ["pretrain", "--config", "{w}/dup_key.yaml"], "lr", "{w}/runs"),
    ("YAML section named null", ["pretrain", "--config", "{w}/null_section.yaml"], "not a section name", "{w}/runs"),
    ("missing config file", ["pretrain", "--config", "{w}/nope.yaml"], "nope.yaml", "{w}/runs"),
    ("missing data", pretrain("data.path={w}/nothing", out="{w}/run9"), "data.path", "{w}/run9"),
    ("truncated .bin", pretrain("data.path={w}/trunc", out="{w}/run10"), "trunc", "{w}/run10"),
    ("corrupt .idx", pretrain("data.path={w}/badidx", out="{w}/run11"), "badidx.idx", "{w}/run11"),
    ("negative blend weight", pretrain("data.path=[-0.5, {data}, 1.5, {data}]", out="{w}/run12"), "weight", "{w}/run12"),
    ("vocabulary smaller than the tokenizer's", pretrain("model.vocab_size=128", out="{w}/run13"), "model.vocab_size",
     "{w}/run13"),
    ("data of another tokenizer", pretrain("data.path={w}/sp_data", out="{w}/run19"), "data.tokenizer", "{w}/run19"),
    ("checkpoint.dir is a file", pretrain("checkpoint.dir={w}/not_a_dir", out="{w}/run14"), "not_a_dir", None),
    ("latest names a missing step", pretrain("checkpoint.dir={w}/bad_latest", out="{w}/run15"), "step00000099", None),
    ("invalid step megatrain.json", pretrain("checkpoint.dir={w}/bad_state", out="{w}/run16"), "megatrain.json", None),
    ("truncated rank file on resume", pretrain("checkpoint.dir={w}/trunc_ck", out="{w}/run17"), "model_states.pt", None),
    ("checkpoint of another model", pretrain("checkpoint.dir={ck}", "model.n_layers=3", out="{w}/run18"), "model.n_layers", None),
    # generate
    ("generate missing checkpoint", ["generate", "--checkpoint", "{w}/nothing"], "nothing", None),
    ("generate top-k negative", ["generate", "--checkpoint", "{ck}", "--top-k", "-5"], "--top-k", None),
    ("generate no samples", ["generate", "--checkpoint", "{ck}", "--num-samples", "0"], "--num-samples", None),
    ("generate negative length", ["generate", "--checkpoint", "{ck}", "--max-new-tokens", "-1"], "--max-new-tokens", None),
    ("generate negative temperature", ["generate", "--checkpoint", "{ck}", "--temperature", "-1"], "--temperature", None),
    ("serve missing checkpoint", ["serve", "--checkpoint", "{w}/nothing", "--port", "0"], "nothing", None),
    ("serve no slots", ["serve", "--checkpoint", "{ck}", "--slots", "0"], "--slots", None),
    ("serve bad port", ["serve", "--checkpoint", "{ck}", "--port", "70000"], "--port 70000", None),
    ("generate truncated rank file", ["generate", "--checkpoint", "{w}/trunc_ck"], "model_states.pt", None),
    ("generate invalid megatrain.json", ["generate", "--checkpoint", "{w}/bad_state"], "megatrain.json", None),
    # hostfile, launch
    ("hostfile bad slots", ["hostfile", "--nodes", "node[1-2", "--output", "{w}/hf_out"], "node[1-2", "{w}/hf_out"),
    ("launch bad hostfile", ["launch", "--hostfile", "{w}/hosts_bad", "pretrain"], "hosts_bad", None),
    ("launch duplicate host", ["launch", "--hostfile", "{w}/hosts_dup", "pretrain"], "node1", None),
    ("launch port out of range", ["launch", "--hostfile", "{w}/hosts_ok", "--master-port", "70000", "pretrain"],
     "--master-port", None),
    # convert
    ("convert missing checkpoint", ["convert", "consolidate", "{w}/nothing", "--output", "{w}/cons"], "nothing",
     "{w}/cons"),
]


# Cases that train a few steps of the fixture's model first (8-9 s each): the slow tier, which CI also runs.
SLOW_CASES = {"checkpoint of another model", "invalid step megatrain.json", "latest names a missing step",
              "truncated rank file on resume", "vocabulary smaller than the tokenizer's"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_CASES else [])
                                  for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(world, cli, case):
    assert_refused(case, world, cli)


def assert_refused(case: tuple, world: dict, cli: CliServer) -> None:
    """The case's command exits 1 with one line `megatrain CMD: error: ...` holding `must_name`, no traceback, and
    leaves nothing at `leftover`."""
    name, argv, must_name, leftover = case
    r = _run(argv, world, cli)
    command = argv[0]
    lines = [x for x in r.stderr.splitlines() if x.startswith(f"megatrain {command}: error:")]
    assert r.returncode == 1, f"{name}: exit {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-2500:]}"
    assert "Traceback" not in r.stderr, f"{name}:\n{r.stderr[-2500:]}"
    assert len(lines) == 1, f"{name}:\n{r.stderr[-2500:]}"
    assert must_name.format(**world) in lines[0], f"{name}: {lines[0]}"
    if leftover:
        assert not os.path.exists(leftover.format(**world)), f"{name}: left {leftover}"


def test_built_in_errors_are_not_taken_for_user_errors():
    """A bug that raises IndexError or FileNotFoundError shows its traceback; bad input raises a typed error."""
    from megatrain.cli import user_error_types

    assert not {IndexError, FileNotFoundError, KeyError, OSError} & set(user_error_types())


# -- fine-tuning: wrong targets, a run pointed at the wrong folder ------------------------------------------------
# (cases, their fixture and their test below this line)


def finetune(config: str, out: str, *sets: str, train: str = "{w}/ft_cls.jsonl") -> list[str]:
    """A 2-step fine-tune of the fixture's checkpoint ({ck}: 2 blocks, max_seq_len 64) into `out`, these --set last."""
    base = {"finetune.init": "{ck}", "finetune.train_file": train, "checkpoint.dir": out, "finetune.epochs": "0",
            "train.max_steps": "2", "train.global_batch_size": "4", "train.micro_batch_size": "2",
            "train.warmup_steps": "1", "train.eval_interval": "0", "train.log_interval": "1",
            "checkpoint.interval": "0", "logging.tensorboard": "false", "logging.peak_tflops": "1.0",
            "finetune.doc_stride": "16"}  # qa: below the 31-token window of a 64-token row
    return ["finetune", "--config", config, *set_args([f"{k}={v}" for k, v in base.items()]),
            *[a for s in sets for a in ("--set", s)]]


def qa_row(i: int, context_words: int = 8, **answers) -> dict:
    context = "Paris is where " + " ".join(["it", "was", "the"][j % 3] for j in range(context_words))
    return {"id": str(i), "question": "where?", "context": context, **answers}


@pytest.fixture(scope="module")
def ft_world(world):
    """QA files whose answers are missing or misshapen, a classify training file and a copy of the fixture's
    pretraining run, to be named as checkpoint.dir."""
    w = world["w"]

    def write(name: str, rows: list[dict]) -> None:
        with open(os.path.join(w, name), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    ok = {"answers": {"text": ["Paris"], "answer_start": [0]}}
    write("ft_qa_long.jsonl", [qa_row(i, 100, **ok) for i in range(8)])  # 380 context tokens each: 9 windows of 57
    write("ft_qa_noanswers.jsonl", [qa_row(0, **ok), qa_row(1)])
    write("ft_qa_misspelt.jsonl", [qa_row(0, answer={"text": ["Paris"], "answer_start": [0]})])
    write("ft_qa_answer_strings.jsonl", [qa_row(0, answers=["Paris"])])
    write("ft_cls.jsonl", [{"text": f"{w_} film {i}", "label": w_} for i, w_ in enumerate(["good", "bad"] * 8)])
    write("ft_sft.jsonl", [{"prompt": f"say {x}", "response": x} for x in ["alpha", "beta", "gamma", "delta"] * 4])
    shutil.copytree(world["ck"], os.path.join(w, "ft_pretrain_run"))
    return world


@pytest.fixture(scope="module")
def sft_world(ft_world, cli):
    """ft_world and a 2-step sft fine-tune of {ck} in {w}/ft_sft_run (~10 s: the slow tier's)."""
    r = _run(finetune("finetune-sft", "{w}/ft_sft_run", train="{w}/ft_sft.jsonl"), ft_world, cli)
    assert r.returncode == 0, r.stderr[-2000:]
    return ft_world


FINETUNE_CASES = [
    # qa: targets that are not there must not train as "no answer"
    ("qa row without answers", finetune("finetune-qa", "{w}/ft1", train="{w}/ft_qa_noanswers.jsonl"),
     "ft_qa_noanswers.jsonl:2", "{w}/ft1"),
    ("qa answers key misspelt", finetune("finetune-qa", "{w}/ft2", train="{w}/ft_qa_misspelt.jsonl"),
     "ft_qa_misspelt.jsonl:1", "{w}/ft2"),
    ("qa answers a list of strings", finetune("finetune-qa", "{w}/ft3", train="{w}/ft_qa_answer_strings.jsonl"),
     "ft_qa_answer_strings.jsonl:1", "{w}/ft3"),
    # (64, the preset's default, is not below a 57-token window: windows 1 token apart, 2592 rows instead of 72)
    ("qa doc_stride at the window", finetune("finetune-qa", "{w}/ft4", "finetune.doc_stride=64",
                                             train="{w}/ft_qa_long.jsonl"), "finetune.doc_stride", "{w}/ft4"),
    # the model
    ("freeze more blocks than the model has", finetune("finetune-classify", "{w}/ft5", "finetune.freeze=blocks:3"),
     "blocks:3", "{w}/ft5"),
    ("finetune.max_seq_len above the model's", finetune("finetune-classify", "{w}/ft6", "finetune.max_seq_len=128"),
     "finetune.max_seq_len", "{w}/ft6"),
    ("finetune.max_seq_len above the model's, long rows",
     finetune("finetune-qa", "{w}/ft7", "finetune.max_seq_len=128", train="{w}/ft_qa_long.jsonl"),
     "finetune.max_seq_len", "{w}/ft7"),
    # checkpoint.dir holding another kind of run (at step 2: resumed wrongly, 2 more steps would save step 4)
    ("classify resuming a pretraining run", finetune("finetune-classify", "{w}/ft_pretrain_run", "train.max_steps=4"),
     "holds a pretraining run", "{w}/ft_pretrain_run/step00000004"),
    ("classify resuming an sft run", finetune("finetune-classify", "{w}/ft_sft_run", "train.max_steps=4"),
     "holds a finetune.task=sft run", "{w}/ft_sft_run/step00000004"),
    ("pretrain resuming an sft run", pretrain("train.max_steps=4", out="{w}/ft_sft_run"),
     "holds a finetune.task=sft run", "{w}/ft_sft_run/step00000004"),
]


# Cases that resume the sft run sft_world trains first: the slow tier
FINETUNE_SLOW = {"classify resuming an sft run", "pretrain resuming an sft run"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=[pytest.mark.slow] if c[0] in FINETUNE_SLOW else [])
                                  for c in FINETUNE_CASES])
def test_bad_finetune_input_is_one_line_and_leaves_nothing(request, cli, case):
    assert_refused(case, request.getfixturevalue("sft_world" if case[0] in FINETUNE_SLOW else "ft_world"), cli)


def test_qa_answers_read_in_either_shape_and_an_empty_list_is_no_answer(tmp_path):
    """jsonl answers as Hugging Face's {"text": [...], "answer_start": [...]} or as SQuAD JSON's list of objects read
    alike; empty lists are a question without an answer; a file to predict needs no answers at all."""
    from megatrain.data.task_files import read_squad

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        qa_row(0, answers={"text": ["Paris"], "answer_start": [0]}),
        qa_row(1, answers=[{"text": "Paris", "answer_start": 0}, {"text": "is", "answer_start": 6}]),
        qa_row(2, answers={"text": [], "answer_start": []}), qa_row(3, answers=[])]))
    got = [(ex.answers, ex.starts) for ex in read_squad(str(path))]
    assert got == [(["Paris"], [0]), (["Paris", "is"], [0, 6]), ([], []), ([], [])]
    path.write_text(json.dumps(qa_row(0)) + "\n")  # no "answers": refused to train on, read to predict
    assert [ex.answers for ex in read_squad(str(path), labeled=False)] == [[]]


def test_qa_windows_advance_by_the_window_less_doc_stride(tmp_path):
    """A valid finetune.doc_stride: a context of L tokens in windows of W sharing S tokens gives
    1 + ceil((L - W) / (W - S)) windows, consecutive ones overlapping by exactly S tokens, the last reaching the end."""
    from megatrain.config import load_config
    from megatrain.data import build_tokenizer
    from megatrain.tasks import finetune_task

    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(qa_row(0, 100, answers={"text": ["Paris"], "answer_start": [0]})) + "\n")
    context = qa_row(0, 100)["context"]
    cfg = load_config(None, ["model.max_seq_len=64", "data.seq_len=64", "finetune.task=qa", "finetune.doc_stride=16"])
    items = finetune_task(cfg, build_tokenizer("byte")).encode(str(path), train=False).items
    W = 64 - len("where?") - 1  # byte tokens: the question's bytes and a separator
    L = len(context.encode())
    assert len(items) == 1 + math.ceil((L - W) / (W - 16)) == 9
    firsts = [it["first"] for it in items]
    assert all(b - a == W - 16 for a, b in zip(firsts, firsts[1:])) and firsts[-1] + W >= L > firsts[-2] + W


# ----------------------------------------------------------------------------------------------------------------


# -- outputs: an output that is an input, an output path that cannot be written ---------------------------------
# (cases, their fixture and their test below this line)

# `{o}` holds every file these cases read; a case must leave it exactly as it was (nothing overwritten, nothing left).
# Outputs are checked before anything is read: `predict` refuses before it loads `{ck}` (not a fine-tuned model),
# `lm-eval` before its model and tasks.
OUTPUT_CASES = [
    # an output that is an input: refused before anything is read or written, the input left as it was
    ("predict output is its csv input", ["predict", "--checkpoint", "{ck}", "--input", "{o}/rows.csv", "--output",
                                         "{o}/rows.csv"], "the same file as --input", None),
    ("predict output is its jsonl input", ["predict", "--checkpoint", "{ck}", "--input", "{o}/rows.jsonl", "--output",
                                           "{o}/rows.jsonl"], "the same file as --input", None),
    ("predict output is its input spelt ./", ["predict", "--checkpoint", "{ck}", "--input", "outputs/rows.jsonl",
                                              "--output", "./outputs/rows.jsonl"], "the same file as --input", None),
    ("predict output is a link to its input", ["predict", "--checkpoint", "{ck}", "--input", "{o}/rows.jsonl",
                                               "--output", "{o}/link.jsonl"], "the same file as --input", None),
    ("predict output is the checkpoint's pointer", ["predict", "--checkpoint", "{copy}", "--input", "{o}/rows.jsonl",
                                                   "--output", "{copy}/latest"], "the checkpoint's pointer", None),
    ("preprocess writes over its input", ["preprocess", "--input", "{o}/corpus.meta.json", "--tokenizer", "byte",
                                          "--output-prefix", "{o}/corpus"], "the same file as --input",
     "{o}/corpus.bin"),
    ("consolidate over its input", ["convert", "consolidate", "{copy}", "--output", "{copy}", "--force"],
     "holds the checkpoint", None),
    ("consolidate over the folder of its input", ["convert", "consolidate", "{copy}/step00000002", "--output", "{copy}",
                                                  "--force"], "holds the checkpoint", None),
    ("reshard over its input", ["convert", "reshard", "{copy}", "--output", "{copy}", "--force"],
     "holds the checkpoint", None),
    ("to-hf over its input", ["convert", "to-hf", "{copy}", "--output", "{copy}", "--force"], "holds the checkpoint",
     None),
    ("from-hf over its input", ["convert", "from-hf", "{o}/hf", "--output", "{o}/hf", "--force"],
     "the same folder as HF_DIR", None),
    ("plot over the run's metrics", ["plot", "{copy}", "--output", "{copy}/metrics.jsonl"], "metrics.jsonl", None),
    ("lm-eval output is its task YAML", ["lm-eval", "--checkpoint", "{ck}", "--tasks", "mt_choice", "--include-path",
                                         "{o}/tasks", "--output", "{o}/tasks/mt_choice.yaml"], "--include-path", None),
    ("train-tokenizer output holds its input", ["train-tokenizer", "--input", "{o}/corpus_dir/c.jsonl", "--vocab-size",
                                                "300", "--output", "{o}/corpus_dir"], "holds --input", None),
    ("train-tokenizer output is a folder of other files", ["train-tokenizer", "--input", "{o}/rows.jsonl",
                                                           "--vocab-size", "300", "--output", "{o}/folder"],
     "{o}/folder", None),
    # an output path that cannot be written: one line naming the flag and the path, before any work
    ("predict output under /proc", ["predict", "--checkpoint", "{ck}", "--input", "{o}/rows.jsonl", "--output",
                                    "/proc/x.jsonl"], "--output /proc/x.jsonl", None),
    ("predict output is a folder", ["predict", "--checkpoint", "{ck}", "--input", "{o}/rows.jsonl", "--output",
                                    "{o}/folder"], "--output {o}/folder", None),
    ("predict output empty", ["predict", "--checkpoint", "{ck}", "--input", "{o}/rows.jsonl", "--output", ""],
     "--output ''", None),
    ("preprocess output under /proc", ["preprocess", "--input", "{o}/rows.jsonl", "--tokenizer", "byte",
                                       "--output-prefix", "/proc/x"], "/proc/x", None),
    ("preprocess output is a folder", ["preprocess", "--input", "{o}/rows.jsonl", "--tokenizer", "byte",
                                       "--output-prefix", "{o}/pfx"], "{o}/pfx.bin", "{o}/pfx.idx"),
    ("preprocess output empty", ["preprocess", "--input", "{o}/rows.jsonl", "--tokenizer", "byte", "--output-prefix",
                                 ""], "--output-prefix '': empty", "{w}/.bin"),
    ("hostfile output under /proc", ["hostfile", "--nodes", "a,b", "--output", "/proc/x"], "--output /proc/x", None),
    ("hostfile output is a folder", ["hostfile", "--nodes", "a,b", "--output", "{o}/folder"], "--output {o}/folder",
     None),
    ("hostfile output empty", ["hostfile", "--nodes", "a,b", "--output", ""], "--output ''", None),
    ("consolidate output under /proc", ["convert", "consolidate", "{ck}", "--output", "/proc/x"], "--output /proc/x",
     None),
    ("consolidate output is a folder", ["convert", "consolidate", "{ck}", "--output", "{o}/folder"],
     "--output {o}/folder", None),
    ("consolidate output is a file", ["convert", "consolidate", "{ck}", "--output", "{o}/rows.csv", "--force"],
     "--output {o}/rows.csv", None),
    ("consolidate output empty", ["convert", "consolidate", "{ck}", "--output", ""], "--output ''", None),
    ("plot output under /proc", ["plot", "{ck}", "--output", "/proc/x.png"], "--output /proc/x.png", None),
    ("plot output is a folder", ["plot", "{ck}", "--output", "{o}/folder"], "--output {o}/folder", None),
    ("plot output empty", ["plot", "{ck}", "--output", ""], "--output ''", None),
    ("plot output .txt", ["plot", "{ck}", "--output", "{o}/curves.txt"], ".png", "{o}/curves.txt"),
    ("lm-eval output under /proc", ["lm-eval", "--checkpoint", "{ck}", "--tasks", "mt_choice", "--include-path",
                                    "{o}/tasks", "--output", "/proc/x.json"], "--output /proc/x.json", None),
    ("lm-eval output is a folder", ["lm-eval", "--checkpoint", "{ck}", "--tasks", "mt_choice", "--include-path",
                                    "{o}/tasks", "--output", "{o}/folder"], "--output {o}/folder", None),
    ("lm-eval output empty", ["lm-eval", "--checkpoint", "{ck}", "--tasks", "mt_choice", "--include-path", "{o}/tasks",
                              "--output", ""], "--output ''", None),
    ("train-tokenizer output under /proc", ["train-tokenizer", "--input", "{o}/rows.jsonl", "--vocab-size", "300",
                                            "--output", "/proc/x"], "--output /proc/x", None),
    ("train-tokenizer output empty", ["train-tokenizer", "--input", "{o}/rows.jsonl", "--vocab-size", "300",
                                      "--output", ""], "--output ''", None),
]


@pytest.fixture(scope="module")
def out_world(world):
    """`{o}`: the files the cases read (a jsonl and a csv of labelled rows, a link to one, a copy of `{ck}` as
    `{copy}`, a local lm-eval task, a folder holding a file, a stand-in HF folder)."""
    o = os.path.join(world["w"], "outputs")
    os.makedirs(os.path.join(o, "folder"))
    with open(os.path.join(o, "folder", "notes.txt"), "w") as f:
        f.write("a user's file\n")
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film number {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(16)]
    with open(os.path.join(o, "rows.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with open(os.path.join(o, "rows.csv"), "w") as f:
        f.write("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    os.symlink("rows.jsonl", os.path.join(o, "link.jsonl"))
    shutil.copy(os.path.join(o, "rows.jsonl"), os.path.join(o, "corpus.meta.json"))  # jsonl by its .json name
    os.makedirs(os.path.join(o, "corpus_dir"))
    shutil.copy(os.path.join(o, "rows.jsonl"), os.path.join(o, "corpus_dir", "c.jsonl"))
    os.makedirs(os.path.join(o, "pfx.bin"))  # a folder where preprocess would write a file
    shutil.copytree(world["ck"], os.path.join(o, "copy"))
    os.makedirs(os.path.join(o, "hf"))
    with open(os.path.join(o, "hf", "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    os.makedirs(os.path.join(o, "tasks"))
    with open(os.path.join(o, "tasks", "choice.jsonl"), "w") as f:
        f.write("".join(json.dumps({"question": f"the {w} was", "choices": [" quick", " lazy"], "answer": 0}) + "\n"
                        for w in ("fox", "dog")))
    with open(os.path.join(o, "tasks", "mt_choice.yaml"), "w") as f:
        f.write("task: mt_choice\ndataset_path: json\n"
                f"dataset_kwargs: {{data_files: {{test: {o}/tasks/choice.jsonl}}}}\n"
                "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list: [{metric: acc}]\n")
    return dict(world, o=o, copy=os.path.join(o, "copy"))


def _snapshot(folder: str) -> dict:
    """Every file and link under `folder`: its bytes, or where the link points."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                out[p] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                out[p] = ("file", open(p, "rb").read())
            else:
                out[p] = ("folder", None)
    return out


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in OUTPUT_CASES])
def test_bad_output_is_one_line_and_touches_no_input(out_world, cli, case):
    before = _snapshot(out_world["o"])
    assert_refused(case, out_world, cli)
    assert _snapshot(out_world["o"]) == before, f"{case[0]}: changed or left files under {out_world['o']}"


def test_plot_writes_the_format_its_extension_names(out_world, cli, tmp_path):
    for name, magic in (("c.pdf", b"%PDF"), ("c.svg", b"<?xml"), ("c.PNG", b"\x89PNG")):
        r = _run(["plot", "{ck}", "--output", str(tmp_path / name)], out_world, cli)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (tmp_path / name).read_bytes().startswith(magic), name


# ----------------------------------------------------------------------------------------------------------------


# -- generate, predict, evaluate, data-info, lm-eval: mismatched tokenizers and tasks, numbers out of range ------
# (cases, their fixture and their test below this line)


def _cli_ok(cli: CliServer, argv: list[str], cwd: str) -> None:
    r = cli.run(argv, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def finetune_argv(config: str, init: str, train_file: str, out: str) -> list[str]:
    """A 2-step fine-tune of `init` (the fixture's tiny model)."""
    sets = {"finetune.init": init, "finetune.train_file": train_file, "checkpoint.dir": out, "train.max_steps": 2,
            "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.warmup_steps": 1,
            "train.eval_interval": 0, "checkpoint.interval": 0, "logging.tensorboard": False, "finetune.epochs": 0,
            "logging.peak_tflops": 1.0}
    return ["finetune", "--config", config, *set_args([f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                                       for k, v in sets.items()])]


@pytest.fixture(scope="module")
def inference_world(world, cli):
    """Beside the world: a 310-piece sentencepiece tokenizer (fewer pieces than {ck}'s 320 rows, more than its 260),
    a 400-piece one trained on another corpus (the size of {w}/sp, other pieces), classify and sft rows, and lm-eval
    task folders: one good, one with a YAML that does not parse."""
    from conftest import make_documents, write_jsonl

    w = os.path.join(world["w"], "inference")  # this section's files, apart from the other sections'
    os.makedirs(w)
    write_jsonl(os.path.join(w, "other_corpus.jsonl"), make_documents(400, seed=2, max_words=80))
    for size, corpus, out in ((310, f"{world['w']}/data/c.jsonl", "sp310"),
                              (400, f"{w}/other_corpus.jsonl", "sp_other")):
        _cli_ok(cli, ["train-tokenizer", "--input", corpus, "--vocab-size", str(size), "--output", f"{w}/{out}"], w)
    words = ["good", "bad", "film", "the", "was", "very"]
    with open(os.path.join(w, "labelled.jsonl"), "w") as f:
        for i in range(16):
            f.write(json.dumps({"text": " ".join(words[(i + k) % 6] for k in range(4)), "label": "ab"[i % 2]}) + "\n")
    with open(os.path.join(w, "chat.jsonl"), "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"add {i} and 1", "response": str(i + 1)}) + "\n")
    with open(os.path.join(w, "choice.jsonl"), "w") as f:
        for i, word in enumerate(["fox", "king", "horse", "queen"]):
            f.write(json.dumps({"question": f"the {word} was", "choices": [" quick", " lazy", " brown"],
                                "answer": i % 3}) + "\n")
    os.makedirs(os.path.join(w, "tasks"), exist_ok=True)
    with open(os.path.join(w, "tasks", "mt_choice.yaml"), "w") as f:
        f.write(LM_EVAL_CHOICE_TASK.format(data=os.path.join(w, "choice.jsonl")))
    os.makedirs(os.path.join(w, "broken_tasks"), exist_ok=True)
    with open(os.path.join(w, "broken_tasks", "mt_broken.yaml"), "w") as f:  # a brace left open on line 3
        f.write("task: mt_broken\ndataset_path: json\ndataset_kwargs: {data_files: {test: x.jsonl}\n"
                "output_type: multiple_choice\n")
    return dict(world, inf=w, sp310=f"{w}/sp310", sp_other=f"{w}/sp_other", labelled=f"{w}/labelled.jsonl",
                chat=f"{w}/chat.jsonl", tasks=f"{w}/tasks", broken_tasks=f"{w}/broken_tasks")


@pytest.fixture(scope="module")
def tuned_world(inference_world, cli):
    """2-step classify and sft fine-tunes of {ck}; {ck} exported to Hugging Face (hf), and a copy of the export
    without its tokenizer files (hf_notok)."""
    w = inference_world["inf"]
    _cli_ok(cli, finetune_argv("finetune-classify", inference_world["ck"], inference_world["labelled"], f"{w}/clf"), w)
    _cli_ok(cli, finetune_argv("finetune-sft", inference_world["ck"], inference_world["chat"], f"{w}/sft"), w)
    _cli_ok(cli, ["convert", "to-hf", inference_world["ck"], "--output", f"{w}/hf", "--no-verify"], w)
    os.makedirs(f"{w}/hf_notok")
    for name in os.listdir(f"{w}/hf"):
        if not name.startswith("tokenizer"):
            shutil.copy(f"{w}/hf/{name}", f"{w}/hf_notok/{name}")
    return dict(inference_world, clf=f"{w}/clf", sft=f"{w}/sft", hf=f"{w}/hf", hf_notok=f"{w}/hf_notok")


LM_EVAL = ["lm-eval", "--checkpoint", "{ck}", "--tasks", "mt_choice", "--include-path", "{tasks}"]

INFERENCE_CASES = [
    # a tokenizer of another vocabulary than the checkpoint's (or the dataset's)
    ("generate tokenizer of another size", ["generate", "--checkpoint", "{ck}", "--tokenizer", "{sp310}"],
     "--tokenizer {sp310}", None),
    ("data-info byte tokenizer on sentencepiece data", ["data-info", "{w}/sp_data", "--tokenizer", "byte"],
     "--tokenizer byte", None),
    ("data-info tokenizer of the same size, other pieces", ["data-info", "{w}/sp_data", "--tokenizer", "{sp_other}"],
     "other pieces", None),
    # a task's rows given to a checkpoint of another task
    ("predict sft model on classify rows", ["predict", "--checkpoint", "{sft}", "--input", "{labelled}", "--output",
                                            "{inf}/pred_sft.jsonl"], "finetune.task=sft", "{inf}/pred_sft.jsonl"),
    ("evaluate sft model on classify rows", ["evaluate", "--checkpoint", "{sft}", "--input", "{labelled}"],
     "finetune.task=sft", None),
    # numbers out of range
    ("evaluate batch size 0", ["evaluate", "--checkpoint", "{ck}", "--input", "{labelled}", "--batch-size", "0"],
     "--batch-size", None),
    ("generate past the context", ["generate", "--checkpoint", "{ck}", "--max-new-tokens", "1000"],
     "model.max_seq_len", None),
    ("predict past the context", ["predict", "--checkpoint", "{sft}", "--input", "{chat}", "--output",
                                  "{inf}/pred_long.jsonl", "--max-new-tokens", "1000"], "model.max_seq_len",
     "{inf}/pred_long.jsonl"),
    ("generate temperature inf", ["generate", "--checkpoint", "{ck}", "--temperature", "inf"], "--temperature inf",
     None),
    ("generate temperature nan", ["generate", "--checkpoint", "{ck}", "--temperature", "nan"], "--temperature nan",
     None),
    ("predict temperature inf", ["predict", "--checkpoint", "{ck}", "--input", "{chat}", "--output",
                                 "{inf}/pred_inf.jsonl", "--temperature", "inf"], "--temperature inf",
     "{inf}/pred_inf.jsonl"),
    ("lm-eval num-fewshot -1", [*LM_EVAL, "--num-fewshot", "-1"], "--num-fewshot", None),
    ("lm-eval limit 0", [*LM_EVAL, "--limit", "0"], "--limit", None),
    ("lm-eval limit -1", [*LM_EVAL, "--limit", "-1"], "--limit", None),
    ("lm-eval batch size 0", [*LM_EVAL, "--batch-size", "0"], "--batch-size", None),
    ("lm-eval no task", ["lm-eval", "--checkpoint", "{ck}", "--tasks", "", "--include-path", "{tasks}"], "--tasks",
     None),
    # lines that mislead
    ("generate on a classifier", ["generate", "--checkpoint", "{clf}"], "finetune.task=classify", None),
    ("lm-eval on a classifier", ["lm-eval", "--checkpoint", "{clf}", "--tasks", "mt_choice", "--include-path",
                                 "{tasks}"], "finetune.task=classify", None),
    ("generate Hugging Face folder without tokenizer", ["generate", "--checkpoint", "{hf_notok}"],
     "tokenizer.json", None),
    ("lm-eval missing include path", [*LM_EVAL[:-1], "{inf}/no_tasks_here"], "--include-path {inf}/no_tasks_here",
     None),
    ("lm-eval task YAML that does not parse", ["lm-eval", "--checkpoint", "{ck}", "--tasks", "mt_broken",
                                               "--include-path", "{broken_tasks}"], "mt_broken.yaml", None),
]

# Cases that need the fine-tunes and the Hugging Face export (tuned_world), and lm-eval's full task index (~10 s)
TUNED = ("{clf}", "{sft}", "{hf")
INFERENCE_SLOW = {"lm-eval task YAML that does not parse"}


def _tuned(case: tuple) -> bool:
    return any(t in a for a in case[1] for t in TUNED)


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=[pytest.mark.slow] if _tuned(c) or
                                               c[0] in INFERENCE_SLOW else []) for c in INFERENCE_CASES])
def test_inference_input_is_one_line(inference_world, cli, request, case):
    assert_refused(case, request.getfixturevalue("tuned_world") if _tuned(case) else inference_world, cli)


def test_the_same_vocabulary_named_another_way_is_accepted(inference_world, cli):
    """The tokenizer that made the ids, named by its file rather than its folder: decoded, exit 0."""
    r = _run(["data-info", "{w}/sp_data", "--tokenizer", "{w}/sp/tokenizer.model"], inference_world, cli)
    assert r.returncode == 0 and "decoded:" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_generate_reads_a_hugging_face_folder_as_its_checkpoint(tuned_world, cli):
    """The export generates what the checkpoint does, and its tokenizer (the byte tokenizer as a tokenizer.json) is
    taken for the checkpoint's own; the default length fits the 64-token context."""
    argv = ["generate", "--prompt", "the", "--temperature", "0", "--max-new-tokens", "20"]
    ours = _run([*argv, "--checkpoint", "{ck}"], tuned_world, cli)
    theirs = _run([*argv, "--checkpoint", "{hf}"], tuned_world, cli)
    named = _run([*argv, "--checkpoint", "{ck}", "--tokenizer", "{hf}"], tuned_world, cli)
    assert ours.returncode == theirs.returncode == named.returncode == 0, theirs.stderr[-2000:] + named.stderr[-2000:]
    assert ours.stdout == theirs.stdout == named.stdout and len(ours.stdout) > 3
    default = _run(["generate", "--checkpoint", "{hf}"], tuned_world, cli)  # 100 new tokens by default: capped
    assert default.returncode == 0, default.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------


# -- convert, plan, launch helpers, config and tokenizer-training values -----------------------------------------
# (cases, their fixture and their test below this line)


@pytest.fixture(scope="module")
def tools_world(world, cli):
    """Hugging Face folders exported from the fixture's checkpoint (no download), one config.json key broken in each."""
    t = os.path.join(world["w"], "tools")
    os.makedirs(t)
    r = _run(["convert", "to-hf", "{ck}", "--output", f"{t}/hf", "--no-verify"], world, cli)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads(open(os.path.join(t, "hf", "config.json")).read())
    for name, change in (("hf_no_vocab", {"vocab_size": None}), ("hf_no_hidden", {"hidden_size": None}),
                         ("hf_vocab_text", {"vocab_size": "many"})):  # None: the key left out
        shutil.copytree(os.path.join(t, "hf"), os.path.join(t, name))
        c = {k: v for k, v in config.items() if k not in change or change[k] is not None}
        c.update({k: v for k, v in change.items() if v is not None})
        with open(os.path.join(t, name, "config.json"), "w") as f:
            json.dump(c, f)
    return dict(world, tools=t)


def tokenizer_case(what: str, flag: str, value: str, out: str) -> tuple:
    """A train-tokenizer case whose one bad value is `flag value`."""
    argv = ["train-tokenizer", "--input", "{w}/good.jsonl", "--vocab-size", "300", flag, value, "--output",
            f"{{tools}}/{out}"]
    return (f"train-tokenizer {what} {value}", argv, f"{flag} {value}", f"{{tools}}/{out}")


TOOLS_CASES = [
    # convert: numbers out of range
    ("reshard world size 0", ["convert", "reshard", "{ck}", "--output", "{tools}/rs0", "--world-size", "0"],
     "--world-size 0", "{tools}/rs0"),
    ("reshard negative world size", ["convert", "reshard", "{ck}", "--output", "{tools}/rs1", "--world-size", "-2"],
     "--world-size -2", "{tools}/rs1"),
    ("from-hf world size 0", ["convert", "from-hf", "{tools}/hf", "--output", "{tools}/fh0", "--world-size", "0"],
     "--world-size 0", "{tools}/fh0"),
    ("from-hf negative world size", ["convert", "from-hf", "{tools}/hf", "--output", "{tools}/fh1", "--world-size",
                                     "-1"], "--world-size -1", "{tools}/fh1"),
    ("to-hf max shard size 0", ["convert", "to-hf", "{ck}", "--output", "{tools}/th0", "--max-shard-size", "0"],
     "--max-shard-size 0", "{tools}/th0"),
    ("to-hf negative max shard size", ["convert", "to-hf", "{ck}", "--output", "{tools}/th1", "--max-shard-size",
                                       "-5GB"], "--max-shard-size -5GB", "{tools}/th1"),
    # convert from-hf: config.json without a key it needs, or with a value that is no number
    ("from-hf config.json without vocab_size", ["convert", "from-hf", "{tools}/hf_no_vocab", "--output", "{tools}/fh2"],
     "hf_no_vocab/config.json: no vocab_size", "{tools}/fh2"),
    ("from-hf config.json without hidden_size", ["convert", "from-hf", "{tools}/hf_no_hidden", "--output",
                                                 "{tools}/fh3"], "hf_no_hidden/config.json: no hidden_size",
     "{tools}/fh3"),
    ("from-hf config.json vocab_size not a number", ["convert", "from-hf", "{tools}/hf_vocab_text", "--output",
                                                     "{tools}/fh4"], "hf_vocab_text/config.json: vocab_size 'many'",
     "{tools}/fh4"),
    # plan
    ("plan gpus per node 0", ["plan", "--gpus", "2", "--gpu", "h100", "--gpus-per-node", "0"], "--gpus-per-node 0",
     None),
    ("plan gpus per node not dividing gpus", ["plan", "--gpus", "4", "--set", "train.global_batch_size=32", "--gpu",
                                              "h100", "--gpus-per-node", "3"], "--gpus-per-node 3", None),
    # config and tokenizer-training values
    ("negative lr named as itself", pretrain("train.lr=-1", out="{tools}/run_lr"),
     "train.lr: must be at least 0, got -1", "{tools}/run_lr"),
    tokenizer_case("character coverage", "--character-coverage", "2.0", "tok_cc"),
    tokenizer_case("character coverage", "--character-coverage", "0", "tok_cc0"),
    tokenizer_case("max sentences", "--max-sentences", "0", "tok_ms"),
    tokenizer_case("max sentences", "--max-sentences", "-1", "tok_ms1"),
    # launch helpers
    ("launch bad master address", ["launch", "--hostfile", "{w}/hosts_ok", "--master-addr", "bad host!",
                                   "--skip-preflight", "--dry-run", "pretrain"], "--master-addr 'bad host!'", None),
    ("launch master address out of range", ["launch", "--hostfile", "{w}/hosts_ok", "--master-addr", "10.0.0.300",
                                            "--skip-preflight", "--dry-run", "pretrain"], "--master-addr '10.0.0.300'",
     None),
    ("hostfile duplicate host", ["hostfile", "--nodes", "a,a", "--output", "{tools}/hf_dup"], "host a is listed twice",
     "{tools}/hf_dup"),
    ("hostfile duplicate from ranges", ["hostfile", "--nodes", "n[1-3],n2", "--output", "{tools}/hf_dup2"],
     "host n2 is listed twice", "{tools}/hf_dup2"),
    ("hostfile host with a space", ["hostfile", "--nodes", "bad host!,b", "--output", "{tools}/hf_space"],
     "'bad host!'", "{tools}/hf_space"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in TOOLS_CASES])
def test_tools_bad_input_is_one_line_and_leaves_nothing(tools_world, cli, case):
    assert_refused(case, tools_world, cli)
