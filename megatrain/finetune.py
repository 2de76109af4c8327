"""Fine-tuning entry point: sft, classify, tokens (NER) and qa from a pretrained model of any layout.

    megatrain finetune --config finetune-classify --set finetune.init=runs/tiny --set finetune.train_file=train.jsonl
    deepspeed --num_gpus N --module megatrain.finetune --config C [--set ...]   # or --hostfile H
    torchrun --nproc_per_node N -m megatrain.finetune --config C [--set ...]

The model's shape and tokenizer come from finetune.init (a megatrain checkpoint of any layout, a convert output, or
a Hugging Face folder); the run's own layout (tp, dp, ZeRO) is its config's. Builds the task's data and head, loads
the pretrained weights (the head and LoRA adapters start fresh), trains with the same loop as pretraining, evaluates
on finetune.valid_file (keeping DIR/best by finetune.metric_for_best), and reports finetune.test_file at the end.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import torch

from megatrain import startup
from megatrain.config import Config, ConfigError, load_config
from megatrain.training.dist_env import log0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="a YAML file, or a preset from configs/ (finetune-sft, finetune-classify, finetune-tokens, "
                        "finetune-qa)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set finetune.init=runs/tiny")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def check(cfg: Config) -> None:
    """What a fine-tuning run needs, checked before any process group exists (one line each)."""
    f = cfg.finetune
    if not f.task:
        raise ConfigError("config key finetune.task: set it to sft, dpo, classify, tokens or qa")
    if not f.init:
        raise ConfigError("config key finetune.init: name the pretrained model (a megatrain checkpoint, a convert "
                          "output or a Hugging Face folder)")
    if not f.train_file:
        raise ConfigError("config key finetune.train_file: name the training examples")
    for key in ("train_file", "valid_file", "test_file"):
        path = getattr(f, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"config key finetune.{key}: {path}: no such file")
    if cfg.parallel.pp > 1:
        raise ConfigError("config key parallel.pp: fine-tuning runs without pipeline stages (use tp and dp; a "
                          "pipeline-parallel checkpoint is read as finetune.init all the same)")
    if cfg.parallel.sequence_parallel and f.task != "sft":
        raise ConfigError(f"config key parallel.sequence_parallel: not with finetune.task={f.task} (heads read the "
                          f"whole sequence)")


def run(cfg: Config) -> dict:
    from megatrain.data import build_tokenizer
    from megatrain.heads import build_model, new_part_value
    from megatrain.tasks import finetune_task
    from megatrain.tasks.preference import ADAPTERS_OFF
    from megatrain.training.loop import train
    from megatrain.training.throughput import Throughput
    from megatrain.training.runtime import Run, adopt_init, resolve_vocab

    startup.mark("imports")
    check(cfg)
    asked = cfg  # as the user gave it; `cfg` below is the effective config (with what the run derived)
    init, resolved = adopt_init(asked, "finetune.init")  # the model's shape before the layout is checked against it
    cfg = resolved.apply(asked)
    check_model(cfg)
    tok = build_tokenizer(cfg.data.tokenizer)
    check_tokenizer(cfg, tok, init)
    resolved = resolved.but(model=resolve_vocab(cfg, tok))  # a tokenizer larger than the model's vocabulary: refused
    cfg = resolved.apply(asked)
    task = finetune_task(cfg, tok)  # every file read and checked before any process group exists
    f = cfg.finetune
    if f.metric_for_best and f.metric_for_best not in task.metrics:
        raise ConfigError(f"config key finetune.metric_for_best: {f.task} evaluations report {', '.join(task.metrics)}, "
                          f"not {f.metric_for_best!r}")
    task.prepare(f.train_file)
    resolved = resolved.but(labels=task.labels)  # finetune.labels, or the training file's
    cfg = task.cfg = resolved.apply(asked)
    try:
        with torch.device("meta"):  # LoRA targets and freeze specs checked, shapes only
            build_model(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    startup.mark("config")
    train_set = task.encode(f.train_file, train=True)
    valid_set = task.encode(f.valid_file, train=False) if f.valid_file else None
    test_set = task.encode(f.test_file, train=False) if f.test_file else None
    if f.epochs:
        steps = math.ceil(f.epochs * task.rows_per_epoch(train_set) / cfg.train.global_batch_size)
        resolved = resolved.but(max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps // 10))
    startup.mark("data")
    run = Run.start(asked, resolved)
    startup.mark("distributed")
    cfg = task.cfg = run.cfg
    with torch.device("meta"):  # shapes only: each rank allocates just its share when parallelize fills it
        model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log0(f"megatrain finetune {f.task} | {run.describe(total)} | trainable {trainable / 1e6:.2f}M of "
         f"{total / 1e6:.2f}M ({100 * trainable / total:.2f}%){' LoRA r=' + str(f.lora_rank) if f.lora_rank else ''}")
    unit = {"sft": "rows", "qa": "windows", "dpo": "pairs"}.get(f.task, "examples")
    cut = "contexts split into windows" if f.task == "qa" else f"cut to {task.max_len} tokens"
    log0(f"data: {len(train_set)} training {unit}" + (f" ({train_set.truncated} {cut})" if train_set.truncated else "")
         + (f", {len(valid_set)} validation" if valid_set else "") + (f", {len(test_set)} test" if test_set else "")
         + (f" | labels {', '.join(task.labels[:12])}{' ...' if len(task.labels) > 12 else ''}" if task.labels else ""))
    reshard = run.reshard_source()  # latest saved under another layout (checkpoint.elastic): read from there
    if reshard is not None:
        weights, _ = reshard.weights(model)
    elif run.will_resume():  # nothing to read from finetune.init: the checkpoint's weights replace these zeros
        shapes = {n: p.shape for n, p in model.named_parameters()}  # the full ones, before parallelize cuts them
        weights = lambda name: torch.zeros(shapes[name])  # noqa: E731
    else:
        # finetune.init's weights, one full tensor at a time, of which each rank keeps its slice; the head and adapters
        # start from values seeded by train.seed and their names (the same on every layout)
        run.verify_init(init)
        weights, new = init.weights(model, functools.partial(new_part_value, cfg))
        heads = sorted({n.split(".")[0] for n in new if "lora_" not in n})
        adapters = sum("lora_" in n for n in new)
        log0(f"initialized from {init.where}; new: {', '.join(heads) or 'no head'}"
             + (f", {adapters} LoRA matrices" if adapters else ""))
    startup.mark("model")
    if f.task == "dpo" and f.dpo_reference == "hold":  # the reference scores each micro-batch (tasks/preference.py)
        task.held = ADAPTERS_OFF if f.lora_rank else None
        if not f.lora_rank:  # a frozen copy of finetune.init's model, built while its files are open
            with torch.device("meta"):
                reference = build_model(cfg)
            task.held = run.frozen_engine(reference, init.weights(reference)[0])
    engine = run.engine(model, weights, release=init.close)
    if hasattr(task, "prepare_reference"):  # dpo: the reference's log-probabilities, from the weights before any step
        startup.mark("engine")
        log0(task.prepare_reference(run, engine, {"train": train_set, "valid": valid_set, "test": test_set},
                                    resuming=run.will_resume()))
        startup.mark("dpo reference")
    state = run.resume(engine)
    startup.mark("resume" if hasattr(task, "prepare_reference") else "engine")
    throughput = Throughput.of(run, task, task.max_len, engine.module)
    startup.mark("MFU peak")
    log0(startup.line())
    state = train(run, engine, train_set, valid_set, task, state, throughput)
    result = dict(step=state.step)
    if test_set is not None and state.step >= cfg.train.max_steps:
        result.update(test(run, engine, task, test_set))
    log0(f"done: step {state.step}; checkpoint in {cfg.checkpoint.dir}")
    return result


def check_model(cfg: Config) -> None:
    """finetune.* values that the model's shape (finetune.init's) bounds, checked before any file is read or
    anything is created."""
    from megatrain.tasks.qa import narrowest_window

    f, limit = cfg.finetune, cfg.model.max_seq_len
    if f.max_seq_len > limit:  # positions beyond the model's: a crash at the first long row, or a wrong MFU
        raise ConfigError(f"config key finetune.max_seq_len: {f.max_seq_len} exceeds max_seq_len {limit} of the model "
                          f"in finetune.init {f.init}; set it to {limit} or less (0: the model's)")
    max_len = f.max_seq_len or limit
    window = narrowest_window(max_len)
    if f.task == "qa" and window < 2:
        raise ConfigError(f"config key finetune.max_seq_len: {max_len} tokens leave no room for a context window "
                          f"beside the question; raise it")
    if f.task == "qa" and f.doc_stride >= window:
        raise ConfigError(f"config key finetune.doc_stride: {f.doc_stride} is not below the context window of a row, "
                          f"{window} tokens (max_seq_len {max_len} less a question of up to {max_len // 2} tokens and "
                          f"a separator), so consecutive windows would start a token apart; set it below {window}, "
                          f"e.g. {window // 2}")


def check_tokenizer(cfg: Config, tok, init) -> None:
    """data.tokenizer set apart from finetune.init's own must have the same vocabulary (else ids mean other tokens)."""
    from megatrain.data import TokenizerError, build_tokenizer

    if cfg.data.tokenizer == init.tokenizer:
        return
    try:
        theirs = build_tokenizer(init.tokenizer)
    except TokenizerError:
        return  # the init's tokenizer moved: only the size check (resolve_vocab) is left
    if theirs.vocab_size != tok.vocab_size:
        raise ConfigError(f"config key data.tokenizer: {cfg.data.tokenizer} has {tok.vocab_size} tokens, but "
                          f"finetune.init {init.where} was trained with {init.tokenizer} ({theirs.vocab_size}); "
                          f"leave data.tokenizer unset to use the model's own")


def test(run, engine, task, test_set) -> dict:
    """finetune.test_file, scored once with the best checkpoint's weights (or the last, without a valid_file)."""
    from megatrain.checkpoint.io import read_pointer, step_of
    from megatrain.training.metrics import MetricsLogger

    best = read_pointer(run.cfg.checkpoint.dir, "best")
    if best:
        engine.load_checkpoint(run.cfg.checkpoint.dir, tag=best, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
    row = task.evaluate(run, engine, test_set, prefix="test")
    logger = MetricsLogger(run.cfg, run.cfg.checkpoint.dir, 0, 0, enabled=run.rank == 0)
    logger.log(dict(step=step_of(best) if best else 0, kind="test", **row),
               "test: " + " | ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    logger.close()
    return row


def command(args: argparse.Namespace) -> int:
    run(load_config(args.config, args.set))
    return 0


if __name__ == "__main__":  # `python -m megatrain.finetune` (what every launcher runs) = `megatrain finetune`
    from megatrain.cli import main

    raise SystemExit(main(["finetune", *sys.argv[1:]]))
