"""Fine-tuning on one rank: loss masking and packing, label alignment, the metrics' definitions, QA windows, the
command line end to end (finetune -> evaluate -> predict), resume, and every bad input as one line."""
import json
import math
import os
import random

import pytest
import torch

from distributed import run_distributed
from test_convert import cli
from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets
from megatrain.config import load_config
from megatrain.data import build_tokenizer
from megatrain.model import IGNORE_INDEX, Transformer

WORDS = ["the", "a", "movie", "was", "film", "it", "very"]


def write(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((json.dumps(r) if not isinstance(r, str) else r) + "\n")
    return str(path)


def sentiment(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(["good", "great", "love"] if label == "pos" else ["bad", "awful", "hate"])]
        words += [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def task_for(kind: str, extra: list[str] = ()):
    from megatrain.tasks import finetune_task

    cfg = load_config(None, ["model.vocab_size=320", "model.n_layers=2", "model.d_model=32", "model.n_heads=4",
                             "model.max_seq_len=64", "data.seq_len=64", f"finetune.task={kind}", *extra])
    return cfg, finetune_task(cfg, build_tokenizer("byte"))


# -- sft -----------------------------------------------------------------------------------------------------------


def test_the_lora_update_has_the_gradients_of_its_formula():
    """add_lora_update (y + s u B^T; its backward's rank-r products in the layouts MKL runs fastest): gradcheck's
    numerical Jacobian, and the output and gradients of the formula run by autograd on a LoRA layer's 3-D input."""
    from megatrain.heads import LoRALinear, add_lora_update

    torch.manual_seed(0)
    y, u, b = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((7, 10), (7, 3), (10, 3)))
    assert torch.autograd.gradcheck(lambda y, u, b: add_lora_update(y, u, b, 1.5), (y, u, b))
    layer = LoRALinear(torch.nn.Linear(12, 20), rank=4, alpha=6, dropout=0.0).double()
    torch.nn.init.normal_(layer.lora_B)  # (B starts at 0: nothing would flow to A)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    grads = []
    for out in (layer(x), x @ layer.weight.T + layer.bias + 1.5 * (x @ layer.lora_A.T) @ layer.lora_B.T):
        grads.append(torch.autograd.grad((out * torch.arange(20.0, dtype=out.dtype)).sum(),
                                         (x, layer.lora_A, layer.lora_B, layer.weight)))
    for mine, plain in zip(*grads):
        torch.testing.assert_close(mine, plain, rtol=1e-12, atol=1e-12)


def test_sft_loss_is_the_masked_mean_over_responses_and_prompts_get_no_gradient(tmp_path):
    path = write(tmp_path / "sft.jsonl", [{"prompt": "add 2 and 3", "response": "5"},
                                          {"messages": [{"role": "system", "content": "terse"},
                                                        {"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"},
                                                        {"role": "user", "content": "bye"},
                                                        {"role": "assistant", "content": "ok"}]}])
    cfg, task = task_for("sft", ["finetune.pack=false"])
    rows = task.encode(path, train=False).items
    # the targets are exactly each response and its end-of-document token
    for row, responses in zip(rows, (["5"], ["hello", "ok"])):
        said = [t for t in row["labels"] if t != IGNORE_INDEX]
        want = []
        for r in responses:
            want += list(r.encode()) + [256]
        assert said == want
    # what predict feeds the model is exactly the training text up to the response
    msgs = [{"role": "user", "content": "add 2 and 3"}]
    (text, spans), = task.render(msgs + [{"role": "assistant", "content": "5"}])
    assert task.prompt_text(msgs) == text[: spans[0][0]] and text[spans[0][0]:] == "5"
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    batch = task.collate(rows, "cpu")
    loss = model(batch.tokens, batch.labels, None, 0, batch.segments)
    logits = model(batch.tokens, None, None, 0, batch.segments)
    logits.retain_grad()
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), batch.labels.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="none")
    mask = batch.labels.reshape(-1) != IGNORE_INDEX
    hand = per_token[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, hand)
    hand.backward()
    prompt = (batch.labels == IGNORE_INDEX)
    assert logits.grad[prompt].abs().max() == 0  # prompt (and padding) positions: no gradient at all
    assert logits.grad[~prompt].abs().max() > 0


