"""Every Hugging Face family both ways, against transformers' own classes: tiny random models (random norm weights and
biases) saved with save_pretrained in float32, read through checkpoint/hf.py's maps (as from-hf, checkpoint.init and
finetune.init read them), compared in float64, written back by to-hf's writer and loaded by transformers again.
The refusals, one line each; the parity check's eos rule. The CLI round trip with tokenizer and generation config is
in the slow tier (test_the_cli_round_trip_keeps_the_chat_template_and_generation_config)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatrain.checkpoint.hf import HFWeights, check_hf_weights, load_hf_weights, read_hf_config
from megatrain.checkpoint.reader import CheckpointError
from megatrain.checkpoint.source import WeightSource
from megatrain.config import is_local_layer
from megatrain.convert.hf import TOLERANCE, _write_hf_weights, check_parity, hf_config
from megatrain.model import Transformer

WINDOW = 5
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=0,
            eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW, tie_word_embeddings=True,
             hidden_activation="gelu_pytorch_tanh")
# name -> (transformers config class, model class, its config beyond BASE, the megatrain keys it must read)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e4}),
              dict(rope_theta=5e4)),
    "llama-head-dim-bias": ("LlamaConfig", "LlamaForCausalLM",
                            dict(head_dim=12, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
                            dict(head_dim=12, bias=True, tie_embeddings=True)),
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16}),
                     dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16)),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
                     dict(rope_scaling="linear", rope_factor=4.0)),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                                         "beta_slow": 1, "original_max_position_embeddings": 16}),
                   dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=16),
                dict(sliding_window=WINDOW, global_attn_every=0, head_dim=16, max_seq_len=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
              dict(qkv_bias=True, bias=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16), dict(qk_norm="head", head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(GEMMA, num_hidden_layers=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
               dict(norm_placement="sandwich", norm_one_plus=True, embed_scale=True, mlp="geglu", head_dim=16,
                    attn_scale_dim=12, sliding_window=WINDOW, global_attn_every=2, attn_softcap=5.0,
                    logit_softcap=3.0, qk_norm="none")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(GEMMA, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    final_logit_softcapping=4.0,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               dict(qk_norm="head", global_attn_every=3, sliding_window=WINDOW, rope_theta=1e6, rope_local_theta=1e4,
                    rope_scaling="linear", rope_factor=2.0, logit_softcap=4.0, attn_softcap=0.0)),
    "gemma3-scaled-everywhere": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                                 dict(GEMMA, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                      rope_parameters={t: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
                                                       for t in ("full_attention", "sliding_attention")}),
                                 dict(global_attn_every=2, rope_local_theta=0.0, rope_scaling="linear")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW), dict(sliding_window=WINDOW)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(), dict(norm_placement="post", qk_norm="full")),
}


def tiny_hf(case: str, path: str, seed: int = 0, cases: dict = CASES, **changes) -> str:
    """A random transformers model of `case` (a key of `cases`; random norm weights and biases: not their init's
    ones and zeros), saved in float32 with save_pretrained."""
    import transformers

    config_class, model_class, extra, _ = cases[case]
    cfg = getattr(transformers, config_class)(**{**BASE, **extra, **changes}, architectures=[model_class])
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms (Gemma's around 0: it scales by 1 + w) and biases
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "bias" in name or "gemma" in case else 1.0))
    model.save_pretrained(path)
    return path


def megatrain_of(path: str) -> Transformer:
    """The megatrain model of a Hugging Face folder, read as from-hf reads it (every tensor's shape checked on a
    meta-device model first)."""
    fam, m, V, _ = read_hf_config(path)
    check_hf_weights(HFWeights(path), m, fam, V)
    model = Transformer(m)
    load_hf_weights(model, path)
    return model.eval()


def hf_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, local_files_only=True,
                                              experts_implementation="eager").eval()  # (MoE: no float64 grouped mm)
    with torch.no_grad():
        return hf(input_ids=ids).logits


class ModelReader:
    """What to-hf's writer reads from a CheckpointReader, from a model in memory."""

    def __init__(self, model: Transformer):
        self.params = dict(model.named_parameters())
        self.cfg = type("Cfg", (), {"model": model.cfg})

    def names(self):
        return list(self.params)

    def shape(self, name):
        return tuple(self.params[name].shape)

    def tensors(self):
        return ((n, p.detach()) for n, p in self.params.items())


