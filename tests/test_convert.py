"""`megatrain convert` on one rank (the many-layout matrix is in test_convert_layouts.py, slow tier): consolidate,
to-hf parity with `megatrain generate`, from-hf round trips, checkpoint.init, and every bad input as one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import run_distributed
from training_utils import losses, make_byte_dataset, run_configs, small_sets


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "megatrain.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def one_error_line(r: subprocess.CompletedProcess, match: str) -> None:
    """Exit 1, no traceback, and the last stderr line is megatrain's one error line containing `match`."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("megatrain convert: error:")]
    assert len(errors) == 1 and match in errors[0], r.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-rank ZeRO-1 run of the small byte-level model (one rank's ZeRO-1 runs as ZeRO-0): checkpoints at steps 2
    and 4."""
    tmp = tmp_path_factory.mktemp("trained")
    data = make_byte_dataset(tmp)
    ck = str(tmp / "run")
    run_distributed(run_configs, 2, [small_sets(data, ck, **{"train.max_steps": 4, "checkpoint.interval": 2,
                                                             "train.eval_interval": 0})], timeout=300)
    return data, ck


def test_a_reshard_keeps_the_zero_stage_the_run_was_asked_for(tmp_path):
    """A one-rank fp32 ZeRO-1 run runs as ZeRO-0 (nothing to partition); resharded onto 2 ranks it is ZeRO-1 again,
    and `--set parallel.zero_stage` still chooses."""
    from megatrain.checkpoint.reader import CheckpointReader
    from megatrain.convert.writer import reshard_target

    data, ck = make_byte_dataset(tmp_path), str(tmp_path / "one")
    run_distributed(run_configs, 1, [small_sets(data, ck, **{"parallel.zero_stage": 1, "train.max_steps": 2,
                                                             "checkpoint.interval": 2, "train.eval_interval": 0})],
                    timeout=300)
    with CheckpointReader(ck) as r:
        assert (r.layout["zero_stage"], r.asked.parallel.zero_stage) == (0, 1)
        cfg, world, asked = reshard_target(r, [], 2)
        assert (cfg.parallel.zero_stage, asked.parallel.zero_stage, world) == (1, 1, 2)
        _, _, asked = reshard_target(r, ["parallel.zero_stage=2"], 2)
        assert asked.parallel.zero_stage == 2


@pytest.mark.slow
def test_consolidate_matches_deepspeeds_own_reader_and_generates_the_same(trained, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    _, ck = trained
    out = str(tmp_path / "full")
    r = cli("convert", "consolidate", ck, "--output", out)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["megatrain.json", "model.safetensors"]  # byte tokenizer: no files to copy
    ours = load_file(os.path.join(out, "model.safetensors"))
    ds = get_fp32_state_dict_from_zero_checkpoint(ck)
    assert set(ours) == set(ds)
    for k in ours:
        assert torch.equal(ours[k], ds[k]), k
    saved = json.load(open(os.path.join(out, "megatrain.json")))
    assert saved["step"] == 4 and saved["consolidated_from"]["layout"]["zero_stage"] == 1
    # the consolidated folder is a checkpoint every reader takes: greedy generation is the same from both
    a = cli("generate", "--checkpoint", ck, "--prompt", "the ", "--max-new-tokens", "12", "--temperature", "0")
    b = cli("generate", "--checkpoint", out, "--prompt", "the ", "--max-new-tokens", "12", "--temperature", "0")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("the ")
    # an earlier step by --tag, and half precision
    r = cli("convert", "consolidate", ck, "--tag", "step00000002", "--output", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    two = get_fp32_state_dict_from_zero_checkpoint(ck, tag="step00000002")
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], two[k].bfloat16()) for k in half)


@pytest.mark.slow
def test_a_run_exported_to_hf_generates_the_same_greedy_tokens(trained, tmp_path):
    """megatrain run -> to-hf -> transformers from_pretrained -> generate == `megatrain generate --temperature 0`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ck = trained
    hf_dir = str(tmp_path / "hf")
    r = cli("convert", "to-hf", ck, "--output", hf_dir, "--max-shard-size", "200KB")
    assert r.returncode == 0, r.stderr
    assert "parity: max |logit difference|" in r.stdout and "(same)" in r.stdout, r.stdout
    index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # sharded above --max-shard-size
    prompt, n = "the quick", 20
    ours = cli("generate", "--checkpoint", ck, "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0")
    assert ours.returncode == 0, ours.stderr
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    assert ids.tolist()[0] == list(prompt.encode())  # the byte tokenizer's ids, through transformers
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)  # both stop at the end-of-document token
    assert model.config.vocab_size == 260  # the 60 rows of padding past the tokenizer are not exported
    assert tok.decode(out[0]) + "\n" == ours.stdout


