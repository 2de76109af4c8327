"""Fine-tuning a Mixture-of-Experts model: LoRA adapters on the routed experts (the math, fast tier), and full and
LoRA fine-tuning under expert parallelism against one rank (slow tier, gloo processes)."""
import json
import os

import pytest
import torch

from distributed import run_distributed
from megatrain.moe import GroupedExperts

# -- fast tier: the experts' adapters -----------------------------------------------------------------------------


def _experts(mlp: str = "swiglu") -> GroupedExperts:
    torch.manual_seed(0)
    ex = GroupedExperts(4, 8, 6, mlp, "none").double()
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.3)
    return ex


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_expert_lora_equals_a_per_expert_reference_and_trains_only_the_adapters(mlp):
    lora = _experts(mlp)
    rows, counts = torch.randn(11, 8, dtype=torch.float64), torch.tensor([3, 0, 5, 3])
    plain = lora(rows, counts)
    up = "gate_up" if mlp == "swiglu" else "up"
    lora.add_lora([up, "down"], rank=2, alpha=6.0)
    assert getattr(lora, f"{up}_lora_A").shape == (4, 2, 8) and lora.down_lora_B.shape == (4, 8, 2)
    torch.testing.assert_close(lora(rows, counts), plain, rtol=0, atol=0)  # B = 0: unchanged
    for n, p in lora.named_parameters():
        p.requires_grad = "lora_" in n
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    # the reference: each expert's weights merged (W + alpha/r B A), its rows through a plain MLP
    ref = _experts(mlp)
    with torch.no_grad():
        for w in (up, "down"):
            a, b = getattr(lora, f"{w}_lora_A"), getattr(lora, f"{w}_lora_B")
            getattr(ref, w).add_(3.0 * b @ a)
    want = torch.cat([ref(r, torch.eye(4, dtype=torch.long)[e] * len(r))  # expert e's rows alone, looped
                      for e, r in enumerate(rows.split(counts.tolist()))])
    got = lora(rows, counts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.square().sum().backward()
    for n, p in lora.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


# -- slow tier: fine-tuning a MoE checkpoint under expert parallelism, against one rank ----------------------------

MOE = {"model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_ffn": 32, "model.moe_aux_loss": 0.01,
       "train.precision": "fp32"}
FT = {**MOE, "train.max_steps": 4, "train.eval_interval": 2, "checkpoint.interval": 2, "finetune.doc_stride": 16}


@pytest.fixture(scope="module")
def moe_init(tmp_path_factory):
    """A tiny MoE language model (4 experts, top-2) pretrained 2 steps on one rank, and each task's examples."""
    from test_finetune import sentiment, write
    from test_finetune_parallel import _conll
    from training_utils import make_byte_dataset, run_configs, small_sets

    tmp = tmp_path_factory.mktemp("moe_ft")
    ck = str(tmp / "lm")
    run_distributed(run_configs, 1, [small_sets(make_byte_dataset(tmp), ck, **MOE, **{
        "train.max_steps": 2, "checkpoint.interval": 0, "train.eval_interval": 0})], timeout=300)
    qa = [{"id": str(i), "question": "who went?", "context": f"{name} went to {city} on day {i % 9}",
           "answers": {"text": [name], "answer_start": [0]}}
          for i, (name, city) in enumerate([("alice", "paris"), ("bob", "rome")] * 16)]
    files = {"sft": write(tmp / "s.jsonl", [{"prompt": f"add {i % 7} and {i % 5}", "response": str(i % 7 + i % 5)}
                                            for i in range(32)]),
             "classify": write(tmp / "c.jsonl", sentiment(32, 0)),
             "tokens": _conll(tmp / "t.conll", 32, 0),
             "qa": write(tmp / "q.jsonl", qa)}
    return ck, files


def _ft(init: str, out: str, train: str, **over) -> list[str]:
    from test_finetune import ft_sets

    return ft_sets(init, out, train, train, **{**FT, **over})


def _close(a: dict, b: dict, what: str, rtol: float = 1e-5) -> float:
    assert sorted(a) == sorted(b) and a, (what, a, b)
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst <= rtol, (what, a, b)
    return worst


@pytest.mark.slow
def test_full_finetuning_of_a_moe_model_under_ep2_equals_one_rank(moe_init, tmp_path):
    """sft, classify, tokens and qa on a MoE checkpoint: EP=2 on 2 ranks (ZeRO-1 and ZeRO-2) gives one rank's train
    and eval losses (fp32, 1e-5), and its checkpoint reads back as the one-rank run's (every expert) and predicts
    as it does."""
    from test_finetune import finetune_runs
    from training_utils import losses

    from megatrain.checkpoint.reader import CheckpointReader
    from megatrain.predict import load

    init, files = moe_init
    zero = {"sft": 2, "classify": 1, "tokens": 2, "qa": 1}
    run_distributed(finetune_runs, 1, [(f"finetune-{k}", _ft(init, str(tmp_path / f"{k}1"), f)) for k, f in files.items()],
                    timeout=600)
    run_distributed(finetune_runs, 2, [(f"finetune-{k}", _ft(init, str(tmp_path / f"{k}2"), f, **{
        "parallel.ep": 2, "parallel.zero_stage": zero[k]})) for k, f in files.items()], timeout=600)
    report = {}
    for k in files:
        one, two = str(tmp_path / f"{k}1"), str(tmp_path / f"{k}2")
        report[k] = (_close(losses(one), losses(two), k), _close(losses(one, "eval"), losses(two, "eval"), k))
        with CheckpointReader(one) as a, CheckpointReader(two) as b:
            assert b.layout["ep"] == 2 and a.names() == b.names()
            # (not qa's span.bias: its gradient is 0 up to rounding, a shift of every position's logit, which
            # Adam's normalisation turns into steps of rounding noise; what it scores is the same)
            for n in (n for n in a.names() if n != "span.bias"):
                torch.testing.assert_close(b.tensor(n), a.tensor(n), rtol=1e-4, atol=1e-5, msg=f"{k}: {n}")
        m1, m2 = load(one)[0], load(two)[0]
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y1, y2 = m1(x, segments=torch.ones_like(x)), m2(x, segments=torch.ones_like(x))
            if k == "qa":  # what a span scores: the softmax over positions
                y1, y2 = y1.log_softmax(1), y2.log_softmax(1)
            torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5, msg=k)
    print("worst relative train / eval loss difference, EP=2 vs one rank:", json.dumps(report))