@pytest.mark.parametrize("case", list(CASES))
def test_a_family_converts_both_ways_to_the_same_model(case, tmp_path, capsys):
    """from-hf's read: the keys, logits within TOLERANCE of transformers' in float64, greedy tokens equal past the
    sliding window (check_parity); to-hf's write: the same tensors bit for bit and a config transformers loads to
    the same logits."""
    converts_both_ways(case, tmp_path, capsys)


CONFIG_KEYS = ("architectures", "head_dim", "rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings")


def converts_both_ways(case: str, tmp_path, capsys, cases: dict = CASES, config_keys: tuple = CONFIG_KEYS) -> float:
    """test_a_family_converts_both_ways_to_the_same_model for `case` of `cases` (`config_keys`: the config.json keys
    the export must write back as they were); the max |logit difference|."""
    from safetensors.torch import load_file

    src, back = tiny_hf(case, str(tmp_path / "src"), cases=cases), str(tmp_path / "back")
    fam, m, V, arch = read_hf_config(src)
    assert arch == fam.architecture == cases[case][1]
    for key, want in cases[case][3].items():
        assert getattr(m, key) == want, key
    model = megatrain_of(src)
    source = WeightSource(src)  # checkpoint.init / finetune.init: the same tensors (vocabulary rows padded)
    with torch.device("meta"):
        weights, new = source.weights(Transformer(source.model))
    assert not new and all(torch.equal(weights(n)[:V], p[:V]) for n, p in model.named_parameters())
    source.close()
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 tokens: past the window
    ours = Transformer(m.__class__(**{**m.__dict__, "fused_kernels": "off"}))
    ours.load_state_dict(model.state_dict())
    with torch.no_grad():
        diff = float((ours.double()(ids) - hf_logits(src, ids)).abs().max())
    assert diff <= TOLERANCE
    assert check_parity(model, src, V) is None
    line = capsys.readouterr().out.strip().splitlines()[-1]
    with capsys.disabled():  # the figures, with pytest -s
        print(f"\n{case}: max |logit difference| {diff:.2e} (float64, 2x40 tokens); {line}")
    assert line.endswith("(same)"), line
    greedy = json.loads(line.split("greedy tokens megatrain ")[1].split(" |")[0])
    assert len(greedy) >= 16 and (not m.sliding_window or 8 + len(greedy) > m.sliding_window + 1)
    # to-hf's writer and config: every tensor as transformers saved it, the config it computes the same with
    os.makedirs(back)
    _write_hf_weights(ModelReader(model), back, fam, V, torch.float32, 10**9)
    hf_config(m, fam, V, None).save_pretrained(back)
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    assert torch.equal(hf_logits(src, ids), hf_logits(back, ids))
    before, after = (json.load(open(os.path.join(p, "config.json"))) for p in (src, back))
    for key in config_keys:
        assert key not in before or before[key] == after[key], key  # (head_dim also where the class derives it)
    return diff


def test_gemma3_ignores_the_attention_softcap_as_transformers_does(tmp_path, capsys):
    src = tiny_hf("gemma3", str(tmp_path / "src"), attn_logit_softcapping=2.0)
    _, m, V, _ = read_hf_config(src)
    assert m.attn_softcap == 0 and "attn_logit_softcapping 2.0 is not applied" in capsys.readouterr().err
    assert check_parity(megatrain_of(src), src, V) is None  # transformers' logits: no cap either


def test_the_parity_check_compares_greedy_tokens_under_one_rule(tmp_path, capsys):
    """A tiny Llama whose end token is the one greedy decoding picks first: transformers' generate with
    min_new_tokens (the old rule) is kept from it, megatrain's is not, and the two differed; under one rule (no end
    token on either side) they are the same."""
    from transformers import AutoModelForCausalLM

    src = tiny_hf("llama", str(tmp_path / "src"))
    model = megatrain_of(src)
    _, _, V, _ = read_hf_config(src)
    from megatrain.generate import generate

    prompt = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))[:1, :8]
    first = int(generate(model, prompt, 1, temperature=0)[0, -1])
    config = json.load(open(os.path.join(src, "config.json")))
    json.dump(dict(config, eos_token_id=first), open(os.path.join(src, "config.json"), "w"))
    generation = json.load(open(os.path.join(src, "generation_config.json")))
    json.dump(dict(generation, eos_token_id=first), open(os.path.join(src, "generation_config.json"), "w"))
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    old = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                      do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert first not in old  # the end token suppressed: the old comparison saw DIFFERENT
    assert check_parity(model, src, V) is None
    assert capsys.readouterr().out.strip().endswith("(same)")