def _tiny_hf(kind: str, path: str, seed: int = 0) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    if kind.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             rope_theta=5e4, rms_norm_eps=1e-5, tie_word_embeddings=kind == "llama-tied"))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                                 sliding_window=None))
    else:
        act = "gelu" if kind == "gpt2-erf" else "gelu_new"  # the exact GeLU (model.gelu=erf) or GPT-2's tanh form
        model = GPT2LMHeadModel(GPT2Config(vocab_size=301, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                           activation_function=act, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(path)


def hf_round_trip(kind: str, tmp_path, tp: int) -> None:
    """HF -> from-hf (tp) -> to-hf: every tensor equal to the original, the two models' logits within 1e-5."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src, mt, back = (str(tmp_path / f"{kind}-{tp}-{n}") for n in ("src", "mt", "back"))
    _tiny_hf(kind, src)
    r = cli("convert", "from-hf", src, "--output", mt, "--set", f"parallel.tp={tp}", "--world-size", str(tp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(same)" in r.stdout and f"tp {tp} x pp 1" in r.stdout, r.stdout
    r = cli("convert", "to-hf", mt, "--output", back)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(src).eval()(x).logits
        lb = AutoModelForCausalLM.from_pretrained(back).eval()(x).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_gpt2_with_the_exact_gelu_round_trips(tmp_path):
    """activation_function "gelu" (erf; refused before) becomes model.gelu=erf: from-hf's logit check against
    transformers passes and to-hf writes "gelu" back."""
    hf_round_trip("gpt2-erf", tmp_path, tp=1)
    assert json.load(open(tmp_path / "gpt2-erf-1-back" / "config.json"))["activation_function"] == "gelu"


@pytest.mark.slow
def test_llama_from_hf_round_trips_and_starts_a_pretraining_run(tmp_path):
    hf_round_trip("llama", tmp_path, tp=1)
    # checkpoint.init: the imported weights start a run (fresh optimizer); its first loss is the HF model's on that batch
    from transformers import AutoModelForCausalLM

    data = make_byte_dataset(tmp_path)
    ck = str(tmp_path / "continued")
    sets = [s for s in small_sets(data, ck, **{"train.max_steps": 2, "train.eval_interval": 0,
                                               "checkpoint.init": str(tmp_path / "llama-1-mt")})
            if not s.startswith("model.")]
    run_distributed(run_configs, 1, [(None, sets)], timeout=300)
    from megatrain.config import load_config
    from megatrain.data import build_gpt_datasets

    cfg = load_config(None, sets)
    train, _, _ = build_gpt_datasets(data, cfg.data.split, cfg.data.seq_len, [16, 0, 0], cfg.train.seed)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama-1-src")).eval()
    tokens = torch.from_numpy(np.stack([train[i] for i in range(8)]))
    with torch.no_grad():
        # HF shifts the labels inside: predicting tokens[1:] from tokens[:-1], as megatrain does (micro-batches of 2)
        want = np.mean([float(hf(tokens[i:i + 2], labels=tokens[i:i + 2]).loss) for i in range(0, 8, 2)])
    assert losses(ck)[1] == pytest.approx(want, rel=1e-5)
    saved = json.load(open(os.path.join(ck, "step00000002", "megatrain.json")))
    assert saved["resolved"]["model"]["n_layers"] == 2 and saved["resolved"]["model"]["d_model"] == 64  # from init
    assert saved["config"]["model"]["d_model"] == 128 and saved["config"]["checkpoint"]["init"]  # as asked


# -- bad input: one line, exit 1, nothing left behind ------------------------------------------------------------


@pytest.fixture
def broken(trained, tmp_path):
    """A copy of the trained checkpoint to damage."""
    _, ck = trained
    dst = str(tmp_path / "copy")
    shutil.copytree(ck, dst)
    return dst


def _state(ck: str) -> str:
    return os.path.join(ck, "step00000004", "megatrain.json")


@pytest.mark.slow
def test_reader_bad_inputs(broken, tmp_path):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(cli("convert", "consolidate", str(empty), "--output", out), "not a megatrain checkpoint")
    one_error_line(cli("convert", "consolidate", str(tmp_path / "nope"), "--output", out), "no such checkpoint directory")
    one_error_line(cli("convert", "consolidate", broken, "--output", broken, "--force"), "holds the checkpoint")
    open(os.path.join(broken, "latest"), "w").write("step00000099")
    one_error_line(cli("convert", "consolidate", broken, "--output", out), "names 'step00000099', which is incomplete or missing")
    open(os.path.join(broken, "latest"), "w").write("step00000004")
    optim = os.path.join(broken, "step00000004", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    data = open(optim, "rb").read()
    open(optim, "wb").write(data[: len(data) // 2])
    # the manifest finds it first; without one (a checkpoint saved before manifests), the reader itself does
    one_error_line(cli("convert", "consolidate", broken, "--output", out), "the manifest records")
    os.remove(os.path.join(broken, "step00000004", "manifest.json"))
    one_error_line(cli("convert", "consolidate", broken, "--output", out), "unreadable")
    os.remove(optim)
    one_error_line(cli("convert", "consolidate", broken, "--output", out), "zero_pp_rank_0_mp_rank_00_optim_states.pt: rank file missing")
    open(optim, "wb").write(data)
    state = json.load(open(_state(broken)))
    state["resolved"]["model"]["d_model"] = 32  # the shards no longer fit the saved model
    json.dump(state, open(_state(broken), "w"))
    one_error_line(cli("convert", "consolidate", broken, "--output", out), "the checkpoint's shards disagree in shape")
    open(_state(broken), "w").write("{not json")
    one_error_line(cli("convert", "consolidate", broken, "--output", out), "not a valid megatrain state file")
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith("out")]


@pytest.mark.slow
def test_converter_bad_inputs(broken, tmp_path):
    out = str(tmp_path / "out")
    # an impossible target layout, a key reshard may not change, an MLM model for to-hf
    one_error_line(cli("convert", "reshard", broken, "--output", out, "--set", "parallel.tp=3", "--world-size", "3"),
                   "model.n_heads=4 is not divisible by tp=3")
    one_error_line(cli("convert", "reshard", broken, "--output", out, "--set", "model.n_layers=3"),
                   "only the layout can change here")
    one_error_line(cli("convert", "reshard", broken, "--output", out, "--set", "parallel.tp=2", "--world-size", "3"),
                   "does not divide the world size 3")
    os.remove(os.path.join(broken, "step00000004", "manifest.json"))  # (megatrain.json is edited below)
    state = json.load(open(_state(broken)))
    state["resolved"]["model"]["objective"] = "mlm"
    json.dump(state, open(_state(broken), "w"))
    one_error_line(cli("convert", "to-hf", broken, "--output", out), "transformers has no causal-LM class for a masked LM")
    # Hugging Face folders: none, an unknown architecture, missing and misshapen weights, a pickle not trusted
    hf = tmp_path / "hf"
    hf.mkdir()
    one_error_line(cli("convert", "from-hf", str(hf), "--output", out), "no config.json")
    _tiny_hf("llama", str(hf))
    config = json.load(open(hf / "config.json"))
    json.dump(dict(config, architectures=["BertForMaskedLM"]), open(hf / "config.json", "w"))
    one_error_line(cli("convert", "from-hf", str(hf), "--output", out),
                   "architecture BertForMaskedLM is not supported; supported: LlamaForCausalLM, MistralForCausalLM, "
                   "Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, Gemma2ForCausalLM, Phi3ForCausalLM, "
                   "Olmo2ForCausalLM, GPT2LMHeadModel")
    json.dump(dict(config, intermediate_size=128), open(hf / "config.json", "w"))
    one_error_line(cli("convert", "from-hf", str(hf), "--output", out), "has shape (160, 64), but config.json makes it (128, 64)")
    json.dump(dict(config, num_hidden_layers=3), open(hf / "config.json", "w"))
    one_error_line(cli("convert", "from-hf", str(hf), "--output", out), "weight model.layers.2.input_layernorm.weight missing")
    json.dump(config, open(hf / "config.json", "w"))
    one_error_line(cli("convert", "from-hf", str(hf), "--output", out, "--set", "parallel.tp=4", "--world-size", "4"),
                   "the 2 KV heads (model.n_kv_heads) are not divisible by tp=4")
    from safetensors.torch import load_file

    torch.save(load_file(str(hf / "model.safetensors")), str(hf / "pytorch_model.bin"))
    os.remove(hf / "model.safetensors")
    one_error_line(cli("convert", "from-hf", str(hf), "--output", out), "pass --trust-pickle if you trust where it came from")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]


def test_resuming_under_another_layout_without_elastic_names_the_reshard_command(trained, tmp_path):
    data, ck = trained
    from megatrain.checkpoint.io import check_compatible

    saved = json.load(open(os.path.join(ck, "step00000004", "megatrain.json")))
    from megatrain.config import load_config

    cfg = load_config("tiny", small_sets(data, ck, **{"checkpoint.elastic": False}))
    layout = dict(world_size=2, dp=2, tp=1, pp=1, zero_stage=3, sequence_parallel=False)
    with pytest.raises(Exception) as e:
        check_compatible(cfg, saved, os.path.join(ck, "step00000004"), layout)
    assert (f"megatrain convert reshard {ck} --output {ck}-tp1-pp1-zero3 --set parallel.tp=1 --set parallel.pp=1 "
            f"--set parallel.zero_stage=3 --world-size 2, then run with --set checkpoint.dir={ck}-tp1-pp1-zero3") in str(e.value)
