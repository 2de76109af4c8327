"""Tier 1: config loading, presets, overrides and the one-line errors."""
import json
import subprocess
import sys

import pytest

from megatrain.config import PRESET_DIR, Config, ConfigError, ffn_width, load_config, validate_world
from megatrain.resolved import Resolved, saved_config
from megatrain.training.engine import deepspeed_config, lr_lambda

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"tiny", "gpt2-124m", "llama-125m", "llama-350m", "llama-1.3b", "llama-7b", "baby-gpt"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_shipped_preset_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    for stage in (0, 1, 2, 3):
        cfg = cfg.replaced({"parallel.zero_stage": stage})
        ds = deepspeed_config(cfg, world_size=cfg.train.global_batch_size // cfg.train.micro_batch_size)
        assert ds["train_batch_size"] == cfg.train.global_batch_size
        assert ds["zero_optimization"]["stage"] == stage


def test_llama7b_shape():
    m = load_config("llama-7b").model
    assert ffn_width(m) == 11008 and m.d_model == 4096


def test_overrides_and_types():
    cfg = load_config("tiny", ["train.max_steps=7", "model.dropout=0.1", "data.path=[0.5, a, 0.5, b]",
                               "parallel.zero_stage=3", "train.lr=5e-3"])
    assert cfg.train.max_steps == 7 and cfg.model.dropout == 0.1 and cfg.parallel.zero_stage == 3
    assert cfg.data.path == [0.5, "a", 0.5, "b"] and cfg.train.lr == 5e-3


@pytest.mark.parametrize("sets,match", [
    (["train.max_step=5"], r"unknown config key 'train.max_step' \(did you mean 'train.max_steps'\?\)"),
    (["trian.max_steps=5"], r"did you mean 'train.max_steps'"),
    (["train.max_steps=abc"], r"config key train.max_steps: expected an integer, got 'abc'"),
    (["train.max_steps=1.5"], r"expected an integer"),
    (["model.bias=maybe"], r"model.bias: expected true or false"),
    (["model.norm=batchnorm"], r"model.norm: 'batchnorm' is not one of rmsnorm, layernorm"),
    (["model.n_heads=5"], r"model.d_model: 192 is not divisible by model.n_heads=5"),
    (["model.n_kv_heads=3"], r"model.n_kv_heads"),
    (["parallel.zero_stage=4"], r"parallel.zero_stage: must be 0, 1, 2 or 3"),
    (["parallel.offload_params=true"], r"needs parallel.zero_stage=3"),
    (["train.global_batch_size=20"], r"train.global_batch_size: 20 is not a multiple of train.micro_batch_size=8"),
    (["data.seq_len=1000"], r"data.seq_len: 1000 exceeds model.max_seq_len=256"),
    (["parallel.pp=2", "parallel.zero_stage=2"], r"ZeRO-2 cannot be combined with pipeline parallelism"),
    (["parallel.sequence_parallel=true"], r"sequence_parallel: needs parallel.tp > 1"),
    (["oops"], r"expected section.key=value"),
    (["finetune.task=sft", "finetune.generation_metrics=[rouge, blue]"],
     r"finetune.generation_metrics: 'blue' is not one of exact_match, rouge, bleu, chrf \(did you mean 'bleu'\?\)"),
    (["finetune.task=classify", "finetune.generation_metrics=[rouge]"],
     r"generation_metrics: scores the responses of a finetune.task=sft model, not finetune.task=classify; remove it"),
    (["finetune.task=sft", "finetune.generation_metrics=[chrf]", "parallel.tp=2"],
     r"generation_metrics: responses are generated from each rank's whole model, which parallel.tp=2 splits"),
    (["finetune.task=sft", "finetune.generation_metrics=[chrf]", "model.moe_experts=4", "parallel.ep=2",
      "parallel.zero_stage=1"], r"which parallel.ep=2 splits over ranks"),
    (["finetune.generation_max_new_tokens=0"], r"finetune.generation_max_new_tokens: must be at least 1, got 0"),
])
def test_bad_values_name_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", sets)


def test_world_dependent_checks():
    cfg = load_config("tiny", ["train.global_batch_size=16", "train.micro_batch_size=4"])
    assert validate_world(cfg, 2) == 2
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel ranks = 4 x 3 = 12"):
        validate_world(cfg, 3)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("modle:\n  n_layers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'modle' \(did you mean 'model'\?\)"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"no such file or preset \(did you mean 'tiny'\?\)"):
        load_config("tinyy")


def test_lr_schedule_shape():
    cfg = load_config("tiny", ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)  # half way through the cosine: mid-point between lr and min_lr


def test_deepspeed_config_filled_from_ours():
    cfg = load_config("tiny", ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg, 2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]
    json.dumps(ds)
    # ZeRO's gradient buckets are allocated whole: never larger than all of this rank's gradients
    assert deepspeed_config(cfg, 2, local_params=1234)["zero_optimization"]["reduce_bucket_size"] == 1234
    ds = deepspeed_config(load_config("tiny", ["parallel.zero_stage=2"]), 2, local_params=10**12)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    # ZeRO-1's JSON sets no bucket: DeepSpeed's default (5e8 elements, 2 GB in fp32) was allocated for a tiny model
    ds = deepspeed_config(load_config("tiny", ["parallel.zero_stage=1"]), 2, local_params=1234)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1234


def test_a_validated_config_is_read_only():
    """What a run derives goes in its Resolved: an assignment into the user's config (a write-back) fails."""
    cfg = load_config("tiny", ["train.max_steps=9"])
    for section, key, value in [("model", "vocab_size", 320), ("finetune", "labels", ["a", "b"]),
                                ("train", "max_steps", 10), ("data", "tokenizer", "byte")]:
        with pytest.raises(ConfigError, match=f"config key {section}.{key}: the config is read-only"):
            setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match="read-only"):
        cfg.tokenizer_vocab = 2048
    changed = cfg.replaced({"train.max_steps": 12, "parallel.zero_stage": 2})  # a new config; this one stays
    assert (changed.train.max_steps, changed.parallel.zero_stage, cfg.train.max_steps) == (12, 2, 9)
    assert changed.explicit == cfg.explicit
    with pytest.raises(ConfigError, match="read-only"):
        changed.train.lr = 1.0