def test_packed_sft_rows_give_each_example_its_own_loss(tmp_path):
    """Packing several conversations in one row changes nothing: the packed loss is the masked mean of the
    examples' token losses computed one example at a time."""
    rows = [{"prompt": f"q{i} " * (i + 1), "response": f"answer {i}"} for i in range(6)]
    path = write(tmp_path / "sft.jsonl", rows)
    cfg, task = task_for("sft")
    packed = task.encode(path, train=False).items
    assert len(packed) < 6 and max(max(r["segments"]) for r in packed) > 1  # several examples share a row
    cfg, alone = task_for("sft", ["finetune.pack=false"])
    single = alone.encode(path, train=False).items
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    with torch.no_grad():
        b = task.collate(packed, "cpu")
        got = model(b.tokens, b.labels, None, 0, b.segments)
        total, count = 0.0, 0
        for r in single:
            s = alone.collate([r], "cpu")
            n = int((s.labels != IGNORE_INDEX).sum())
            total += float(model(s.tokens, s.labels)) * n  # one example per row: no segments needed
            count += n
    assert float(got) == pytest.approx(total / count, rel=1e-5)


def test_sft_evaluation_scores_a_greedy_response_to_each_rows_last_assistant_turn(tmp_path):
    """With finetune.generation_metrics the evaluation generates, for each row, the turn after the conversation up
    to its last assistant turn, and scores it against that turn: the scores of SFT.respond's responses (what predict
    writes), each against its own row (two rows expect exactly what the model says: exact match 2 of 4)."""
    from megatrain.predict import LocalEngine, LocalRun
    from megatrain.tasks.metrics import generation_metrics

    names = ["exact_match", "rouge", "bleu", "chrf"]
    cfg, task = task_for("sft", [f"finetune.generation_metrics={json.dumps(names)}",
                                 "finetune.generation_max_new_tokens=6"])
    assert task.metrics == ("val_loss", "val_ppl", "val_exact_match", "val_rouge1", "val_rouge2", "val_rougeL",
                            "val_bleu", "val_chrf")  # what finetune.metric_for_best may name
    chat = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    prompts = [[{"role": "user", "content": p}] for p in ("add 2 and 3", "café 東京", "the quick brown fox")] + [chat]
    ids, target = task.tokens(chat + [{"role": "assistant", "content": "ok"}])
    assert task.prompt_ids(chat) == ids[: len(target) - 3]  # the training tokens before "ok" and its <eod>
    assert target[-4:] == [False, True, True, True]
    torch.manual_seed(3)
    model = Transformer(cfg.model).eval()
    said = [task.respond(model, m, 6)[0] for m in prompts]
    assert len(set(said)) == 4  # (a random model: each prompt gets its own response)
    refs = [said[0], "five", said[2], "see you later"]
    rows = [{"prompt": m[0]["content"], "response": r} for m, r in zip(prompts[:3], refs)]
    rows.append({"messages": chat + [{"role": "assistant", "content": refs[3]}]})
    examples = task.encode(write(tmp_path / "sft.jsonl", rows), train=False)
    assert examples.prompts == list(zip(prompts, refs))
    row = task.evaluate(LocalRun(cfg, 2), LocalEngine(model), examples)
    want = generation_metrics(said, refs, names)
    assert want["exact_match"] == 50.0
    assert {k: v for k, v in row.items() if k not in ("val_loss", "val_ppl")} == {f"val_{k}": v for k, v in want.items()}


