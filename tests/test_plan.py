"""megatrain plan: the memory model against what the layouts really hold, DeepSpeed's own estimates, the search and
the command's errors.

Tier 1 (config math) runs everywhere; one measured layout runs in the default tier and every layout the CPU tests run
(ZeRO 0-3 at DP 2, TP 2, PP 2, TP x PP, offload, activation checkpointing, sequence parallel) in the slow tier: each
is trained for three steps in its own gloo job and its per-rank model states and activations must be within 10% of
the plan's (tests/plan_measure.py says how they are measured).
"""
import json
import os
import re

import pytest

from distributed import run_distributed
from megatrain.cli import main as cli_main
from megatrain.config import load_config
from megatrain.planning.memory import model_states, stage_params, total_params
from megatrain.planning.search import plan_layout
from plan_measure import MMAP_ENV, measure

BASE = ["model.vocab_size=512", "logging.tensorboard=false", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.precision=fp32"]
TOLERANCE = 0.10

LAYOUTS = {  # name: (world size, --set values over BASE)
    "zero0_dp2": (2, ["parallel.zero_stage=0"]),
    "zero1_dp2": (2, ["parallel.zero_stage=1"]),
    "zero1_dp2_no_accumulation": (2, ["parallel.zero_stage=1", "train.global_batch_size=4"]),
    "zero2_dp2": (2, ["parallel.zero_stage=2"]),
    "zero3_dp2": (2, ["parallel.zero_stage=3"]),
    "zero2_dp2_offload": (2, ["parallel.zero_stage=2", "parallel.offload_optimizer=true"]),
    "zero3_dp2_offload": (2, ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2_full_ckpt_partitioned": (2, ["parallel.tp=2", "train.activation_checkpointing=full",
                                      "parallel.partition_activations=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "pp2_selective_ckpt": (2, ["parallel.pp=2", "train.activation_checkpointing=selective"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "cp2": (2, ["parallel.cp=2"]),
    "tp2_cp2_sp": (4, ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"]),
}


def _measure_and_compare(tmp_path, monkeypatch, name, world, sets):
    for k, v in MMAP_ENV.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / name
    out.mkdir()
    sets = BASE + sets + [f"checkpoint.dir={out / 'ckpt'}"]
    run_distributed(measure, world, sets, str(out), timeout=300)
    plan = plan_layout(load_config("tiny", sets), world, None, "fp32")
    report = []
    for r in range(world):
        got = json.loads((out / f"rank{r}.json").read_text())
        stage = got["coords"][0]
        states = plan.states[stage]
        # on the CPU, offloaded states are in the same memory; a receiving pipeline stage's buffers stay between steps
        want_states = states.device + states.host + plan.acts[stage].buffers
        want_acts = plan.acts[stage].saved + states.gathered  # ZeRO-3's gathered parameters grow in the forward too
        for what, measured, planned in (("model states", got["model_states"], want_states),
                                        ("activations", got["activations"], want_acts)):
            report.append(f"{name} rank {r} {what}: measured {measured / 2**20:.2f} MiB, planned {planned / 2**20:.2f} MiB "
                          f"({planned / measured - 1:+.1%})")
            assert abs(planned / measured - 1) <= TOLERANCE, "\n".join(report)
    print("\n".join(report))


@pytest.mark.slow
def test_plan_matches_a_measured_run(tmp_path, monkeypatch):
    """One layout in the default tier: 1 rank, ZeRO-1 accumulating 4 micro-batches (the full gradients and the
    reduce bucket), full activation checkpointing."""
    _measure_and_compare(tmp_path, monkeypatch, "zero1_full_ckpt", 1,
                         ["parallel.zero_stage=1", "train.activation_checkpointing=full"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_plan_matches_every_layout(tmp_path, monkeypatch, name):
    world, sets = LAYOUTS[name]
    _measure_and_compare(tmp_path, monkeypatch, name, world, sets)


FEATURE_RUNS = {  # one rank, ZeRO-1: the block features of the public families, measured as the layouts are
    "gemma3_like": ["model.head_dim=64", "model.qk_norm=head", "model.norm_placement=sandwich", "model.mlp=geglu",
                    "model.norm_one_plus=true", "model.sliding_window=32", "model.global_attn_every=2"],
    "olmo2_like": ["model.qk_norm=full", "model.norm_placement=post"],
    "moe_like": ["model.moe_experts=4", "model.moe_top_k=2", "model.moe_ffn=64", "model.moe_shared_experts=1",
                 "model.moe_layers=every 2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FEATURE_RUNS))
def test_plan_matches_measured_runs_of_the_family_features(tmp_path, monkeypatch, name):
    """Head size, QK-norm, sandwich and post norms, GeGLU and window masks (T = 128 over a 32-key window on every
    other block), and MoE blocks (4 experts top-2 and a shared expert in every other block) in a real training run:
    its activations within 10% of the plan's (measured: -1.8%, -1.9%, -2.1%)."""
    _measure_and_compare(tmp_path, monkeypatch, name, 1, ["parallel.zero_stage=1", *FEATURE_RUNS[name]])


def test_parameter_counts_match_the_model():
    """The meta-device count equals the real model's; TP x PP slices add up to it (replicated ones once per rank)."""
    import torch

    from megatrain.model import Transformer

    cfg = load_config("tiny", BASE + ["model.n_layers=5"])
    torch.manual_seed(0)
    assert total_params(cfg.model) == Transformer(cfg.model).num_params()
    one = stage_params(cfg.model, 1, 1, 100_000)
    assert one[0].local == total_params(cfg.model) and one[0].layers == 5
    stages = stage_params(cfg.model, 1, 2, 100_000)
    assert [s.layers for s in stages] == [3, 2] and stages[0].first and stages[1].last  # DeepSpeed's partition
    assert sum(s.local for s in stages) == total_params(cfg.model)
    h, V = cfg.model.d_model, cfg.model.vocab_size
    norms = (2 * 5 + 1) * h  # replicated on each TP rank
    assert stage_params(cfg.model, 2, 1, 100_000)[0].local == (total_params(cfg.model) - norms) // 2 + norms
    tied = load_config("tiny", BASE + ["model.tie_embeddings=true"]).model
    first, last = stage_params(tied, 1, 2, 100_000)
    assert first.local + last.local == total_params(tied) + V * h  # the last stage holds a tied copy


BLOCK_FEATURES = {  # over a 4-head, 2-KV-head, d_model 32 block
    "plain": {}, "head_dim": dict(head_dim=16), "geglu": dict(mlp="geglu"), "qk_norm_head": dict(qk_norm="head"),
    "qk_norm_full": dict(qk_norm="full"), "sandwich": dict(norm_placement="sandwich"),
    "post": dict(norm_placement="post"), "window": dict(sliding_window=8),
    "gemma3_like": dict(head_dim=16, qk_norm="head", norm_placement="sandwich", mlp="geglu", sliding_window=8,
                        norm_one_plus=True),
}


def _saved_by_first_block(dtype: str, **features):
    """A small model with `features`; its first block's forward on a [2, 32] batch: (the config, the block,
    (B, T, dtype), {storage: bytes} of every distinct storage autograd keeps but the parameters and RoPE tables)."""
    import torch

    from megatrain.config import ModelConfig
    from megatrain.model import Transformer

    m = ModelConfig(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64, max_seq_len=64,
                    **features)
    B, T, dt = 2, 32, getattr(torch, dtype)
    torch.manual_seed(0)
    model = Transformer(m).to(dt)
    block = model.layers[0]
    x = torch.randn(B, T, m.d_model, dtype=dt, requires_grad=True)
    rope = model.rope_of(block, slice(0, T), dt)
    skip = {t.untyped_storage().data_ptr() for t in (*block.parameters(), *rope)}
    saved = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        block(x, rope)
    return m, block, (B, T, dt), saved


@pytest.mark.skipif(not __import__("megatrain.kernels").kernels.built(), reason="counts of the fused kernels")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("feature", BLOCK_FEATURES)
def test_block_activation_bytes_are_what_autograd_saves(feature, dtype):
    """What one block's forward hands autograd to keep (every distinct storage but the parameters and the RoPE
    tables) is the plan's per-token count times the tokens, plus a window block's [T, T] mask: exactly, for an
    explicit head_dim, QK-norm per head and over the projection, sandwich and post norms, GeGLU and windows. Gemma's
    norm_one_plus also keeps each norm's 1 + weight, a few parameter-sized vectors per block the plan leaves out."""
    from megatrain.planning.memory import per_token_layer_bytes, window_mask_bytes

    m, block, (B, T, dt), saved = _saved_by_first_block(dtype, **BLOCK_FEATURES[feature])
    w = dt.itemsize
    part = per_token_layer_bytes(m, 1, False, w)
    planned = B * T * (2 * part["norm"] + part["post_norm"] + part["attention"] + part["mlp"])
    planned += window_mask_bytes(m, T, w)
    one_plus = w * sum(p.numel() for p in block.parameters() if p.dim() == 1) if m.norm_one_plus else 0
    assert sum(saved.values()) == planned + one_plus


def test_window_masks_in_the_plan():
    """The window blocks of a stage share one [T, T] mask (model.window_bias): kept for the backward without
    checkpointing, held while a block recomputes with full or selective checkpointing. Gemma 3's pattern: 5 window
    blocks to 1 global."""
    from megatrain.planning.memory import activations, window_blocks

    shape = BASE + ["model.n_layers=12", "data.seq_len=64"]
    windows = shape + ["model.sliding_window=16", "model.global_attn_every=6"]
    m = load_config("tiny", windows).model
    assert window_blocks(m, 0, 1) == 10 and [window_blocks(m, s, 2) for s in (0, 1)] == [5, 5]
    stage = stage_params(m, 1, 1, 0)[0]
    mask = 4 * 64 * 64  # fp32, T = 64
    for mode, kept, recomputed in (("none", mask, 0), ("full", 0, mask), ("selective", 0, mask)):
        ckpt = [f"train.activation_checkpointing={mode}"]
        plain, windowed = (activations(load_config("tiny", sets + ckpt), stage, 0, 1, 1, 4, "fp32")
                           for sets in (shape, windows))
        assert (windowed.saved - plain.saved, windowed.recompute - plain.recompute) == (kept, recomputed), mode


@pytest.mark.parametrize("dp", [1, 8, 64])
def test_zero2_bf16_equals_deepspeeds_estimate(dp):
    """DeepSpeed's estimate_zero2_model_states_mem_needs: 2 bytes of bf16 parameters + 18 per parameter over the
    data-parallel ranks (bf16 and fp32 gradient, fp32 master, Adam's two moments): the plan keeps the same."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P = 6_738_415_616
    ours = model_states(P, 0, dp, 2, "bf16", 16, False, False, False, 50_000_000)
    assert ours.device == pytest.approx(estimate_zero2_model_states_mem_needs(P, dp, 1, cpu_offload=False)[1], rel=1e-9)


def test_zero3_bf16_against_deepspeeds_estimate():
    """DeepSpeed's estimate_zero3_model_states_mem_needs: 4 bytes for the largest layer + 18 per parameter over the
    ranks. The plan counts 20 (the bf16 partition of the parameters too, 2P/N, which DeepSpeed's stage 3 keeps in
    fp16_partitioned_groups_flat) and, for the working set, the gathered parameters, the persistent small ones and
    the reduce bucket instead of the largest layer."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    P, N, largest = 6_738_415_616, 8, 32000 * 4096
    ds = estimate_zero3_model_states_mem_needs(P, largest, N, 1, cpu_offload=False, zero_init=False)[1]
    ours = model_states(P, 0, N, 3, "bf16", 16, False, False, False, 0)
    assert ours.device - 2 * P / N == pytest.approx(ds - 4 * largest, rel=1e-9)


def test_search_finds_fitting_layouts_fastest_first(capsys):
    """7B on 8 x 80 GB: layouts that fit, each within the usable memory, sorted by step time; the first one's --set
    line reproduces its plan."""
    from megatrain.planning.search import search, usable_bytes
    from megatrain.planning.timing import KNOWN_GPUS, Cluster

    cfg = load_config("llama-7b", ["model.vocab_size=32000", "train.global_batch_size=64"])
    cluster = Cluster(KNOWN_GPUS["h100"], 8, 8)
    fits, _ = search(cfg, cluster, "bf16")
    assert fits and all(f.peak <= usable_bytes(cluster) for f in fits)
    times = [f.time.step_s for f in fits]
    assert times == sorted(times)
    assert {f.tp * f.pp * f.dp for f in fits} == {8}
    best = fits[0]
    sets = [a for a in best.sets().split() if a != "--set"]
    again = plan_layout(load_config("llama-7b", ["model.vocab_size=32000", "train.global_batch_size=64", *sets]), 8,
                        cluster, "bf16")
    assert again.peak == best.peak and again.time.step_s == best.time.step_s


def test_search_pads_a_tokenizers_vocabulary_for_each_tp():
    """With model.vocab_size left to the tokenizer (the built-in corpus's 2048 pieces), tp=3 pads it to a multiple of
    3 as training does, instead of ruling the layout out."""
    from megatrain.plan import resolve_model
    from megatrain.planning.search import candidate_layouts

    cfg = load_config("tiny", ["model.n_heads=6", "model.n_kv_heads=3", "model.d_model=192", "train.global_batch_size=6",
                               "train.micro_batch_size=1"])
    cfg, tokenizer_vocab = resolve_model(cfg)
    assert cfg.model.vocab_size == 2048 and tokenizer_vocab == 2048
    sizes = {c.parallel.tp: c.model.vocab_size for c in candidate_layouts(cfg, 3, 8, tokenizer_vocab)}
    assert sizes == {1: 2048, 3: 2112}


def test_plan_command_prints_and_refuses_bad_input(capsys):
    assert cli_main(["plan", "--config", "llama-1.3b", "--set", "model.vocab_size=32000", "--gpus", "1",
                     "--gpu-memory", "24", "--gpu-tflops", "165"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "assumed: 60% of peak in matmuls" in out and "fit" in out
    cases = [
        (["--config", "tiny", "--set", "parallel.tp=3", "--gpus", "3", "--gpu", "h100"], "not divisible by tp=3"),
        (["--config", "tiny", "--gpus", "3", "--gpu", "h100", "--set", "parallel.tp=2"], "does not divide"),
        (["--config", "tiny", "--gpus", "2"], "give --gpu NAME"),
        (["--config", "tiny", "--gpus", "2", "--gpu-memory", "-4"], "must be above 0"),
        (["--config", "llama-7b", "--set", "model.vocab_size=32000", "--gpus", "1", "--gpu-memory", "4",
          "--gpu-tflops", "100", "--search"], "no layout of 1 GPUs fits (offload included): the smallest needs"),
        (["--config", "tiny", "--gpus", "1", "--gpu-memory", "24", "--search"], "give --gpu NAME or --gpu-tflops"),
    ]
    for args, msg in cases:
        assert cli_main(["plan", *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_plan_states_its_efficiency_as_an_assumption(capsys):
    """--compute-efficiency is chosen, not measured: the plan prints it as an assumption and never reads it back as
    an MFU. The MFU line appears only where the layout spends part of the step on something other than the model's
    FLOPs (here a pipeline bubble and recomputed blocks), as the assumption times the share those FLOPs fill."""
    base = ["plan", "--config", "llama-1.3b", "--set", "model.vocab_size=32000", "--gpu", "h100",
            "--compute-efficiency", "0.4"]
    assert cli_main([*base, "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "assumed: 40% of peak in matmuls (--compute-efficiency)" in out, out
    assert "MFU" not in out, out  # one GPU, nothing recomputed: an MFU would be the 40% printed back
    assert cli_main([*base, "--gpus", "8", "--set", "parallel.pp=2", "--set", "parallel.zero_stage=1",
                     "--set", "train.activation_checkpointing=full"]) == 0
    out = capsys.readouterr().out
    assert "assumed: 40% of peak in matmuls (--compute-efficiency)" in out, out
    found = re.search(r"MFU +([\d.]+)% = the assumed 40% x ([\d.]+)%, the step's share in model FLOPs", out)
    assert found, out
    mfu, share = map(float, found.groups())
    assert 0 < share < 100 and abs(mfu - 0.4 * share) <= 0.08, (mfu, share)  # both rounded to 0.1
    # --search ranks layouts by the share, and states the assumption once above the table
    assert cli_main([*base, "--gpus", "2", "--search", "--top", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "peak GiB" in line)
    assert "assumed: 40% of peak in matmuls (--compute-efficiency)" in out and "MFU" not in header, out


def test_shipped_presets_plan(capsys):
    """Every shipped pretraining preset gets a plan on one H100 (memory-only when it does not fit)."""
    from megatrain.config import PRESET_DIR

    for preset in sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("finetune")):
        gpus = 64 if preset == "llama-70b" else 1
        assert cli_main(["plan", "--config", preset, "--set", "model.vocab_size=32000", "--gpus", str(gpus),
                         "--gpu", "h100"]) == 0, preset
    assert os.path.isfile(PRESET_DIR / "llama-70b.yaml")


# -- Mixture of Experts: experts per EP rank, ZeRO over dp / ep, all-to-alls, the MoE layer's activations --

MOE_FEATURES = {"plain": {}, "shared_gated": dict(moe_shared_experts=1, moe_shared_gate=True), "gelu": dict(mlp="gelu")}


@pytest.mark.skipif(not __import__("megatrain.kernels").kernels.built(), reason="counts of the fused kernels")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("feature", MOE_FEATURES)
def test_moe_block_activation_bytes_are_what_autograd_saves(feature, dtype):
    """A MoE block saves what per_token_layer_bytes says of its attention and norms and, for its feed-forward,
    moe_mlp_bytes per token (dropless): the router's, each routed copy's, the shared MLP's; plus a few [E]-sized
    tensors per layer (the grouped matmuls' offsets, the load-balancing loss's counts)."""
    from megatrain.planning.memory import moe_mlp_bytes, per_token_layer_bytes

    m, block, (B, T, dt), saved = _saved_by_first_block(dtype, moe_experts=4, moe_top_k=2, moe_ffn=16,
                                                        **MOE_FEATURES[feature])
    w = dt.itemsize
    part = per_token_layer_bytes(m, 1, False, w)
    planned = B * T * (2 * part["norm"] + part["attention"] + moe_mlp_bytes(m, 1, w))
    assert 0 <= sum(saved.values()) - planned <= 16 * m.moe_experts, (sum(saved.values()), planned)


def test_expert_parallel_parameters_and_states_per_rank():
    """Mixtral's shape: a rank holds E / ep of each MoE layer's experts (TP-split too); ZeRO-1 keeps the experts'
    fp32 master and Adam states over the dp / ep ranks holding the same experts, the rest over dp."""
    from megatrain.parallel.sharding import is_expert_param
    from megatrain.planning.memory import parameter_table, stage_states

    m = load_config("mixtral-8x7b").model
    experts = sum(n for name, n, _ in parameter_table(m) if is_expert_param(name))
    assert experts == 32 * 8 * 3 * 4096 * 14336
    dense = total_params(m) - experts
    for tp, ep in ((1, 1), (1, 8), (2, 4)):
        st = stage_params(m, tp, 1, 0, ep)[0]
        assert st.expert == experts // (tp * ep) and st.moe_layers == 32
        assert st.dense == stage_params(m, tp, 1, 0)[0].dense  # the dense share is ep's business not
    st = stage_params(m, 1, 1, 0, 8)[0]
    states = stage_states(st, 64, 8, 1, "bf16", 1, False, False, False, 0)
    assert st.dense == dense and states.optimizer[0] == pytest.approx(12 * (dense / 64 + experts / 8 / 8))
    assert states.params[0] == 2 * (dense + experts // 8)
    whole = stage_states(stage_params(m, 1, 1, 0)[0], 64, 1, 1, "bf16", 1, False, False, False, 0)
    assert whole.optimizer[0] == pytest.approx(12 * total_params(m) / 64)  # ep 1: every parameter over dp


def test_expert_parallel_all_to_alls_enter_the_step():
    """Per MoE layer and micro-batch, 4 all-to-alls (dispatch and return, forward and backward) of tokens x top_k x
    d_model values, (ep - 1) / ep of them leaving the rank (every TP rank sends its group's tokens), over the EP
    group's link (ep ranks tp apart: within a node, or across); none at ep 1."""
    from megatrain.planning.timing import KNOWN_GPUS, Cluster

    cluster = Cluster(KNOWN_GPUS["h100"], 64, 8)
    sets = ["parallel.zero_stage=1", "train.global_batch_size=128"]
    plans = {(tp, ep): plan_layout(load_config("mixtral-8x7b", [*sets, f"parallel.tp={tp}", f"parallel.ep={ep}"]),
                                   64, cluster, "bf16") for tp, ep in ((1, 1), (1, 4), (1, 8), (2, 8))}
    assert plans[1, 1].time.ep_bytes == plans[1, 1].time.ep_s == 0
    for (tp, ep), plan in plans.items():
        t = plan.time
        assert t.ep_bytes == pytest.approx(4 * 32 * plan.grad_accum * 4096 * 2 * 4096 * 2 * (ep - 1) / ep)
        assert t.step_s == pytest.approx(t.compute_s + t.tp_s + t.pp_s + t.dp_s + t.offload_s + t.ep_s)
    within, across = (3600e9 / 8 * 0.8, 400e9 / 8 * 0.8)
    assert plans[1, 8].time.ep_bytes / plans[1, 8].time.ep_s == pytest.approx(within)  # 8 adjacent ranks
    assert plans[2, 8].time.ep_bytes / plans[2, 8].time.ep_s == pytest.approx(across)  # 8 ranks 2 apart: 2 nodes
    assert plans[1, 8].peak < plans[1, 4].peak < plans[1, 1].peak  # fewer experts per rank


def test_context_parallel_all_to_alls_and_activations():
    """Per block and micro-batch, q, k, v and the output exchanged forward and backward (and again when attention is
    recomputed) over the rank's b x s / cp tokens, (cp - 1) / cp leaving the rank, KV heads repeated when cp needs
    them; the activations are a cp-th of the sequence's plus attention's exchanged copies; none at cp 1."""
    from megatrain.planning.timing import KNOWN_GPUS, Cluster

    cluster = Cluster(KNOWN_GPUS["h100"], 16, 8)
    sets = ["parallel.zero_stage=3", "train.global_batch_size=16", "train.micro_batch_size=1", "data.seq_len=32768",
            "model.max_seq_len=32768", "train.activation_checkpointing=full"]
    plans = {(tp, cp): plan_layout(load_config("llama3.1-8b", [*sets, f"parallel.tp={tp}", f"parallel.cp={cp}"]),
                                   16, cluster, "bf16") for tp, cp in ((1, 1), (1, 8), (2, 8), (1, 16))}
    assert plans[1, 1].time.cp_bytes == plans[1, 1].time.cp_s == 0
    for (tp, cp), plan in plans.items():
        t = plan.time
        kv = 8 // tp  # Llama 3.1 8B: 32 query heads, 8 KV heads of 128
        width = (2 * 32 // tp + 2 * kv * max(1, cp // kv)) * 128
        assert t.cp_bytes == pytest.approx(3 * 32 * plan.grad_accum * 32768 // cp * width * 2 * (cp - 1) / cp)
        assert t.step_s == pytest.approx(t.compute_s + t.tp_s + t.pp_s + t.dp_s + t.offload_s + t.ep_s + t.cp_s)
    assert plans[1, 8].time.cp_bytes / plans[1, 8].time.cp_s == pytest.approx(3600e9 / 8 * 0.8)  # within a node
    assert plans[1, 16].time.cp_bytes / plans[1, 16].time.cp_s == pytest.approx(400e9 / 8 * 0.8)  # two nodes
    # full checkpointing keeps each block's input, the recomputed block its activations: a cp-th of the sequence's
    # (the fused LM head's weight gradient, 2 GB in fp32, does not shrink)
    assert plans[1, 8].acts[0].recompute < plans[1, 1].acts[0].recompute / 7
    assert plans[1, 8].acts[0].saved < plans[1, 1].acts[0].saved / 3
    assert plans[1, 8].peak < plans[1, 1].peak


def test_search_enumerates_context_parallelism():
    """A dense model: every cp dividing dp that splits its heads over tp x cp; a MoE model or a pipeline: cp 1."""
    from megatrain.planning.search import candidate_layouts

    dense = load_config("llama-1.3b", ["model.vocab_size=32000", "train.global_batch_size=64"])
    cps = {(c.parallel.tp, c.parallel.pp, c.parallel.cp) for c in candidate_layouts(dense, 16, 8)}
    assert {cp for tp, pp, cp in cps if tp * pp == 1} == {1, 2, 4, 8, 16}
    assert {cp for tp, pp, cp in cps if pp > 1} == {1}
    moe = load_config("olmoe-1b-7b", ["train.global_batch_size=64"])
    assert {c.parallel.cp for c in candidate_layouts(moe, 16, 8)} == {1}


def test_search_enumerates_expert_parallelism():
    """For a MoE model the search tries every ep dividing both dp and the experts; a dense model only ep 1."""
    from megatrain.planning.search import candidate_layouts

    cfg = load_config("olmoe-1b-7b", ["train.global_batch_size=64"])
    eps = {(c.parallel.tp, c.parallel.pp, c.parallel.ep) for c in candidate_layouts(cfg, 16, 8)}
    assert {ep for tp, pp, ep in eps if tp * pp == 1} == {1, 2, 4, 8, 16}
    assert {ep for tp, pp, ep in eps if tp * pp == 4} == {1, 2, 4}
    dense = load_config("llama-1.3b", ["model.vocab_size=32000", "train.global_batch_size=64"])
    assert {c.parallel.ep for c in candidate_layouts(dense, 16, 8)} == {1}


def test_plan_prints_active_parameters_and_expert_parallelism(capsys):
    """The plan of a MoE preset: total and active parameters, the experts per rank, the all-to-alls' time; --search
    lists ep and its best layout's --set line carries it."""
    base = ["plan", "--config", "olmoe-1b-7b", "--gpus", "16", "--gpu", "h100"]
    assert cli_main([*base, "--set", "parallel.ep=8", "--set", "parallel.zero_stage=1"]) == 0
    out = capsys.readouterr().out
    assert "(6.92B parameters, 1.28B active per token, vocab 50304)" in out, out
    assert "layout: tp 1 x pp 1 x dp 16 (ep 8)" in out and "experts: 8 of 64 per MoE layer on each rank" in out, out
    assert re.search(r"EP all-to-alls +[\d.]+ s \([\d.]+ GB per rank\)", out), out
    assert cli_main([*base, "--search", "--top", "3"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "peak GiB" in line)
    assert header.split()[:5] == ["#", "tp", "pp", "dp", "ep"], header
    best = out.split("best layout:\n")[1].splitlines()[0]
    ep = int(out.split("(ep ")[1].split(")")[0])
    assert ("parallel.ep=" in best) == (ep > 1), out


def test_pipeline_stage_compute_counts_its_own_moe_blocks():
    """moe_layers 'after 8' over 16 blocks in 2 stages: the dense stage 0 and the MoE stage 1 each count their own
    feed-forward FLOPs (the MoE's active ones: top-k experts and the router); the step waits for the slower."""
    from megatrain.flops import block_flops_per_token, moe_flops_per_token
    from megatrain.planning.timing import KNOWN_GPUS, Cluster

    cluster = Cluster(KNOWN_GPUS["h100"], 8, 8)
    cfg = load_config("olmoe-1b-7b", ["model.moe_layers=after 8", "parallel.pp=2", "parallel.zero_stage=1"])
    plan = plan_layout(cfg, 8, cluster, "bf16")
    assert [st.moe_layers for st in plan.stages] == [0, 8]
    m, T = cfg.model, cfg.data.seq_len
    attn_proj, _, mix = block_flops_per_token(m, T)
    dense = 2 * m.d_model * m.d_ff * 3
    moe = 2 * m.d_model * (8 * 1024) * 3 + 2 * m.d_model * 64
    assert moe_flops_per_token(m) == moe
    stage1 = 3 * (8 * (attn_proj + mix + moe) + 2 * m.d_model * m.vocab_size)
    assert 3 * 8 * (attn_proj + mix + dense) < stage1  # the MoE stage is the slower
    rate = 989e12 * 0.6
    assert plan.time.compute_s == pytest.approx(stage1 * T / rate * (plan.grad_accum + 1))
