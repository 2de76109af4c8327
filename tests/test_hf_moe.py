"""The Mixture-of-Experts families (checkpoint/hf_moe.py) both ways against transformers' own classes, with
test_hf_families.py's tiny random models and checks: float64 logits and greedy tokens (check_parity), the tensors
bit for bit after HF -> megatrain -> HF, the config keys that matter. A wrong expert mapping fails the check; what
megatrain does not compute is refused in one line."""
import dataclasses
import json

import pytest
import torch

from megatrain.checkpoint.hf import family_of, read_hf_config
from megatrain.checkpoint.reader import CheckpointError
from megatrain.config import ModelConfig
from megatrain.convert.hf import check_parity
from test_hf_families import BASE, CONFIG_KEYS, cli, converts_both_ways, megatrain_of, tiny_hf

MOE = dict(num_hidden_layers=2, num_experts_per_tok=2, router_aux_loss_coef=0.02)
QWEN2_MOE = dict(MOE, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                 norm_topk_prob=False)
# name -> (config class, model class, its config beyond test_hf_families.BASE, the megatrain keys it must read)
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4, sliding_window=5, head_dim=16),
                dict(moe_experts=4, moe_top_k=2, moe_router="topk_softmax", moe_ffn=64, sliding_window=5,
                     moe_aux_loss=0.02, moe_layers="all", moe_shared_experts=0)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", QWEN2_MOE,
                  dict(moe_experts=8, moe_ffn=16, moe_shared_ffn=24, moe_shared_gate=True, moe_norm_topk=False,
                       qkv_bias=True, moe_layers="all", d_ff=64)),
    "qwen2-moe-sparse-step": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                              dict(QWEN2_MOE, decoder_sparse_step=2, norm_topk_prob=True),
                              dict(moe_layers="every 2", moe_norm_topk=True, d_ff=64, moe_ffn=16)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(MOE, num_experts=4, moe_intermediate_size=16, head_dim=16, norm_topk_prob=True),
                  dict(moe_experts=4, qk_norm="head", head_dim=16, moe_norm_topk=True, moe_shared_experts=0)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(MOE, num_experts=4, intermediate_size=32),
              dict(moe_experts=4, qk_norm="full", norm_placement="pre", moe_norm_topk=False, moe_ffn=32)),
}
MOE_KEYS = CONFIG_KEYS + ("num_experts", "num_local_experts", "num_experts_per_tok", "intermediate_size",
                          "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
                          "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef", "qkv_bias")


@pytest.mark.parametrize("case", list(CASES))
def test_a_moe_family_converts_both_ways_to_the_same_model(case, tmp_path, capsys):
    converts_both_ways(case, tmp_path, capsys, cases=CASES, config_keys=MOE_KEYS)


@pytest.mark.slow  # 2 and 4 ranks
@pytest.mark.parametrize("case,parallel", [("qwen2-moe-sparse-step", ("parallel.ep=2",)),
                                           ("mixtral", ("parallel.ep=2", "parallel.tp=2"))])
def test_the_commands_round_trip_a_moe_model_split_over_experts(case, parallel, tmp_path):
    """from-hf into an expert-parallel layout (each rank writes its experts), to-hf back: the parity line, the class,
    every tensor as it was."""
    import os

    from safetensors.torch import load_file

    src, mt, back = (str(tmp_path / n) for n in ("src", "mt", "back"))
    tiny_hf(case, src, cases=CASES)
    sets = [a for kv in parallel for a in ("--set", kv)]
    world = 2 * (2 if "parallel.tp=2" in parallel else 1)
    r = cli("convert", "from-hf", src, "--output", mt, *sets, "--world-size", str(world))
    assert r.returncode == 0 and "(same)" in r.stdout, r.stdout + r.stderr[-3000:]
    r = cli("convert", "to-hf", mt, "--output", back)
    assert r.returncode == 0 and "(same)" in r.stdout, r.stdout + r.stderr[-3000:]
    assert f"as {CASES[case][1]}" in r.stdout, r.stdout
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_and_moe_blocks_mix_as_decoder_sparse_step_says(tmp_path):
    """Qwen2-MoE with decoder_sparse_step=2: block 0 a dense MLP of intermediate_size, block 1 a MoE with its gated
    shared expert."""
    model = megatrain_of(tiny_hf("qwen2-moe-sparse-step", str(tmp_path / "src"), cases=CASES))
    names = dict(model.named_parameters())
    assert names["layers.0.mlp.gate_up.weight"].shape == (2 * 64, 32)
    assert names["layers.1.mlp.experts.gate_up"].shape == (8, 2 * 16, 32)
    assert names["layers.1.mlp.shared.gate_up.weight"].shape == (2 * 24, 32)
    assert names["layers.1.mlp.shared_gate.weight"].shape == (1, 32)