# -- tokens --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective,piece", [("causal", -1), ("mlm", 0)])
def test_a_words_tag_sits_on_its_last_piece_for_causal_models_and_first_for_bidirectional(tmp_path, objective, piece):
    path = tmp_path / "ner.conll"
    path.write_text("-DOCSTART- O\n\nAlice\tB-PER\nlives\tO\nin\tO\nNew\tB-LOC\nYork\tI-LOC\n\n")
    cfg, task = task_for("tokens", [f"model.objective={objective}"])
    task.prepare(str(path))
    assert task.labels == ["B-LOC", "B-PER", "I-LOC", "O"]
    item = task.encode(str(path), train=False).items[0]
    text = "Alice lives in New York"
    starts = [0, 6, 12, 15, 19]
    for w, (word, tag) in enumerate(zip(["Alice", "lives", "in", "New", "York"], ["B-PER", "O", "O", "B-LOC", "I-LOC"])):
        pos = item["positions"][w]  # byte tokenizer: a piece per character
        assert pos == starts[w] + (len(word) - 1 if piece == -1 else 0)
        assert text[pos] == word[piece]
        assert item["labels"][pos] == task.labels.index(tag)
    assert sum(y != IGNORE_INDEX for y in item["labels"]) == 5  # one target a word, the other pieces none


def test_word_pieces_follow_a_sentencepiece_and_an_hf_tokenizer(tmp_path, corpus_jsonl):
    from megatrain.data.tokenizer import save_hf_tokenizer
    from megatrain.data.train_tokenizer import train_tokenizer
    from megatrain.tasks.tagging import word_pieces

    train_tokenizer([corpus_jsonl], str(tmp_path / "sp"), vocab_size=320)
    sp = build_tokenizer(str(tmp_path / "sp"))
    save_hf_tokenizer(sp, str(tmp_path / "hf"))
    words = ["the", "quickest", "café", "naïve", "東京", "dog"]
    for tok in (sp, build_tokenizer(f"hf:{tmp_path / 'hf'}")):
        ids, owner = word_pieces(tok, words)
        assert ids == tok.encode(" ".join(words))
        for w, word in enumerate(words):  # each word's pieces decode back to it
            pieces = [i for i, o in zip(ids, owner) if o == w]
            assert tok.decode(pieces).strip() == word


def test_entity_scores_follow_conlleval_on_the_edge_cases():
    from megatrain.tasks.metrics import entity_metrics

    # an entity at the sentence end; I- after O opens an entity (conlleval); a type change splits an entity
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"], ["B-PER", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["B-PER", "I-PER"]]
    m = entity_metrics(gold, pred)
    # gold entities: PER, LOC | ORG(1-2) | PER(0), LOC(1) = 5; predicted: PER, LOC | ORG(1-2) | PER(0-1) = 4
    # right: PER, LOC, ORG = 3  -> precision 3/4, recall 3/5
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["per_type"]["LOC"]["support"] == 2 and m["per_type"]["ORG"]["f1"] == 1.0
    assert m["token_accuracy"] == pytest.approx(7 / 9)
    # IOB1: I- starts an entity; B- only splits two adjacent entities of one type
    iob1 = entity_metrics([["I-PER", "I-PER", "B-PER", "O"]], [["I-PER", "I-PER", "I-PER", "O"]], "iob1")
    assert iob1["recall"] == pytest.approx(0.0) and iob1["per_type"]["PER"]["support"] == 2
    # BIOES is strict: an E- without its B- is no entity
    bioes = entity_metrics([["B-PER", "E-PER", "S-LOC"]], [["O", "E-PER", "S-LOC"]], "bioes")
    assert bioes["precision"] == 1.0 and bioes["recall"] == 0.5
    # and the numbers are seqeval's
    from seqeval.metrics import f1_score

    assert m["f1"] == pytest.approx(f1_score(gold, pred))


