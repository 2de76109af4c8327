"""Slow tier: fine-tuning under several ranks equals one rank (ZeRO-2 data parallel; LoRA under TP=2; sft's
generation metrics under ZeRO-2 and ZeRO-3), and a pretraining checkpoint of any layout starts fine-tuning exactly
where its consolidated weights do."""
import json
import os
import random

import pytest

from distributed import run_distributed
from test_finetune import finetune_runs, ft_sets, sentiment, task_for, write
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The same small model pretrained 3 steps under 1 rank, TP=2 x PP=2, and 2-rank ZeRO-3."""
    tmp = tmp_path_factory.mktemp("pretrained")
    data = make_byte_dataset(tmp)
    runs = {"one": (1, {}), "tp2pp2": (4, {"parallel.tp": 2, "parallel.pp": 2}), "zero3": (2, {"parallel.zero_stage": 3})}
    out = {k: str(tmp / k) for k in runs}
    for name, (world, over) in runs.items():
        run_distributed(run_configs, world, [small_sets(data, out[name], **{"train.max_steps": 3, "checkpoint.interval": 0,
                                                                             "train.eval_interval": 0}, **over)],
                        timeout=600)
    return out


def _conll(path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(["alice", "bob", "paris", "rome", "went", "to", "the"]) for _ in range(rng.randint(3, 7))]
        tags = ["B-PER" if w in ("alice", "bob") else "B-LOC" if w in ("paris", "rome") else "O" for w in words]
        rows.append("\n".join(f"{w}\t{t}" for w, t in zip(words, tags)) + "\n")
    return write(path, rows)


@pytest.mark.slow
def test_two_ranks_zero2_equal_one_rank(pretrained, tmp_path):
    """classify, tokens and sft (packed, masked: the loss is normalised over the global batch) under 2-rank ZeRO-2."""
    init = pretrained["one"]
    files = {"classify": write(tmp_path / "c.jsonl", sentiment(64, 0)),
             "tokens": _conll(tmp_path / "t.conll", 64, 0),
             "sft": write(tmp_path / "s.jsonl", [{"prompt": f"add {i % 7} and {i % 5}", "response": str(i % 7 + i % 5)}
                                                 for i in range(64)])}
    runs = {w: [(f"finetune-{k}", ft_sets(init, str(tmp_path / f"{k}{w}"), f, f, **{"parallel.zero_stage": 2}))
                for k, f in files.items()] for w in (1, 2)}
    for world, rs in runs.items():
        run_distributed(finetune_runs, world, rs, timeout=900)
    for k in files:
        one, two = str(tmp_path / f"{k}1"), str(tmp_path / f"{k}2")
        assert_close_curves(losses(one), losses(two), rtol=1e-5)
        assert_close_curves(losses(one, "eval"), losses(two, "eval"), rtol=1e-5)


@pytest.mark.slow
def test_lora_under_tensor_parallelism_equals_the_unsplit_lora_run(pretrained, tmp_path):
    init = pretrained["one"]
    train = write(tmp_path / "c.jsonl", sentiment(64, 1))
    lora = {"finetune.lora_rank": 4, "finetune.lora_alpha": 8.0, "train.lr": 1e-2}
    one, tp2 = str(tmp_path / "one"), str(tmp_path / "tp2")
    run_distributed(finetune_runs, 1, [("finetune-classify", ft_sets(init, one, train, train, **lora))], timeout=600)
    layouts = {"tp2": {"parallel.tp": 2}, **{f"dp2z{z}": {"parallel.zero_stage": z} for z in (0, 2, 3)}}
    run_distributed(finetune_runs, 2, [("finetune-classify", ft_sets(init, str(tmp_path / name), train, train, **lora,
                                                                        **over)) for name, over in layouts.items()],
                    timeout=900)
    for name in layouts:  # LoRA under TP=2, and under ZeRO-0/2/3 data parallel (frozen base weights partitioned too)
        assert_close_curves(losses(one), losses(str(tmp_path / name)), rtol=1e-5)
        assert_close_curves(losses(one, "eval"), losses(str(tmp_path / name), "eval"), rtol=1e-5)
    # only the adapters and the head were trained: every base weight is the pretrained one
    from megatrain.checkpoint.reader import CheckpointReader

    for name in ("tp2", "dp2z3"):
        with CheckpointReader(init) as base, CheckpointReader(str(tmp_path / name)) as tuned:
            names = tuned.names()
            assert any("lora_A" in n for n in names) and "score.weight" in names
            for n in base.names():
                if n in names:
                    assert base.tensor(n).equal(tuned.tensor(n)), (name, n)
    # consolidate writes the merged weights (W + alpha/r B A): a plain classifier computing what the LoRA model does
    import torch

    from megatrain.convert.consolidate import consolidate
    from megatrain.predict import load

    merged = str(tmp_path / "merged")
    consolidate(tp2, merged)
    lora_model, cfg, _, _, _ = load(tp2)
    plain, plain_cfg, _, _, _ = load(merged)
    assert cfg.finetune.lora_rank == 4 and plain_cfg.finetune.lora_rank == 0
    assert not any("lora" in n for n, _ in plain.named_parameters())
    x = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(plain(x, segments=torch.ones_like(x)), lora_model(x, segments=torch.ones_like(x)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_init_from_any_pretraining_layout_gives_the_first_loss_of_its_consolidated_weights(pretrained, tmp_path):
    from megatrain.convert.consolidate import consolidate

    train = write(tmp_path / "c.jsonl", sentiment(32, 2))
    runs, first = [], {}
    for name in ("tp2pp2", "zero3"):
        full = str(tmp_path / f"{name}-full")
        consolidate(pretrained[name], full)
        for src, tag in ((pretrained[name], "sharded"), (full, "consolidated")):
            runs.append(("finetune-classify", ft_sets(src, str(tmp_path / f"{name}-{tag}"), train, train,
                                                      **{"train.max_steps": 2})))
    run_distributed(finetune_runs, 1, runs, timeout=600)
    for name in ("tp2pp2", "zero3"):
        a, b = losses(str(tmp_path / f"{name}-sharded")), losses(str(tmp_path / f"{name}-consolidated"))
        assert a[1] == b[1] and a[2] == b[2], (name, a, b)
        first[name] = a[1]
    print("first fine-tune loss from tp2pp2 / zero3 checkpoints and their consolidations:", json.dumps(first))
    assert os.path.isfile(str(tmp_path / "tp2pp2-sharded" / "latest"))


GENERATION = ["finetune.generation_metrics=[exact_match, rouge, bleu, chrf]", "finetune.generation_max_new_tokens=6"]


def _sft_prompts(path) -> str:
    return write(path, [{"prompt": p, "response": f"{p} {i}"} for i, p in enumerate(
        ["add 2 and 3", "café 東京", "the quick brown fox", "hi", "say alpha", "a b c d e f g", "zzz"])])


def _responses(rank, world, path, out):
    """SFT.responses of a seeded random model under `world` data-parallel ranks, as rank 0 and rank 1 hold them."""
    import types

    import torch
    import torch.distributed as dist

    from megatrain.model import Transformer
    from megatrain.parallel.topology import Layout
    from megatrain.predict import LocalEngine

    cfg, task = task_for("sft", GENERATION)
    torch.manual_seed(3)
    model = Transformer(cfg.model).eval()
    grid = types.SimpleNamespace(get_data_parallel_group=lambda: dist.group.WORLD)
    run = types.SimpleNamespace(cfg=cfg, layout=Layout(1, 1, world), dp_rank=rank, grid=grid)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(task.responses(run, LocalEngine(model), task.encode(path, train=False)), f)


@pytest.mark.slow
def test_generation_under_two_data_parallel_ranks_gives_one_ranks_responses_in_file_order(tmp_path):
    import torch

    from megatrain.model import Transformer
    from megatrain.predict import LocalEngine, LocalRun

    path = _sft_prompts(tmp_path / "s.jsonl")
    run_distributed(_responses, 2, path, str(tmp_path / "said"), timeout=300)
    cfg, task = task_for("sft", GENERATION)
    torch.manual_seed(3)
    model = Transformer(cfg.model).eval()
    alone = task.responses(LocalRun(cfg, 2), LocalEngine(model), task.encode(path, train=False))
    assert len(set(alone)) > 3  # (a random model: the order shows)
    for rank in (0, 1):
        assert json.load(open(tmp_path / f"said.{rank}")) == alone


@pytest.mark.slow
def test_sft_generation_metrics_under_zero2_and_zero3_equal_one_rank(pretrained, tmp_path):
    """Each rank generates its share from whole weights (ZeRO-3's gathered into a copy), and the scores are the
    one-rank run's."""
    init, train = pretrained["one"], _sft_prompts(tmp_path / "s.jsonl")
    gen = {"finetune.generation_metrics": ["exact_match", "rouge", "bleu", "chrf"],
           "finetune.generation_max_new_tokens": 6, "finetune.test_file": train}
    run_distributed(finetune_runs, 1, [("finetune-sft", ft_sets(init, str(tmp_path / "one"), train, train, **gen))],
                    timeout=600)
    run_distributed(finetune_runs, 2, [("finetune-sft", ft_sets(init, str(tmp_path / f"z{z}"), train, train, **gen,
                                                                **{"parallel.zero_stage": z})) for z in (2, 3)],
                    timeout=900)
    scores = ["exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf"]
    assert max(losses(str(tmp_path / "one"), "eval", "val_chrf").values()) > 0  # (something to compare)
    for kind, prefix in (("eval", "val"), ("test", "test")):
        for z in (2, 3):
            for k in scores:
                assert_close_curves(losses(str(tmp_path / "one"), kind, f"{prefix}_{k}"),
                                    losses(str(tmp_path / f"z{z}"), kind, f"{prefix}_{k}"), rtol=1e-6)