@pytest.mark.slow
def test_lora_on_the_experts_under_ep2_equals_one_rank_resumes_and_merges(moe_init, tmp_path):
    """LoRA sft (adapters on every routed expert and the attention) under EP=2 x ZeRO-2: one rank's losses (1e-5);
    resumed from step 2 it continues the same curve; the frozen experts of both EP ranks are saved (the pretrained
    ones), and merge_lora reads W + alpha/r B @ A for every expert."""
    from test_finetune import finetune_runs
    from training_utils import losses

    from megatrain.checkpoint.reader import CheckpointReader

    init, files = moe_init
    lora = {"finetune.lora_rank": 4, "finetune.lora_alpha": 8.0, "train.lr": 1e-2}
    one, two, part, tp2 = (str(tmp_path / n) for n in ("one", "two", "part", "tp2"))
    ep2 = {**lora, "parallel.ep": 2, "parallel.zero_stage": 2}
    run_distributed(finetune_runs, 1, [("finetune-sft", _ft(init, one, files["sft"], **lora))], timeout=300)
    run_distributed(finetune_runs, 2, [("finetune-sft", _ft(init, d, files["sft"], **ep2)) for d in (two, part)] +
                    [("finetune-sft", _ft(init, tp2, files["sft"], **lora, **{"parallel.tp": 2}))], timeout=300)
    worst = _close(losses(one), losses(two), "lora"), _close(losses(one, "eval"), losses(two, "eval"), "lora eval")
    # under TP=2 the experts' adapters are cut as their weights (B's rows of gate_up, A's columns of down)
    worst += _close(losses(one), losses(tp2), "lora tp2"), _close(losses(one, "eval"), losses(tp2, "eval"), "tp2 eval")
    with open(os.path.join(part, "latest"), "w") as f:
        f.write("step00000002")
    run_distributed(finetune_runs, 2, [("finetune-sft", _ft(init, part, files["sft"], **ep2))], timeout=300)
    assert {s: losses(part)[s] for s in (3, 4)} == {s: losses(two)[s] for s in (3, 4)}
    print("worst relative train / eval loss difference, LoRA EP=2 and TP=2 vs one rank:", worst)
    with CheckpointReader(init) as base, CheckpointReader(two) as tuned, \
            CheckpointReader(two, merge_lora=True) as merged:
        names = tuned.names()
        assert "layers.0.mlp.experts.gate_up_lora_A" in names and "layers.1.mlp.experts.down_lora_B" in names
        assert not any("lora" in n for n in merged.names())
        scale = 8.0 / 4
        for layer in range(2):
            for w in ("gate_up", "down"):
                n = f"layers.{layer}.mlp.experts.{w}"
                assert tuned.tensor(n).equal(base.tensor(n)), n  # frozen, every EP rank's experts saved
                a, b = tuned.tensor(n + "_lora_A"), tuned.tensor(n + "_lora_B")
                assert a.shape[0] == b.shape[0] == 4 and b.abs().max() > 0, n
                want = base.tensor(n) + scale * torch.stack([b[e] @ a[e] for e in range(4)])
                torch.testing.assert_close(merged.tensor(n), want, rtol=1e-6, atol=1e-7, msg=n)