def test_squad_scores_follow_the_official_normalisation():
    from megatrain.tasks.metrics import exact_match, f1, normalize_answer, squad_metrics

    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert exact_match("the Eiffel Tower.", "Eiffel Tower") == 1.0
    assert exact_match("an apple", "apple pie") == 0.0
    assert f1("the big red dog", "a red dog") == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
    assert f1("", "dog") == 0.0 and f1("cat", "dog") == 0.0
    m = squad_metrics(["Paris", "in 1990"], [["Paris", "paris, France"], ["1990", "the year 1990"]])
    assert m["exact_match"] == pytest.approx(50.0) and m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_generation_scores_are_the_reference_libraries():
    """ROUGE (rouge-score, stemmed), corpus BLEU and chrF (sacrebleu) in percent, exact match of stripped texts."""
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu import corpus_bleu, corpus_chrf

    from megatrain.tasks.metrics import generation_metrics, generation_score_names

    pairs = [("The cat sat on the mat.", "The cat sat on the mat."),  # an exact hit
             ("  a dog ran\n", "a dog ran"),  # the same once stripped
             ("the cats were running in the park", "a cat runs in the big park"),  # partial overlap, stems
             ("", "nothing was said"),  # an empty prediction
             ("Le café à Tōkyō est naïf, 東京 😀", "Le café de Tokyo est naïf 東京"),  # unicode
             ("one two three four five", "five four three two one")]  # the same words, another order
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    names = ["exact_match", "rouge", "bleu", "chrf"]
    got = generation_metrics(preds, refs, names)
    assert list(got) == generation_score_names(names) == ["exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf"]
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = {k: 100 * sum(scorer.score(r, p)[k].fmeasure for p, r in pairs) / len(pairs)
            for k in ("rouge1", "rouge2", "rougeL")}
    want.update(exact_match=100 * 2 / 6, bleu=corpus_bleu(preds, [refs]).score, chrf=corpus_chrf(preds, [refs]).score)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert 0 < got["bleu"] < 100 and 0 < got["rouge2"] < got["rouge1"] < 100  # none of them trivial
    assert generation_metrics(preds, refs, ["bleu"]) == {"bleu": got["bleu"]}  # only what is asked for


def test_windowed_qa_maps_answers_back_to_their_exact_characters(tmp_path):
    """Contexts many times longer than a row: every window's best span (here the oracle's) is mapped back to the
    context's characters, across window borders."""
    rng = random.Random(0)
    rows, golds = [], []
    for i in range(12):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        answer = rng.choice(["Paris", "Marie Curie", "1903", "the Nobel prize"])
        cut = rng.randint(0, len(ctx))
        cut = ctx.rfind(" ", 0, cut) + 1 if " " in ctx[:cut] else 0
        context = ctx[:cut] + answer + " " + ctx[cut:]
        rows.append({"id": str(i), "question": "who?", "context": context,
                     "answers": {"text": [answer], "answer_start": [cut]}})
        golds.append(answer)
    path = write(tmp_path / "qa.jsonl", rows)
    cfg, task = task_for("qa", ["finetune.max_seq_len=40", "finetune.doc_stride=16"])  # >= the longest answer
    ex = task.encode(path, train=False)
    assert len(ex.items) > 2 * len(rows)  # most contexts need several windows
    results = []
    for it in ex.items:
        T = len(it["ids"])
        logits = torch.full((1, T, 2), -5.0)
        if it["start"]:  # the window that holds the answer scores it highest
            logits[0, it["start"], 0] = logits[0, it["end"], 1] = 5.0
        results += task.outputs(logits, None, [it])
    assert task.answers(ex, results) == golds
    assert task.score(ex, results)["exact_match"] == 100.0
    from megatrain.tasks.qa import whole_words

    assert whole_words("the Glucocorticoids, mostly", 6, 19) == "Glucocorticoids"  # from inside the word
    assert whole_words("in 1906, Tesla", 3, 5) == "1906" and whole_words("a b", 0, 3) == "a b"


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrained")
    data = make_byte_dataset(tmp)
    ck = str(tmp / "lm")
    run_distributed(run_configs, 1, [small_sets(data, ck, **{"train.max_steps": 3, "checkpoint.interval": 0,
                                                             "train.eval_interval": 0})], timeout=300)
    return ck


def ft_sets(init: str, out: str, train: str, valid: str, **over) -> list[str]:
    sets = {"finetune.init": init, "finetune.train_file": train, "finetune.valid_file": valid, "checkpoint.dir": out,
            "train.max_steps": 8, "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.lr": 3e-3,
            "train.warmup_steps": 1, "train.eval_interval": 4, "train.log_interval": 1, "checkpoint.interval": 4,
            "logging.tensorboard": False, "logging.peak_tflops": 1.0, "finetune.epochs": 0}
    sets.update(over)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]


def finetune_runs(rank, world, runs):
    from megatrain.finetune import run

    for preset, sets in runs:
        run(load_config(preset, sets))


