"""Preference tuning (finetune.task=dpo, tasks/preference.py): the pairs as sft renders them, the loss against a hand
computation from per-token log-probabilities, the training log's reward figures against an evaluation's, the
reference computed once and reused, a run whose reward accuracy rises, and the same run as TRL's DPOTrainer's."""
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


def test_a_training_step_logs_the_reward_figures_an_evaluation_of_its_pairs_reports(tmp_path, monkeypatch):
    """train_step's sums over 4 micro-batches (of 2 pairs) give the evaluation's reward accuracy, margin and mean
    rewards of the step's 8 pairs, from the training forwards alone (one per micro-batch), kept on the device
    until the log line reads them."""
    from types import SimpleNamespace

    from megatrain.config import validate_world
    from megatrain.moe import AuxLoss
    from megatrain.parallel.topology import Layout
    from megatrain.training.loop import Window, train_step

    monkeypatch.setattr(AuxLoss, "scale", AuxLoss.scale)  # train_step sets it for its run: back after the test

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
    four = ["chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin"]  # (not the log-prob shares)
    assert sorted(logged) == four and set(four) < set(want)
    assert 0 < want["reward_accuracy"] < 1, want
    for key in four:
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


def test_evaluation_counts_the_pairs_each_model_ranks_right_by_reward_and_by_log_probability():
    """reward_accuracy compares beta * (pi - ref); logp_accuracy the policy's own log-probabilities, and
    reference_logp_accuracy the reference's (absent without a reference)."""
    _, task = task_for("dpo", ["finetune.dpo_beta=0.5"])
    pi = [(-2.0, -5.0), (-4.0, -3.0), (-6.0, -7.0), (-1.0, -2.0)]
    ref = [(-3.0, -4.0), (-4.0, -2.0), (-5.0, -9.0), (-2.0, -1.0)]
    results = []
    for p, r in zip(pi, ref):
        _, chosen, rejected = dpo_loss(torch.tensor([p]), torch.tensor([r]), beta=0.5, smoothing=0.0)
        results.append(dict(chosen=float(chosen), rejected=float(rejected), logps=p, ref=r))

    got = task.score(None, results)
    # rewards 0.5 * (pi - ref): chosen 0.5, 0, -0.5, 0.5; rejected -0.5, -0.5, 1, -0.5
    assert got["reward_accuracy"] == 0.75 and got["logp_accuracy"] == 0.75
    assert got["reference_logp_accuracy"] == 0.5
    assert abs(got["reward_margin"] - 0.25) < 1e-7
    _, free = task_for("dpo", ["finetune.dpo_reference=none"])
    assert "reference_logp_accuracy" not in free.score(None, results)