def test_a_real_difference_fails_the_check_in_one_line(tmp_path, capsys):
    src = tiny_hf("qwen2", str(tmp_path / "src"))
    model = megatrain_of(src)
    with torch.no_grad():
        model.layers[0].attn.qkv.bias.zero_()  # the q/k/v biases lost: another model
    why = check_parity(model, src, read_hf_config(src)[2])
    assert why and "\n" not in why and "max |logit difference|" in why


def test_a_window_longer_than_the_check_is_said_and_not_crossed(tmp_path, capsys):
    """A real model's window (here 200 tokens of a 256-token Mistral) is not decoded past: 128 greedy tokens, and a
    note saying the continuation stays inside the window."""
    src = tiny_hf("mistral", str(tmp_path / "src"), sliding_window=200, max_position_embeddings=256)
    assert check_parity(megatrain_of(src), src, read_hf_config(src)[2]) is None
    err = capsys.readouterr().err
    assert "128-token continuation stays inside the 200-token sliding window" in err


def test_greedy_tokens_that_differ_past_the_logit_batch_fail_the_check(tmp_path, capsys):
    """megatrain's side with a 32-token window, transformers' without: the 2x32 logits agree, the continuation past
    the window does not, and that fails the check (to-hf and from-hf then exit 1 and write nothing)."""
    import dataclasses

    src = tiny_hf("llama", str(tmp_path / "src"))
    model = megatrain_of(src)
    windowed = Transformer(dataclasses.replace(model.cfg, sliding_window=32))
    windowed.load_state_dict(model.state_dict())
    why = check_parity(windowed, src, read_hf_config(src)[2])
    assert why and why.startswith("greedy tokens differ at token ") and "\n" not in why
    assert capsys.readouterr().out.strip().endswith("(DIFFERENT)")


REFUSED = [  # (case, config.json changes, what the one line names)
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window True"),
    ("qwen3", dict(attention_bias=True), "attention_bias True"),
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 2,
                                   "long_factor": [1.0] * 2}), "rope_parameters.rope_type 'longrope'"),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor 0.5"),
    ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_parameters.rope_type 'dynamic'"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "attention_factor": 2.0,
                                    "original_max_position_embeddings": 16}),
     "rope_parameters.attention_factor 2.0"),
    ("llama", dict(attention_bias=True, mlp_bias=False), "attention_bias True with mlp_bias False"),
    ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("gemma3", dict(layer_types=["sliding_attention", "full_attention", "full_attention"]),
     "layer_types ['sliding_attention', 'full_attention', 'full_attention']"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "rope_parameters.sliding_attention.rope_type 'linear'"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention True"),
]