@pytest.mark.slow
def test_classify_end_to_end_evaluate_and_predict(pretrained, tmp_path):
    train = write(tmp_path / "train.jsonl", sentiment(120, 0))
    valid = write(tmp_path / "valid.jsonl", sentiment(30, 1))
    out = str(tmp_path / "clf")
    r = cli("finetune", "--config", "finetune-classify", *[a for s in ft_sets(pretrained, out, train, valid,
                                                                              **{"finetune.test_file": valid})
                                                            for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "new: score" in r.stdout and "labels neg, pos" in r.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [x for x in rows if x.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [4, 8] and {"val_accuracy", "val_macro_f1", "val_confusion"} <= set(evals[0])
    best = open(os.path.join(out, "best")).read()
    best_acc = max(e["val_accuracy"] for e in evals)
    assert best == f"step{[e['step'] for e in evals if e['val_accuracy'] == best_acc][0]:08d}"
    test_row = [x for x in rows if x.get("kind") == "test"][0]
    ev = cli("evaluate", "--checkpoint", out, "--input", valid, "--json")
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout)
    assert got["accuracy"] == pytest.approx(test_row["test_accuracy"]) and got["loss"] == pytest.approx(
        test_row["test_loss"], rel=1e-5)  # the same numbers as the run's own test of its best checkpoint
    unlabeled = write(tmp_path / "new.jsonl", [{"text": r["text"]} for r in sentiment(5, 2)])
    pr = cli("predict", "--checkpoint", out, "--input", unlabeled, "--output", str(tmp_path / "pred.jsonl"))
    assert pr.returncode == 0, pr.stderr
    preds = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert len(preds) == 5 and all(p["prediction"] in ("neg", "pos") and 0.5 <= p["score"] <= 1 for p in preds)


@pytest.mark.slow
def test_a_checkpoint_keeps_the_config_as_asked_beside_what_the_run_derived(pretrained, tmp_path):
    """The labels the training file defines, the steps of finetune.epochs and the model of finetune.init are the
    run's Resolved, saved beside the config as the user gave it; a checkpoint saved without one still reads."""
    from megatrain.resolved import saved_config
    from megatrain.predict import load

    train = write(tmp_path / "train.jsonl", sentiment(40, 0))
    out = str(tmp_path / "clf")
    run_distributed(finetune_runs, 1, [("finetune-classify", ft_sets(pretrained, out, train, train, **{
        "finetune.epochs": 1, "train.warmup_steps": 3}))], timeout=300)
    path = os.path.join(out, "step00000005", "megatrain.json")  # 40 examples, 8 a step: 5 steps
    state = json.load(open(path))
    asked, resolved = state["config"], state["resolved"]
    assert (asked["finetune"]["labels"], asked["train"]["max_steps"], asked["train"]["warmup_steps"]) == ([], 8, 3)
    assert (asked["model"]["vocab_size"], asked["model"]["d_model"], asked["data"]["tokenizer"]) == (0, 128, "byte")
    assert (resolved["labels"], resolved["max_steps"], resolved["warmup_steps"]) == (["neg", "pos"], 5, 0)
    assert (resolved["model"]["vocab_size"], resolved["model"]["d_model"]) == (320, 64)  # the pretrained model's
    model, cfg, _, task, _ = load(out)
    assert cfg.finetune.labels == task.labels == ["neg", "pos"] and cfg.model.d_model == 64
    state["config"] = saved_config(state).to_dict()  # as a checkpoint saved without `resolved` holds it
    del state["resolved"]
    with open(path, "w") as f:
        json.dump(state, f)
    os.remove(os.path.join(out, "step00000005", "manifest.json"))  # (nor a manifest: it was saved before either)
    old, old_cfg, _, old_task, _ = load(out)
    assert old_cfg.to_dict() == cfg.to_dict() and old_task.labels == ["neg", "pos"]
    assert all(torch.equal(t, old.state_dict()[k]) for k, t in model.state_dict().items())


@pytest.mark.slow
def test_a_stopped_finetune_run_resumes_on_the_same_curve(pretrained, tmp_path):
    rows = []
    for i in range(80):
        words = [random.Random(i).choice(["alice", "bob", "paris", "rome", "went", "to", "the"]) for _ in range(5)]
        tags = ["B-PER" if w in ("alice", "bob") else "B-LOC" if w in ("paris", "rome") else "O" for w in words]
        rows.append("\n".join(f"{w}\t{t}" for w, t in zip(words, tags)) + "\n")
    train = write(tmp_path / "train.conll", rows)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    runs = [("finetune-tokens", ft_sets(pretrained, d, train, train)) for d in (full, part)]
    run_distributed(finetune_runs, 1, runs, timeout=300)
    with open(os.path.join(part, "latest"), "w") as f:
        f.write("step00000004")
    run_distributed(finetune_runs, 1, [("finetune-tokens", ft_sets(pretrained, part, train, train))], timeout=300)
    assert_close_curves(losses(full), losses(part), rtol=1e-6, steps=[5, 6, 7, 8])
    assert_close_curves(losses(full, "eval"), losses(part, "eval"), rtol=1e-6, steps=[8])


@pytest.mark.slow
def test_lora_sft_trains_only_the_adapters(pretrained, tmp_path):
    """LoRA on a causal LM trains matrices only, so the no-decay group is empty (DeepSpeed dropped it and the LR
    schedule, built for two groups, failed at the first step)."""
    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ("alpha", "beta", "gamma", "delta") * 10]
    train = write(tmp_path / "sft.jsonl", rows)
    out = str(tmp_path / "sft")
    sets = ft_sets(pretrained, out, train, train, **{"finetune.lora_rank": 4, "train.max_steps": 4,
                                                      "checkpoint.interval": 0})
    run_distributed(finetune_runs, 1, [("finetune-sft", sets)], timeout=300)
    assert all(math.isfinite(v) for v in losses(out).values()) and len(losses(out)) == 4
    from megatrain.checkpoint.reader import CheckpointReader

    with CheckpointReader(pretrained) as base, CheckpointReader(out) as tuned:
        before = dict(base.tensors())
        for name, t in tuned.tensors():
            if "lora" not in name:
                assert torch.equal(t, before[name]), name


@pytest.mark.slow
def test_sft_generation_metrics_in_the_run_in_evaluate_and_from_predict(pretrained, tmp_path, capsys):
    """finetune.generation_metrics: the run logs them beside val_loss and test_loss; `megatrain evaluate` reports
    the numbers of the run's own test of its best checkpoint, which are the scores of `megatrain predict`'s responses
    to the same file against its responses."""
    from megatrain.cli import main as cli_main
    from megatrain.tasks.metrics import generation_metrics

    words = ("alpha", "beta", "gamma", "delta", "omega", "kappa")
    train = write(tmp_path / "train.jsonl", [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in words * 6])
    valid = write(tmp_path / "valid.jsonl", [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in words])
    out, names = str(tmp_path / "sft"), ["exact_match", "rouge", "bleu", "chrf"]
    run_distributed(finetune_runs, 1, [("finetune-sft", ft_sets(pretrained, out, train, valid, **{
        "finetune.generation_metrics": names, "finetune.generation_max_new_tokens": 12, "finetune.test_file": valid,
        "finetune.metric_for_best": "val_chrf", "train.max_steps": 4, "train.eval_interval": 2,
        "checkpoint.interval": 2}))], timeout=300)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    scores = ["exact_match", "rouge1", "rouge2", "rougeL", "bleu", "chrf"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all({"val_loss", *(f"val_{k}" for k in scores)} <= set(e)
                                                        for e in evals)
    test_row = [r for r in rows if r.get("kind") == "test"][0]
    assert cli_main(["evaluate", "--checkpoint", out, "--input", valid, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    for k in ("loss", *scores):  # the numbers of the run's own test (the same greedy responses)
        assert got[k] == pytest.approx(test_row[f"test_{k}"], rel=1e-5), k
    pred = str(tmp_path / "pred.jsonl")
    assert cli_main(["predict", "--checkpoint", out, "--input", valid, "--output", pred, "--max-new-tokens", "12"]) == 0
    responses = [json.loads(line)["response"] for line in open(pred)]
    want = generation_metrics(responses, [f"{w} {w}" for w in words], names)
    assert {k: got[k] for k in scores} == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert want["chrf"] > 0, responses  # the responses share something with the references


# -- bad input: one line, exit 1, nothing left behind ------------------------------------------------------------


def one_error_line(r, match: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("megatrain finetune: error:")]
    assert len(errors) == 1 and match in errors[0], r.stderr[-2000:]


@pytest.mark.slow
def test_bad_inputs(pretrained, tmp_path):
    good = write(tmp_path / "good.jsonl", sentiment(20, 0))
    out = str(tmp_path / "out")

    def run(config: str, train: str, valid: str = "", **over):
        return cli("finetune", "--config", config,
                   *[a for s in ft_sets(pretrained, out, train, valid or train, **over) for a in ("--set", s)])

    one_error_line(run("finetune-classify", write(tmp_path / "a.jsonl", ['{"text": "x", "label": "a"}', '{"text": "y",'])),
                   "a.jsonl:2: malformed JSON")
    one_error_line(run("finetune-classify", write(tmp_path / "b.jsonl", [{"text": "x", "label": "a"}, {"txt": "y", "label": "b"}])),
                   "b.jsonl:2: no 'text' field")
    one_error_line(run("finetune-classify", write(tmp_path / "c.jsonl", [{"text": "x"}])), "c.jsonl:1: no 'label' field")
    one_error_line(run("finetune-classify", good, write(tmp_path / "d.jsonl", [{"text": "x", "label": "meh"}])),
                   "d.jsonl:1: label 'meh' never occurs in the training file")
    (tmp_path / "empty.jsonl").write_text("\n")
    one_error_line(run("finetune-classify", str(tmp_path / "empty.jsonl")), "empty.jsonl: empty (no examples)")
    (tmp_path / "e.conll").write_text("Alice\tB-PER\nlives\n")
    one_error_line(run("finetune-tokens", str(tmp_path / "e.conll")), "e.conll:2: a token with no tag")
    (tmp_path / "f.conll").write_text("Alice\tO\nSmith\tI-PER\n")
    one_error_line(run("finetune-tokens", str(tmp_path / "f.conll")), "IOB2 starts every entity with B-")
    squad = {"data": [{"paragraphs": [{"context": "Marie Curie won it.", "qas": [
        {"id": "q1", "question": "who?", "answers": [{"text": "Marie Curie", "answer_start": 3}]}]}]}]}
    (tmp_path / "g.json").write_text(json.dumps(squad))
    one_error_line(run("finetune-qa", str(tmp_path / "g.json"), **{"finetune.doc_stride": 16}),
                   "question q1: answer_start 3 does not match its text")
    one_error_line(run("finetune-classify", good, **{"finetune.init": str(tmp_path)}), "neither a megatrain checkpoint")
    one_error_line(run("finetune-classify", good, **{"data.tokenizer": "bert-tokenizer-that-is-not-there"}),
                   "unknown tokenizer spec")
    one_error_line(run("finetune-classify", good, **{"finetune.lora_rank": 4, "finetune.lora_targets": "attn"}),
                   "finetune.lora_targets: 'attn' names no projection")
    one_error_line(run("finetune-classify", good, **{"model.n_layers": 3}), "model.n_layers: 3 contradicts finetune.init")
    one_error_line(run("finetune-classify", good, **{"finetune.metric_for_best": "val_f1"}),
                   "classify evaluations report val_loss, val_accuracy")
    assert not os.path.exists(out)


def test_a_checkpoint_of_another_vocabulary_is_refused(pretrained, tmp_path, corpus_jsonl):
    from megatrain.data.train_tokenizer import train_tokenizer

    train_tokenizer([corpus_jsonl], str(tmp_path / "sp"), vocab_size=330)
    good = write(tmp_path / "good.jsonl", sentiment(20, 0))
    r = cli("finetune", "--config", "finetune-classify", *[a for s in ft_sets(
        pretrained, str(tmp_path / "out"), good, good, **{"data.tokenizer": str(tmp_path / "sp")}) for a in ("--set", s)])
    one_error_line(r, "has 330 tokens, but finetune.init")
    assert not os.path.exists(tmp_path / "out")
