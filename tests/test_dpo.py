"""Preference tuning (finetune.task=dpo, tasks/preference.py): the pairs as sft renders them, the loss against a hand
computation from per-token log-probabilities, the training log's reward figures against an evaluation's, the
reference computed once and reused and a run whose reward accuracy rises."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from test_finetune import cli, finetune_runs, ft_sets, pretrained, task_for, write  # noqa: F401
from training_utils import losses

from megatrain.model import IGNORE_INDEX, Transformer
from megatrain.tasks.preference import REFERENCE_FILE, dpo_loss, sequence_logps


class ModelEngine:
    """A model as the training loop calls its engine: forwards counted, a plain backward, no update."""

    def __init__(self, model):
        self.module, self.device, self.forwards = model, torch.device("cpu"), 0

    def __call__(self, *args):
        self.forwards += 1
        return self.module(*args)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def fp16_enabled(self):
        return False

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()


def pairs(n: int) -> list[dict]:
    """The chosen answer says the word twice, the rejected once: a preference a tiny model can learn."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    return [{"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": f"{w}"} for w in (words * n)[:n]]


def test_each_response_is_scored_as_sft_would_train_it_and_the_loss_matches_a_hand_computation(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [
        {"prompt": "add 2 and 3", "chosen": "5", "rejected": "six"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": "go away"}])
    cfg, task = task_for("dpo", ["finetune.dpo_beta=0.5", "finetune.dpo_label_smoothing=0.1"])
    _, sft = task_for("sft", ["finetune.pack=false"])
    items = task.encode(path, train=False).items
    rows = sft.encode(write(tmp_path / "sft.jsonl", [{"prompt": "add 2 and 3", "response": "5"},
                                                      {"prompt": "add 2 and 3", "response": "six"}]), False).items
    assert (items[0]["chosen"][0], items[0]["chosen"][1]) == (rows[0]["ids"], rows[0]["labels"])
    assert (items[0]["rejected"][0], items[0]["rejected"][1]) == (rows[1]["ids"], rows[1]["labels"])
    items[0]["ref"], items[1]["ref"] = (-3.0, -4.0), (-1.5, -0.5)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    batch = task.collate(items, "cpu")
    assert batch.tokens.shape[0] == 4 and task.targets(batch) == 2
    loss = task.loss(ModelEngine(model), batch)
    by_hand = []
    for i, it in enumerate(items):
        lp = []
        for x, y in (it["chosen"], it["rejected"]):
            logits = model(torch.tensor([x]))
            nll = F.cross_entropy(logits[0], torch.tensor(y), ignore_index=IGNORE_INDEX, reduction="sum")
            lp.append(-float(nll))
        h = 0.5 * ((lp[0] - it["ref"][0]) - (lp[1] - it["ref"][1]))
        by_hand.append(-0.9 * math.log(1 / (1 + math.exp(-h))) - 0.1 * math.log(1 / (1 + math.exp(h))))
    assert abs(float(loss) - sum(by_hand) / 2) < 1e-5


def test_a_training_step_logs_the_reward_figures_an_evaluation_of_its_pairs_reports(tmp_path):
    """train_step's sums over 4 micro-batches (of 2 pairs) give the evaluation's reward accuracy, margin and mean
    rewards of the step's 8 pairs, from the training forwards alone (one per micro-batch), kept on the device
    until the log line reads them."""
    from types import SimpleNamespace

    from megatrain.config import validate_world
    from megatrain.parallel.topology import Layout
    from megatrain.training.loop import Window, train_step

    cfg, task = task_for("dpo", ["finetune.dpo_beta=0.5", "train.global_batch_size=8", "train.micro_batch_size=2"])
    examples = task.encode(write(tmp_path / "pairs.jsonl", pairs(8)), train=True)
    torch.manual_seed(0)
    engine = ModelEngine(Transformer(cfg.model))
    with torch.no_grad():  # references around the policy's own log-probabilities: rewards of both signs
        pi = task.logps(engine, task.collate(examples.items, "cpu"))
    for item, ref in zip(examples.items, (pi + torch.randn(pi.shape)).tolist()):
        item["ref"] = tuple(ref)
    run = SimpleNamespace(cfg=cfg, layout=Layout(tp=1, pp=1, dp=1), dp_rank=0, grad_accum=validate_world(cfg, 1),
                          rank=0)
    engine.forwards = 0
    share, _, sums = train_step(run, engine, task, examples, 0)
    assert engine.forwards == run.grad_accum == 4 and isinstance(sums, torch.Tensor) and sums.device == engine.device
    window = Window()
    window.add(share, sums)
    logged = window.task_row(run, task)
    results = task.run_items(run, engine, examples)[1]
    want = task.score(examples, results)
    assert sorted(logged) == sorted(want) == ["chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin"]
    assert 0 < want["reward_accuracy"] < 1, want
    for key in want:
        assert abs(logged[key] - want[key]) < 1e-5, (key, logged, want)
    assert abs(float(share) - sum(task.train_loss(engine, task.collate([it], "cpu"))[0].item()
                                  for it in examples.items) / 8) < 1e-5


def test_sequence_logps_sum_each_rows_targets_only():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11)
    labels = torch.tensor([[1, 2, -100, -100, -100], [-100, -100, -100, -100, -100], [4, 4, 4, 4, 4]])
    got = sequence_logps(None, logits, labels)
    lp = logits.log_softmax(-1)
    want = [lp[0, 0, 1] + lp[0, 1, 2], torch.tensor(0.0), sum(lp[2, t, 4] for t in range(5))]
    torch.testing.assert_close(got, torch.stack(want))


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_margin_grows():
    ref = torch.tensor([[-2.0, -3.0]])
    loss, chosen, rejected = dpo_loss(ref.clone(), ref, beta=0.1, smoothing=0.0)
    assert abs(float(loss) - math.log(2)) < 1e-7 and float(chosen) == float(rejected) == 0
    better, _, _ = dpo_loss(torch.tensor([[-1.0, -4.0]]), ref, beta=0.1, smoothing=0.0)
    assert float(better) < math.log(2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_dpo_run_raises_its_reward_accuracy_and_reuses_its_reference_on_resume(pretrained, tmp_path):  # noqa: F811
    """From a tiny pretrained LM: the first step's loss is log 2 (the policy is the reference before its first
    update), the chosen responses' reward margin on held-out pairs grows and most pairs are ranked right by step 8;
    the reference log-probabilities are computed once (dpo_reference.safetensors), then read again by the rerun that
    extends the run."""
    train = write(tmp_path / "train.jsonl", pairs(48))
    valid = write(tmp_path / "valid.jsonl", pairs(12))
    out = str(tmp_path / "dpo")
    sets = ft_sets(pretrained, out, train, valid, **{"train.max_steps": 8, "train.lr": 1e-2, "finetune.dpo_beta": 0.5})
    run_distributed(finetune_runs, 1, [("finetune-dpo", sets)], timeout=300)
    assert abs(losses(out)[1] - math.log(2)) < 1e-5
    accuracy, margins = losses(out, "eval", "val_reward_accuracy"), losses(out, "eval", "val_reward_margin")
    assert sorted(accuracy) == [4, 8]
    assert 0 < margins[4] < margins[8] and accuracy[8] >= 0.75, (accuracy, margins)
    assert all(math.isfinite(v) for v in losses(out).values())
    # each training row carries its batch's reward figures: 0 at the first step (the policy is the reference), the
    # chosen responses ahead by the last
    rewards = {key: losses(out, key=key) for key in ("reward_accuracy", "reward_margin", "chosen_reward",
                                                     "rejected_reward")}
    assert all(sorted(v) == list(range(1, 9)) for v in rewards.values()), rewards
    assert abs(rewards["chosen_reward"][1]) < 1e-4 and abs(rewards["rejected_reward"][1]) < 1e-4
    assert rewards["reward_margin"][8] > 0 and rewards["reward_accuracy"][8] > 0.5, rewards
    ref_path = os.path.join(out, REFERENCE_FILE)
    made = os.path.getmtime(ref_path)
    more = ft_sets(pretrained, out, train, valid, **{"train.max_steps": 10, "train.lr": 1e-2, "finetune.dpo_beta": 0.5})
    run_distributed(finetune_runs, 1, [("finetune-dpo", more)], timeout=300)
    assert os.path.getmtime(ref_path) == made and sorted(losses(out)) == list(range(1, 11))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any(r.get("kind") == "resume" for r in rows)
    # `megatrain evaluate` on the held-out pairs: the run's own numbers at the best step, its reference read again
    # from finetune.init
    best = int(open(os.path.join(out, "best")).read()[4:12])
    r = cli("evaluate", "--checkpoint", out, "--input", valid, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    for key in ("loss", "reward_accuracy", "reward_margin"):
        assert abs(got[key] - losses(out, "eval", f"val_{key}")[best]) < 1e-4, (key, got)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_rank_zero2_and_tp2_dpo_equal_one_rank(pretrained, tmp_path):  # noqa: F811
    """The DPO loss is a mean over the pairs of the global batch: 2-rank ZeRO-2 (and 2-rank tp=2) runs log the losses
    and evaluations of one rank (fp32, 1e-5), the reference log-probabilities computed by each layout alike."""
    train = write(tmp_path / "train.jsonl", pairs(40))
    valid = write(tmp_path / "valid.jsonl", pairs(10))
    over = {"train.max_steps": 6, "train.lr": 3e-3, "finetune.dpo_beta": 0.5, "train.eval_interval": 3}
    runs = {}
    for name, world, extra in (("one", 1, {}), ("zero2", 2, {"parallel.zero_stage": 2}), ("tp2", 2, {"parallel.tp": 2})):
        runs[name] = str(tmp_path / name)
        run_distributed(finetune_runs, world, [("finetune-dpo", ft_sets(pretrained, runs[name], train, valid,
                                                                        **over, **extra))], timeout=300)
    from training_utils import assert_close_curves

    for name in ("zero2", "tp2"):
        assert_close_curves(losses(runs["one"]), losses(runs[name]), rtol=1e-5)
        for key in ("reward_accuracy", "reward_margin"):  # over both ranks' pairs (step 1's rewards are ~0: noise)
            assert_close_curves(losses(runs["one"], key=key), losses(runs[name], key=key), rtol=1e-4,
                                steps=range(2, 7))
        for key in ("val_loss", "val_reward_margin"):
            assert_close_curves(losses(runs["one"], "eval", key), losses(runs[name], "eval", key), rtol=1e-5)