@pytest.mark.parametrize("lora", [False, True])
def test_a_held_reference_scores_each_batch_as_the_precomputed_one(tmp_path, lora):
    """finetune.dpo_reference=hold: a frozen copy of the starting model, or under LoRA the policy with its adapters
    off (after an update has moved them), gives each pair the log-probabilities a precomputing pass of the starting
    model stored, and so the same loss and rewards."""
    from megatrain.heads import build_model
    from megatrain.predict import LocalRun
    from megatrain.tasks.preference import ADAPTERS_OFF

    over = ["finetune.dpo_beta=0.5", "finetune.dpo_reference=hold"] + (["finetune.lora_rank=4"] if lora else [])
    cfg, task = task_for("dpo", over)
    _, pre = task_for("dpo", over[:1] + over[2:])
    examples = task.encode(write(tmp_path / "pairs.jsonl", pairs(6)), train=False)
    torch.manual_seed(0)
    start = build_model(cfg)
    with torch.no_grad():
        for name, p in start.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()  # (adapters that moved: B no longer zero)
    reference = ModelEngine(build_model(cfg))
    reference.module.load_state_dict(start.state_dict())
    with torch.no_grad():
        for name, p in reference.module.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()  # the model the adapters started from
    want = pre.set_reference(LocalRun(cfg, 4), reference, examples)
    policy = ModelEngine(start)
    task.held = ADAPTERS_OFF if lora else reference
    policy.train()
    batch = task.collate(examples.items, "cpu")
    got = task.reference_logps(policy, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert policy.module.training  # (back in training mode)
    held = task.forward_eval(policy, batch)[1]
    kept = pre.forward_eval(policy, pre.collate(examples.items, "cpu"))[1]
    for a, b in zip(held, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)



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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_held_reference_trains_as_the_precomputed_one(pretrained, tmp_path):  # noqa: F811
    """finetune.dpo_reference=hold logs the losses, rewards and evaluations of precompute (fp32, 1e-5): a frozen second
    model under 2-rank ZeRO-3 (partitioned as the policy), and under LoRA with tp=2 the policy with its adapters off;
    no reference file is written."""
    from training_utils import assert_close_curves

    train = write(tmp_path / "train.jsonl", pairs(24))
    valid = write(tmp_path / "valid.jsonl", pairs(6))
    over = {"train.max_steps": 4, "train.lr": 3e-3, "finetune.dpo_beta": 0.5, "train.eval_interval": 2}
    lora = {"finetune.lora_rank": 4, "train.lr": 1e-2}
    legs = (("pre", 1, {}), ("hold-zero3", 2, {"finetune.dpo_reference": "hold", "parallel.zero_stage": 3}),
            ("pre-lora", 1, lora), ("hold-lora-tp2", 2, {"finetune.dpo_reference": "hold", "parallel.tp": 2, **lora}))
    runs = {}
    for name, world, extra in legs:
        runs[name] = str(tmp_path / name)
        run_distributed(finetune_runs, world, [("finetune-dpo", ft_sets(pretrained, runs[name], train, valid,
                                                                        **{**over, **extra}))], timeout=300)
    for pre, held in (("pre", "hold-zero3"), ("pre-lora", "hold-lora-tp2")):
        assert not os.path.exists(os.path.join(runs[held], REFERENCE_FILE))
        assert_close_curves(losses(runs[pre]), losses(runs[held]), rtol=1e-5)
        assert_close_curves(losses(runs[pre], key="reward_margin"), losses(runs[held], key="reward_margin"),
                            rtol=1e-4, steps=range(2, 5))
        for key in ("val_loss", "val_reward_margin", "val_reference_logp_accuracy"):
            assert_close_curves(losses(runs[pre], "eval", key), losses(runs[held], "eval", key), rtol=1e-5)


# -- parity with TRL's DPOTrainer ---------------------------------------------------------------------------------

PARITY_SETS = {"finetune.task": "dpo", "finetune.dpo_beta": 0.5, "finetune.dpo_label_smoothing": 0.0,
               "finetune.dpo_reference": "precompute", "finetune.epochs": 0, "train.max_steps": 10,
               "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.lr": 1e-3, "train.min_lr": 1e-3,
               "train.lr_schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0,
               "train.grad_clip": 0.0, "train.beta1": 0.9, "train.beta2": 0.95, "train.adam_eps": 1e-8,
               "train.precision": "fp32", "parallel.zero_stage": 0, "train.eval_interval": 0,
               "train.log_interval": 1, "checkpoint.interval": 0, "finetune.max_seq_len": 64}


def random_llama(path: str, seed: int = 0) -> str:
    """A tiny random Llama-shaped model as a consolidated megatrain folder (megatrain.json + model.safetensors).
    vocab_size is the byte tokenizer's 260 exactly: padding rows would take part in megatrain's softmax but not in the
    export's."""
    from safetensors.torch import save_file

    from megatrain.config import load_config
    from megatrain.resolved import Resolved

    cfg = load_config(None, ["data.tokenizer=byte", "model.vocab_size=260", "model.n_layers=2", "model.d_model=32",
                             "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64", "data.seq_len=64"])
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    os.makedirs(path)
    weights = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    save_file(weights, os.path.join(path, "model.safetensors"))
    state = {"step": 0, "consumed_samples": 0, "config": cfg.to_dict(), "resolved": Resolved.of(cfg).to_dict()}
    with open(os.path.join(path, "megatrain.json"), "w") as f:
        json.dump(state, f)
    return path


def parity_pairs(n: int) -> list[dict]:
    """Pairs with distinct prompts (each found again by its token ids)."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    return [{"prompt": f"say {w} {i}", "chosen": f"{w} {w}", "rejected": f"{w}!"}
            for i, w in enumerate((words * n)[:n])]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dpo_matches_trls_dpo_trainer(tmp_path, monkeypatch):
    """A tiny random Llama-shaped model, exported with to-hf, trained 10 steps on the same 40 pairs by `megatrain
    finetune` (one process, ZeRO 0, fp32, AdamW, constant lr, no weight decay or clipping, micro-batches of 2 pairs
    accumulated to 4) and by TRL's DPOTrainer (sigmoid loss, a reference model copy, the same optimizer and batches,
    the pairs in megatrain's training order, read in order): the same token ids and loss masks, the same per-pair
    log-probabilities, losses and rewards before training and after it, the same loss curve and training reward
    figures, the same final weights."""
    trl = pytest.importorskip("trl")  # (TRL's sigmoid loss has no label smoothing: dpo_label_smoothing=0 here)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatrain.config import load_config
    from megatrain.convert.hf import to_hf
    from megatrain.data import build_tokenizer
    from megatrain.generate import load_model
    from megatrain.tasks import finetune_task

    init, hf, out = random_llama(str(tmp_path / "init")), str(tmp_path / "hf"), str(tmp_path / "dpo")
    to_hf(init, hf)
    rows = parity_pairs(40)  # 10 steps of 4 pairs: one epoch, each pair once
    train = write(tmp_path / "train.jsonl", rows)
    sets = ft_sets(init, out, train, "", **PARITY_SETS)
    run_distributed(finetune_runs, 1, [(None, sets)], timeout=240)
    cfg = load_config(None, sets)
    task = finetune_task(cfg, build_tokenizer("byte"))
    examples = task.encode(train, train=True)
    order = [examples.items.index(examples[i]) for i in range(len(rows))]  # sample i of the run: row order[i]
    reference = load_file(os.path.join(out, REFERENCE_FILE))["train"]  # the run's, [pair, (chosen, rejected)]

    # TRL: the plain format's prompt, the response as the completion; it appends the eos token (<eod>) as text, which
    # the exported tokenizer reads as the token once special tokens are not split (megatrain's own text never holds
    # one); it adds no BOS, and right-pads with <pad>
    data = Dataset.from_list([{"prompt": f"User: {rows[i]['prompt']}\nAssistant: ", "chosen": rows[i]["chosen"],
                               "rejected": rows[i]["rejected"]} for i in order])
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.5, loss_type=["sigmoid"], label_smoothing=0.0,
        precompute_ref_log_probs=False, max_length=None, disable_dropout=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, per_device_eval_batch_size=1, max_steps=10, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch_fused",
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, train_sampling_strategy="sequential", seed=0, logging_steps=1,
        save_strategy="no", report_to="none", dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
                             ref_model=AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), args=args,
                             train_dataset=data, processing_class=AutoTokenizer.from_pretrained(
                                 hf, split_special_tokens=False))
    for k, i in enumerate(order):  # the same ids, the same tokens scored
        tokenized = trainer.train_dataset[k]
        for side in ("chosen", "rejected"):
            x, y = examples.items[i][side]
            prompt, completion = tokenized["prompt_ids"], tokenized[f"{side}_ids"]
            assert prompt + completion == x + [y[-1]], (k, side)
            assert [t != IGNORE_INDEX for t in y] == [False] * (len(prompt) - 1) + [True] * len(completion)

    probe = list(range(0, len(rows), 5))  # pairs evaluated one at a time (TRL reports means)

    def trl_pairs() -> list[dict]:
        return [trainer.evaluate(Dataset.from_list([data[k]])) for k in probe]

    def megatrain_pairs(model) -> list[tuple[float, float, float]]:
        """(loss, chosen reward, rejected reward) of each probed pair, against the run's reference."""
        engine, got = ModelEngine(model.eval()), []
        with torch.no_grad():
            for k in probe:
                item = dict(examples.items[order[k]], ref=tuple(reference[order[k]].tolist()))
                loss, chosen, rejected = task.pair_losses(engine, task.collate([item], "cpu"))[:3]
                got.append((float(loss), float(chosen), float(rejected)))
        return got

    figures = {}  # the largest differences, printed for the record (-s)

    def compare(name: str, ours: list[tuple[float, float, float]], theirs: list[dict], tol: float) -> None:
        keys = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected")
        figures[name] = max(abs(a - t[key]) for o, t in zip(ours, theirs) for a, key in zip(o, keys))
        assert figures[name] < tol, (name, ours, theirs)

    # before training (the policy is the reference: losses log 2, rewards 0 on both sides); the log-probabilities,
    # the run's own reference ones, equal TRL's policy's
    before = trl_pairs()
    compare("step 0 loss/rewards", megatrain_pairs(load_model(init)[0]), before, 1e-5)
    logps = [abs(float(reference[order[k]][j]) - t[f"eval_logps/{side}"])
             for k, t in zip(probe, before) for j, side in enumerate(("chosen", "rejected"))]
    figures["step 0 logps"] = max(logps)
    assert max(logps) < 1e-4  # sums of ~12-30 fp32 log-probabilities near -5.5

    # Training: both step torch's fused AdamW, so what differs is the fp32 rounding of two implementations of the
    # model's forward and backward (~1e-7 relative), carried through 10 updates (measured: 3e-6 relative on the
    # loss, 4e-6 on rewards, 3e-6 on weights); the tolerances leave room for other CPUs' kernels
    trainer.train()
    logged = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    ours = losses(out)
    assert sorted(ours) == sorted(logged) == list(range(1, 11))
    figures["loss curve rel"] = max(abs(ours[s] - logged[s]["loss"]) / logged[s]["loss"] for s in ours)
    assert figures["loss curve rel"] < 1e-4
    for key, theirs in (("chosen_reward", "rewards/chosen"), ("rejected_reward", "rewards/rejected"),
                        ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
        mine = losses(out, key=key)
        figures[key] = max(abs(mine[s] - logged[s][theirs]) for s in mine)
        assert figures[key] < 1e-4, (key, mine, {s: r[theirs] for s, r in logged.items()})
    compare("step 10 loss/rewards", megatrain_pairs(load_model(out)[0]), trl_pairs(), 1e-4)
    trained = str(tmp_path / "trained")
    to_hf(out, trained)
    mine, theirs = load_file(os.path.join(trained, "model.safetensors")), trainer.model.state_dict()
    assert sorted(mine) == sorted(theirs)
    figures["weights"] = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert figures["weights"] < 2e-5
    print("megatrain vs TRL, max |difference|:", figures)
