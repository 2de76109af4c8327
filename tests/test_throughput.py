"""MFU a user can trust: the two FLOP conventions, the CPU peak measured once per machine (cached with its conditions)
and shared among the ranks of a node, and a 2-rank run on shared cores that never logs more than 100%."""
import dataclasses
import json
import os

import pytest
import torch

from distributed import run_distributed
from training_utils import make_byte_dataset, run_configs, small_sets

from megatrain import cpu_linear

cpu_linear.register_flop_formulas()  # (FlopCounterMode then counts the oneDNN products of the linear layers on a CPU)
MATMULS = {"aten.mm", "aten.addmm", "mkldnn._linear_pointwise"}


def test_whole_attention_adds_back_the_causal_half_and_nothing_else():
    """The comparable figure (PaLM, nanoGPT, Megatron count causal attention whole): the difference is exactly the
    halved QK^T and AV products, 3 x n_layers x (2 x 2 x s x d) / 2 per token; MLM models count it whole already."""
    from megatrain.config import load_config
    from megatrain.flops import train_flops_per_token

    m = load_config("tiny").model
    s = 128
    halved, whole = train_flops_per_token(m, s), train_flops_per_token(m, s, whole_attention=True)
    assert whole - halved == 3 * m.n_layers * (2 * 2 * s * m.d_model) / 2
    m = dataclasses.replace(m, objective="mlm")
    assert train_flops_per_token(m, s) == train_flops_per_token(m, s, whole_attention=True) == whole


@pytest.mark.parametrize("model_sets", [[], ["model.norm=layernorm", "model.mlp=gelu", "model.position=learned",
                                                "model.tie_embeddings=true", "model.bias=true"]], ids=["llama", "gpt-tied"])
@pytest.mark.parametrize("frozen", ["none", "lora", "first-2-blocks", "lora-on-attention"])
def test_the_flop_count_is_what_autograd_computes_with_frozen_weights(frozen, model_sets):
    """The count an MFU divides is torch's own FlopCounterMode count of a forward and backward (matmuls; attention's
    products are left out of both by taking seq_len 0 in the formula): a LoRA fine-tune computes no weight gradient for
    its frozen matrices (the 3x count claimed 1.5x their FLOPs, and logged MFU 100% in the SmolLM2 QA example), blocks
    before the first trainable one run no backward, and the adapters add their own."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatrain.config import load_config
    from megatrain.heads import apply_lora
    from megatrain.model import Transformer
    from megatrain.flops import frozen_flops_adjustment, train_flops_per_token

    m = load_config("tiny", ["model.vocab_size=512", "model.fused_kernels=off", *model_sets]).model
    torch.manual_seed(0)
    model = Transformer(m)
    if frozen.startswith("lora"):
        apply_lora(model, 8, 16, 0.0, "qkv,o_proj" if frozen == "lora-on-attention" else "qkv,o_proj,gate_up,up,down")
    elif frozen == "first-2-blocks":
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith(("embed.", "pos_embed.", "layers.0.", "layers.1."))
    x = torch.randint(0, 512, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    counted = counter.get_total_flops() / x.numel()
    assert set(map(str, counter.get_flop_counts()["Global"])) <= MATMULS  # matmuls, no attention kernel
    assert train_flops_per_token(m, 0) + frozen_flops_adjustment(model, m, 0) == counted
    if frozen != "none":
        assert frozen_flops_adjustment(model, m, 0) < 0


@pytest.mark.parametrize("lora", [False, True])
def test_the_flop_count_with_unlabeled_tokens_is_what_autograd_computes(lora):
    """Where only the labeled rows reach the LM head (sparse_labels: sft, MLM), a token without a label spares the
    head's FLOPs: the count of the window's tokens and labeled tokens is FlopCounterMode's."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatrain.config import load_config
    from megatrain.heads import apply_lora
    from megatrain.model import IGNORE_INDEX, Transformer
    from megatrain.flops import frozen_flops_adjustment, last_block_tail_flops, train_flops_per_token
    from megatrain.tasks.lm import CausalLM
    from megatrain.training.throughput import Throughput, unlabeled_token_saving

    m = load_config("tiny", ["model.vocab_size=512", "model.fused_kernels=off"]).model
    torch.manual_seed(0)
    model = Transformer(m)
    model.sparse_labels = True
    if lora:
        apply_lora(model, 8, 16, 0.0, "qkv,o_proj,gate_up,up,down")
    x = torch.randint(0, 512, (2, 32))
    y = x.clone()
    y[:, :20] = IGNORE_INDEX  # 24 of the 64 tokens have a label
    with FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    saving = unlabeled_token_saving(model, m, 0, CausalLM())
    assert saving == 2 * m.d_model * m.vocab_size * (2 if lora else 3) + last_block_tail_flops(model, m)
    per_token = train_flops_per_token(m, 0) + frozen_flops_adjustment(model, m, 0)
    assert Throughput(per_token, per_token, 0.0, saving).flops(64, 24) == counter.get_total_flops()
    model.sparse_labels = False  # every row through the head and the last block: nothing spared
    assert unlabeled_token_saving(model, m, 0, CausalLM()) == 0.0