def test_a_wrong_expert_mapping_fails_the_check(tmp_path, capsys):
    """Two experts' weights swapped in the imported model (the router still picks by the old order): another
    model, and check_parity says so in one line."""
    src = tiny_hf("mixtral", str(tmp_path / "src"), cases=CASES)
    model = megatrain_of(src)
    with torch.no_grad():
        for name in ("gate_up", "down"):
            w = getattr(model.layers[0].mlp.experts, name)
            w[[0, 1]] = w[[1, 0]].clone()
    why = check_parity(model, src, read_hf_config(src)[2])
    assert why and "\n" not in why and "max |logit difference|" in why, why


def _read(tmp_path, config: dict) -> None:
    path = tmp_path / "hf"
    path.mkdir(exist_ok=True)
    json.dump(config, open(path / "config.json", "w"))
    read_hf_config(str(path))


REFUSED = [  # (config.json, what the one line names)
    (dict({**BASE, **QWEN2_MOE}, num_hidden_layers=4, mlp_only_layers=[1], architectures=["Qwen2MoeForCausalLM"]),
     "decoder_sparse_step 1 with mlp_only_layers [1]: MoE blocks [0, 2, 3]"),
    (dict({**BASE, **QWEN2_MOE}, use_sliding_window=True, architectures=["Qwen2MoeForCausalLM"]), "use_sliding_window"),
    (dict({**BASE, **MOE}, num_experts=4, clip_qkv=8.0, architectures=["OlmoeForCausalLM"]), "clip_qkv 8.0"),
    (dict(BASE, kv_lora_rank=16, q_lora_rank=24, architectures=["DeepseekV3ForCausalLM"]),
     "architecture DeepseekV3ForCausalLM (kv_lora_rank 16): its multi-head latent attention"),
    (dict(BASE, swiglu_limit=7.0, architectures=["GptOssForCausalLM"]),
     "architecture GptOssForCausalLM (swiglu_limit 7.0): megatrain's model has no attention sinks"),
]


@pytest.mark.parametrize("config,named", REFUSED, ids=["mlp_only_layers", "qwen2-moe-window", "olmoe-clip_qkv",
                                                       "deepseek-v3", "gpt-oss"])
def test_what_megatrain_does_not_compute_is_refused_in_one_line(config, named, tmp_path):
    """Before any weight is read: the folder holds config.json only."""
    with pytest.raises(CheckpointError) as e:
        _read(tmp_path, config)
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_qwen_moe_layer_patterns_read_and_write_back(tmp_path):
    """mlp_only_layers [0, 1] is "after 2"; to-hf writes "after K" as mlp_only_layers and "every N" as
    decoder_sparse_step."""
    from megatrain.checkpoint.hf_families import hf_config_kwargs

    path = tmp_path / "hf"
    path.mkdir()
    json.dump(dict({**BASE, **QWEN2_MOE}, num_hidden_layers=4, mlp_only_layers=[0, 1],
                   architectures=["Qwen2MoeForCausalLM"]), open(path / "config.json", "w"))
    fam, m, V, _ = read_hf_config(str(path))
    assert m.moe_layers == "after 2"
    kw = hf_config_kwargs(m, fam, V)
    assert (kw["decoder_sparse_step"], kw["mlp_only_layers"]) == (1, [0, 1])
    kw = hf_config_kwargs(dataclasses.replace(m, moe_layers="every 2"), fam, V)
    assert (kw["decoder_sparse_step"], kw["mlp_only_layers"]) == (2, [])


def test_to_hf_picks_the_moe_class_by_the_models_features():
    base = ModelConfig(vocab_size=96, d_model=32, n_heads=4, n_layers=4, moe_experts=4, moe_top_k=2)
    pick = lambda **k: family_of(dataclasses.replace(base, **k)).architecture  # noqa: E731
    assert pick(moe_router="topk_softmax") == pick() == "MixtralForCausalLM"  # softmax, top-k, renormalised
    assert pick(qk_norm="full", moe_norm_topk=False) == "OlmoeForCausalLM"
    assert pick(qk_norm="head", head_dim=16) == "Qwen3MoeForCausalLM"
    assert pick(moe_layers="every 2", qk_norm="head", moe_norm_topk=False) == "Qwen3MoeForCausalLM"
    assert pick(moe_shared_experts=1, moe_shared_gate=True, qkv_bias=True) == "Qwen2MoeForCausalLM"
    with pytest.raises(CheckpointError) as e:  # dropping tokens: transformers' classes are dropless
        family_of(dataclasses.replace(base, moe_capacity=1.25))
    assert "model.moe_capacity=1.25: no transformers class computes this model" in str(e.value), str(e.value)
    with pytest.raises(CheckpointError) as e:  # un-normalised top-k weights: Qwen's and OLMoE's have a QK-norm
        family_of(dataclasses.replace(base, moe_norm_topk=False))
    assert "model.moe_norm_topk=false: no transformers class computes this model (the closest, MixtralForCausalLM, " \
        "has moe_norm_topk=true)" in str(e.value), str(e.value)
    with pytest.raises(CheckpointError) as e:  # a shared expert without its gate
        family_of(dataclasses.replace(base, moe_shared_experts=1))
    assert "no transformers class computes this model" in str(e.value) and "\n" not in str(e.value)