@pytest.mark.parametrize("case,changes,named", REFUSED, ids=[f"{c}-{next(iter(ch))}" for c, ch, _ in REFUSED])
def test_what_megatrain_does_not_compute_is_refused_in_one_line(case, changes, named, tmp_path):
    path = tmp_path / "hf"
    path.mkdir()
    _, model_class, extra, _ = CASES[case]
    json.dump({**BASE, **extra, "architectures": [model_class], **changes}, open(path / "config.json", "w"))
    with pytest.raises(CheckpointError) as e:
        read_hf_config(str(path))
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_older_config_keys_read_as_transformers_reads_them(tmp_path):
    """Folders saved before rope_parameters: rope_theta + rope_scaling, Gemma 3's rope_local_base_freq and
    sliding_window_pattern (layer_types left out), Mistral's sliding_window left out (its class's 4096)."""
    def read(case: str, **config):
        path = tmp_path / case
        path.mkdir(exist_ok=True)
        json.dump({**BASE, "architectures": [CASES[case][1]], **config}, open(path / "config.json", "w"))
        return read_hf_config(str(path))[1]

    m = read("llama", rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    assert (m.rope_theta, m.rope_scaling, m.rope_factor) == (5e5, "linear", 2.0)
    m = read("gemma3", **{**GEMMA, "num_hidden_layers": 6}, rope_theta=1e6, rope_local_base_freq=1e4,
             rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=3)
    assert (m.rope_theta, m.rope_local_theta, m.rope_scaling, m.rope_factor) == (1e6, 1e4, "linear", 8.0)
    assert (m.sliding_window, m.global_attn_every) == (WINDOW, 3)
    m = read("mistral", max_position_embeddings=8192)
    assert (m.sliding_window, m.max_seq_len) == (4096, 8192)


def test_to_hf_picks_the_class_by_the_models_features():
    import dataclasses

    from megatrain.checkpoint.hf import family_of
    from megatrain.config import ModelConfig

    base = ModelConfig(vocab_size=96, d_model=32, n_heads=4, n_layers=3)
    pick = lambda **k: family_of(dataclasses.replace(base, **k)).architecture  # noqa: E731
    assert pick() == "LlamaForCausalLM" and pick(sliding_window=4) == "MistralForCausalLM"
    assert pick(qkv_bias=True) == "Qwen2ForCausalLM" and pick(qk_norm="head", head_dim=16) == "Qwen3ForCausalLM"
    assert pick(norm_placement="post", qk_norm="full") == "Olmo2ForCausalLM"
    gemma = dict(norm_placement="sandwich", norm_one_plus=True, embed_scale=True, mlp="geglu")
    assert pick(**gemma, sliding_window=4, global_attn_every=2, attn_softcap=50.0) == "Gemma2ForCausalLM"
    assert pick(**gemma, qk_norm="head", sliding_window=4, global_attn_every=3, rope_local_theta=1e4) == \
        "Gemma3ForCausalLM"
    # the class a checkpoint came from, when it computes the model
    assert family_of(dataclasses.replace(base, sliding_window=4), prefer="Phi3ForCausalLM").architecture == \
        "Phi3ForCausalLM"
    assert family_of(base, prefer="Olmo2ForCausalLM").architecture == "LlamaForCausalLM"
    with pytest.raises(CheckpointError) as e:  # QK-norm over the projection with Gemma's sandwich: no class
        family_of(dataclasses.replace(base, **gemma, qk_norm="full"))
    assert "model.qk_norm=full: no transformers class computes this model" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    layers = dataclasses.replace(base, sliding_window=4, global_attn_every=2)
    assert [is_local_layer(layers, i) for i in range(3)] == [True, False, True]


# -- the commands, end to end -------------------------------------------------------------------------------------


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "megatrain.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def _tokenizer(path: str, template_in_config: bool) -> None:
    """A small word-level tokenizer with a chat template, saved beside the model: in chat_template.jinja (as
    transformers 5 writes it) or in tokenizer_config.json (as older folders hold it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<pad>", "<unk>"] + [f"w{i}" for i in range(92)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    tok.save_pretrained(path)
    if template_in_config:
        config = json.load(open(os.path.join(path, "tokenizer_config.json")))
        json.dump(dict(config, chat_template=tok.chat_template), open(os.path.join(path, "tokenizer_config.json"), "w"))
        os.remove(os.path.join(path, "chat_template.jinja"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gemma3", "phi3"])
def test_the_cli_round_trip_keeps_the_chat_template_and_generation_config(case, tmp_path):
    """from-hf -> to-hf with the commands: the class it came from (Phi-3, which Llama and Mistral also compute),
    the tensors, the tokenizer's chat template, generation_config.json's end tokens and sampling defaults."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig

    src, mt, back = (str(tmp_path / n) for n in ("src", "mt", "back"))
    tiny_hf(case, src)
    _tokenizer(src, template_in_config=case == "phi3")
    GenerationConfig(bos_token_id=0, eos_token_id=[1, 7], pad_token_id=2, do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(src)
    r = cli("convert", "from-hf", src, "--output", mt)
    assert r.returncode == 0 and "(same)" in r.stdout, r.stdout + r.stderr[-3000:]
    r = cli("convert", "to-hf", mt, "--output", back)
    assert r.returncode == 0 and "(same)" in r.stdout, r.stdout + r.stderr[-3000:]
    assert f"as {CASES[case][1]}" in r.stdout, r.stdout  # the class it came from
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    template = AutoTokenizer.from_pretrained(src).chat_template
    assert template and AutoTokenizer.from_pretrained(back).chat_template == template
    generation = GenerationConfig.from_pretrained(back)
    assert generation.eos_token_id == [1, 7] and generation.temperature == 0.6 and generation.top_p == 0.9