@pytest.mark.parametrize("lora", [False, True])
def test_the_flop_count_of_a_classifier_scoring_the_last_token_is_what_autograd_computes(lora):
    """A classifier pooling the last token runs the last block's o_proj and MLP at that token alone: each other
    token spares their FLOPs, and the count of the window's tokens and examples is FlopCounterMode's."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatrain.config import load_config
    from megatrain.flops import frozen_flops_adjustment, last_block_tail_flops, train_flops_per_token
    from megatrain.heads import SequenceClassifier, apply_lora
    from megatrain.training.throughput import Throughput, unlabeled_token_saving

    m = load_config("tiny", ["model.vocab_size=512", "model.fused_kernels=off"]).model
    torch.manual_seed(0)
    model = SequenceClassifier(m, n_labels=3)
    if lora:
        apply_lora(model, 8, 16, 0.0, "qkv,o_proj,gate_up,up,down")
    x = torch.randint(0, 512, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([0, 2])).backward()
    saving = unlabeled_token_saving(model, m, 0, None)  # (a classifier's saving needs no task)
    assert saving == last_block_tail_flops(model, m) > 0
    no_head = dataclasses.replace(m, vocab_size=0)  # the classifier's count: no LM head; its score's 2 x 3 x d each
    per_token = train_flops_per_token(no_head, 0) + frozen_flops_adjustment(model, no_head, 0)
    score = 3 * 2 * m.d_model * 3 * 2 / 64  # (on the 2 pooled rows only: forward, input and weight gradient)
    assert Throughput(per_token, per_token, 0.0, saving).flops(64, 2) + score * 64 == counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.quiet
def test_cpu_peak_is_measured_once_per_quiet_machine_and_cached_with_its_conditions(tmp_path, monkeypatch):
    from megatrain.hostinfo import cpu_cores
    from megatrain.training import throughput

    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine, whatever else runs beside the test
    measured = []
    real = throughput.measured_matmul_tflops
    monkeypatch.setattr(throughput, "measured_matmul_tflops", lambda *a, **k: measured.append(1) or real(*a, **k))
    threads = torch.get_num_threads()
    peak, where = throughput.cpu_node_peak_tflops()
    assert peak > 0 and "measured now" in where and measured == [1]
    assert torch.get_num_threads() == threads  # measured on every core, then put back
    table = json.load(open(tmp_path / "cpu-peak.json"))
    (key, entry), = table.items()
    assert f"{cpu_cores()} cores" in key and "torch" in key
    assert entry["tflops"] == pytest.approx(peak, abs=1e-4)  # the file keeps 4 decimals
    assert {"measured", "load_average_1min", "how"} <= set(entry) and "1024 x 1024" in entry["how"]
    again, where = throughput.cpu_node_peak_tflops()  # the next run reads it: no second measurement
    assert again == entry["tflops"] and "cached in" in where and measured == [1]
    (tmp_path / "cpu-peak.json").write_text("{not json")  # a damaged cache is measured again and rewritten
    throughput.cpu_node_peak_tflops()
    assert measured == [1, 1] and list(json.load(open(tmp_path / "cpu-peak.json"))) == [key]
    # measured while other work ran: measured again, and the higher figure kept (a busy figure is too low)
    busy = {key: dict(entry, load_average_1min=cpu_cores() * 4.0, tflops=entry["tflops"] / 10)}
    (tmp_path / "cpu-peak.json").write_text(json.dumps(busy))
    peak, where = throughput.cpu_node_peak_tflops()
    assert measured == [1, 1, 1] and peak > busy[key]["tflops"] and "measured now" in where
    assert json.load(open(tmp_path / "cpu-peak.json"))[key]["tflops"] == pytest.approx(peak, abs=1e-4)
    busy = {key: dict(entry, load_average_1min=cpu_cores() * 4.0, tflops=entry["tflops"] * 10)}
    (tmp_path / "cpu-peak.json").write_text(json.dumps(busy))
    peak, where = throughput.cpu_node_peak_tflops()  # a higher busy figure than now: kept, and said so
    assert measured == [1, 1, 1, 1] and peak == busy[key]["tflops"] and "busy then" in where


def test_ranks_sharing_a_node_split_its_cores_unless_omp_num_threads_says(monkeypatch):
    from megatrain.hostinfo import cpu_cores
    from megatrain.training.dist_env import share_cpu_cores

    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        line = share_cpu_cores(2)
        assert torch.get_num_threads() == max(1, cpu_cores() // 2)
        assert f"{torch.get_num_threads()} per rank" in line and f"2 rank(s) of the job share this node's {cpu_cores()}" in line
        torch.set_num_threads(threads)
        assert "torch's default" in share_cpu_cores(1) and torch.get_num_threads() == threads
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert "OMP_NUM_THREADS=1" in share_cpu_cores(2) and torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.quiet
def test_two_ranks_on_shared_cores_never_log_mfu_above_100_percent(tmp_path, monkeypatch):
    """Issue 13 saw a 2-rank tiny run on 2 cores log MFU 110-113%: each rank measured torch.mm on every core while the
    other rank ran too, and both trained on every core. Now one rank measures the node while the other waits, each
    rank's peak is half of it, and each trains on its half of the cores."""
    monkeypatch.setenv("MEGATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data = make_byte_dataset(tmp_path)
    ck = str(tmp_path / "ck")
    big_matmuls = {"model.d_model": 256, "model.n_heads": 4, "data.seq_len": 128, "model.max_seq_len": 128,
                   "train.global_batch_size": 16, "train.micro_batch_size": 8, "train.max_steps": 8,
                   "train.log_interval": 2, "train.eval_interval": 4, "train.eval_iters": 1, "checkpoint.interval": 0,
                   "parallel.zero_stage": 2, "logging.peak_tflops": 0.0}
    run_distributed(run_configs, 2, [small_sets(data, ck, **big_matmuls)], timeout=300)
    rows = [json.loads(x) for x in open(os.path.join(ck, "metrics.jsonl"))]
    train = [r for r in rows if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8]  # (step 1: train.log_first_step)
    for r in train:
        assert 0 < r["mfu"] <= 1.0, r
        assert r["mfu_whole_attention"] > r["mfu"]
    assert len(json.load(open(tmp_path / "cache" / "cpu-peak.json"))) == 1  # measured once, by one rank