def test_lora_on_a_moe_model_adapts_the_routed_and_the_shared_experts_and_merges_to_a_plain_model():
    """apply_lora on a MoE block: adapters on every routed expert and on the shared expert's projections (the router
    frozen); W + alpha/r B @ A (per expert) in a model without adapters computes the same; the sharding table cuts
    the experts' adapters as their weights."""
    from megatrain.config import ModelConfig
    from megatrain.heads import apply_lora
    from megatrain.model import Transformer
    from megatrain.parallel.sharding import REPLICATED, Split, is_expert_param, split_of

    cfg = ModelConfig(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=16, moe_experts=4,
                      moe_top_k=2, moe_ffn=16, moe_shared_experts=1)
    torch.manual_seed(0)
    plain = Transformer(cfg).double()
    lora = apply_lora(Transformer(cfg), 2, 4.0, 0.0, "qkv,gate_up,down").double()
    lora.load_state_dict(plain.state_dict(), strict=False)
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert {"layers.0.mlp.experts.gate_up_lora_A", "layers.0.mlp.experts.down_lora_B",
            "layers.0.mlp.shared.gate_up.lora_A", "layers.1.mlp.shared.down.lora_B"} <= trained
    assert all("lora_" in n for n in trained) and len(trained) == 2 * 2 * 5  # qkv, shared x2, experts x2
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lora(x), plain(x), rtol=0, atol=0)  # B = 0: unchanged
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
        weights = dict(plain.named_parameters())
        ours = dict(lora.named_parameters())
        for n in trained:
            if n.endswith("lora_A"):
                base = n.removesuffix(".lora_A") + ".weight" if n.endswith(".lora_A") else n.removesuffix("_lora_A")
                weights[base].add_(2.0 * ours[n[:-1] + "B"] @ ours[n])  # (batched over the experts: [E, out, in])
    torch.testing.assert_close(lora(x), plain(x), rtol=1e-10, atol=1e-12)
    assert is_expert_param("layers.0.mlp.experts.gate_up_lora_B") and not is_expert_param("layers.0.mlp.shared.gate_up.lora_B")
    assert split_of("layers.0.mlp.experts.gate_up_lora_B", cfg) == Split(1, (16, 16))
    assert split_of("layers.0.mlp.experts.gate_up_lora_A", cfg) == REPLICATED
    assert split_of("layers.0.mlp.experts.down_lora_A", cfg) == Split(2)
    assert split_of("layers.0.mlp.experts.down_lora_B", cfg) == REPLICATED