def test_resolved_lays_what_a_run_derived_over_the_config_as_asked():
    import dataclasses

    cfg = load_config("tiny", ["model.vocab_size=0", "finetune.epochs=2"])
    resolved = Resolved.of(cfg).but(model=dataclasses.replace(cfg.model, vocab_size=320, d_model=64),
                                    labels=["neg", "pos"], max_steps=15, warmup_steps=1, tokenizer="hf:/m")
    run = resolved.apply(cfg)
    assert (run.model.vocab_size, run.model.d_model, run.finetune.labels, run.train.max_steps, run.train.warmup_steps,
            run.data.tokenizer) == (320, 64, ["neg", "pos"], 15, 1, "hf:/m")
    assert (cfg.model.vocab_size, cfg.model.d_model, cfg.finetune.labels) == (0, 192, [])  # as asked (tiny)
    # megatrain.json holds both; one saved without `resolved` (the derived values in its config) reads the same
    state = json.loads(json.dumps(dict(config=cfg.to_dict(), resolved=resolved.to_dict())))
    assert Resolved.from_dict(state["resolved"]) == resolved
    assert saved_config(state).to_dict() == run.to_dict()
    assert saved_config(dict(config=run.to_dict())).to_dict() == run.to_dict()


@pytest.mark.slow
def test_cli_bad_config_is_one_line(tmp_path):
    from megatrain.data import IndexedDatasetWriter

    with IndexedDatasetWriter(str(tmp_path / "empty")):
        pass  # a dataset with no documents
    for args, msg in [(["--set", f"data.path={tmp_path / 'empty'}"], "holds no documents"),(["--set", "train.max_steps=abc"], "expected an integer"),
                      (["--set", "data.path=" + str(tmp_path / "nothing")], "no such file"),
                      (["--set", "train.mirco_batch_size=2"], "did you mean 'train.micro_batch_size'")]:
        r = subprocess.run([sys.executable, "-m", "megatrain", "pretrain", *args, "--set", f"checkpoint.dir={tmp_path}/run"],
                           capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
        assert r.returncode == 1, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and msg in errors[0], r.stderr
