"""Pretraining entry point.

    megatrain pretrain [--config tiny] [--set section.key=value ...]           # one process
    deepspeed --num_gpus N --module megatrain.pretrain --config C [--set ...]   # or --hostfile H
    torchrun --nproc_per_node N -m megatrain.pretrain --config C [--set ...]

Builds config -> data -> model -> DeepSpeed engine, resumes from checkpoint.dir/latest if present,
trains, evaluates, saves, and prints a sample from the model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from megatrain import startup
from megatrain.config import Config, ConfigError, load_config
from megatrain.data import build_gpt_datasets, build_tokenizer
from megatrain.fileio import read_json
from megatrain.training.dist_env import log0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="a YAML file, or a preset name from configs/ (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def check_data_path(cfg: Config) -> None:
    from megatrain.data import parse_data_path
    from megatrain.data.indexed import dataset_exists

    check_eval_tasks(cfg)
    prefixes = [(f"train.eval_sets {name}", path) for name, path in cfg.train.eval_sets.items()]
    if cfg.data.path not in (None, "", []):
        prefixes = [("data.path", prefix) for _, prefix in parse_data_path(cfg.data.path)] + prefixes
    tokenizer = None
    for key, prefix in prefixes:
        if not dataset_exists(prefix):
            raise ConfigError(f"config key {key}: {prefix}.bin/.idx: no such file; make it with "
                              f"`megatrain preprocess --output-prefix {prefix} ...`"
                              + (", or unset data.path for the built-in corpus" if key == "data.path" else ""))
        meta_file = f"{prefix}.meta.json"
        if os.path.isfile(meta_file):  # what preprocess wrote: the tokenizer the ids come from
            meta = read_json(meta_file, "remake the dataset with `megatrain preprocess`, or remove the file")
            tokenizer = tokenizer or build_tokenizer(cfg.data.tokenizer)
            if meta.get("vocab_size") not in (None, tokenizer.vocab_size):
                raise ConfigError(f"config key data.tokenizer: {cfg.data.tokenizer} has {tokenizer.vocab_size} pieces, "
                                  f"but {prefix} was tokenized with {meta.get('tokenizer')} ({meta['vocab_size']} "
                                  f"pieces, {meta_file}); set data.tokenizer to the tokenizer the data was made with")


def check_eval_tasks(cfg: Config) -> None:
    """train.eval_tasks needs lm-eval, and its include folder to exist (before anything starts)."""
    t = cfg.train
    if not t.eval_tasks.strip():
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("config key train.eval_tasks: lm-eval is not installed: pip install 'lm-eval==0.4.*' (or "
                          "pip install -e '.[eval]'), or set it to \"\"") from None
    if t.eval_tasks_include and not os.path.isdir(t.eval_tasks_include):
        raise ConfigError(f"config key train.eval_tasks_include: {t.eval_tasks_include}: no such folder (it should "
                          f"hold the task YAML files)")


def setup_data(cfg: Config):
    """The tokenizer, the train/valid datasets of the effective config (the built-in corpus's where the config left
    data.path unset: built here, once per node) and train.eval_sets's validation datasets by name."""
    from megatrain.corpus import builtin_corpus_paths, ensure_builtin_corpus

    if cfg.data.path == builtin_corpus_paths()[0]:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            ensure_builtin_corpus(log0)  # one builder per node; the others wait at the barrier
        dist.barrier()
    tok = build_tokenizer(cfg.data.tokenizer)
    t = cfg.train
    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train_ds, valid_ds, _ = build_gpt_datasets(cfg.data.path, cfg.data.split, cfg.data.seq_len,
                                               [t.max_steps * t.global_batch_size, n_valid, 0], t.seed,
                                               cfg.data.cache_dir or None, cfg.data.sample_offsets)
    eval_sets = {}
    for name, path in t.eval_sets.items():  # their validation splits, the same windows every evaluation
        eval_sets[name] = build_gpt_datasets(path, cfg.data.split, cfg.data.seq_len, [0, n_valid, 0], t.seed,
                                             cfg.data.cache_dir or None)[1]
        if eval_sets[name] is None or valid_ds is None:
            raise ConfigError(f"config key train.eval_sets: {name} is read through its validation split, and "
                              f"data.split={cfg.data.split} has none; give the split a validation share")
    return tok, train_ds, valid_ds, eval_sets


def run(cfg: Config) -> dict:
    from megatrain.parallel.parallelize import build_on_meta
    from megatrain.training.loop import train
    from megatrain.training.throughput import Throughput
    from megatrain.tasks import pretraining_task
    from megatrain.training.runtime import Run, adopt_init, resolve_vocab

    startup.mark("imports")
    init, resolved = adopt_init(cfg)  # checkpoint.init's model shape; before the layout is checked against it
    if cfg.data.path in (None, "", []):  # the built-in corpus (and its tokenizer)
        from megatrain.corpus import builtin_corpus_paths

        path, tokenizer = builtin_corpus_paths()
        resolved = resolved.but(data_path=path, tokenizer=tokenizer)
        check_data_path(cfg)  # (train.eval_sets; the corpus itself is built below)
    else:
        check_data_path(resolved.apply(cfg))  # fail in one line before any distributed setup
    run = Run.start(cfg, resolved)  # likewise every invalid TP x PP x DP layout, then the process groups
    startup.mark("distributed")
    tok, train_ds, valid_ds, eval_sets = setup_data(run.cfg)
    startup.mark("data")
    cfg = run.derive(model=resolve_vocab(run.cfg, tok))  # the run's effective config from here on
    if cfg.model.objective == "mlm" and tok.mask_id is None:
        raise ConfigError(f"model.objective=mlm needs a tokenizer with a mask token; {cfg.data.tokenizer} has none")
    # Shapes only: each rank allocates just its share when parallelize fills it, with the initial values (the same
    # on every layout) or its slices of checkpoint.init's weights, read one tensor at a time
    model, weights, init_line = build_on_meta(cfg.model), None, None
    reshard = run.reshard_source()  # latest saved under another layout (checkpoint.elastic): read from there
    if reshard is not None:
        weights, _ = reshard.weights(model)
    elif init is not None and not run.will_resume():  # weights only: the optimizer and the step start afresh
        run.verify_init(init)
        weights, _ = init.weights(model)
        init_line = f"initialized from {init.where} (weights only; the optimizer starts afresh)"
    log0(f"megatrain pretrain | {run.describe(model.num_params())} | data {cfg.data.path}")
    if init_line:
        log0(init_line)
    startup.mark("model")
    engine = run.engine(model, weights, release=init.close if init is not None else None)
    state = run.resume(engine)
    startup.mark("engine")
    if state.step >= cfg.train.max_steps:
        log0(f"already trained to step {state.step} (train.max_steps={cfg.train.max_steps}); raise it to train further")
    task = pretraining_task(cfg, tok)
    throughput = Throughput.of(run, task, cfg.data.seq_len, engine.module)
    startup.mark("MFU peak")
    log0(startup.line())
    t0 = time.perf_counter()
    state = train(run, engine, train_ds, valid_ds, task, state, throughput, eval_sets)
    log0(f"done: step {state.step}, {time.perf_counter() - t0:.1f} s; checkpoint in {cfg.checkpoint.dir}")
    if (cfg.model.objective == "causal" and state.step >= cfg.train.max_steps and run.layout.tp == run.layout.pp == 1
            and cfg.parallel.ep == 1):  # (a model split over ranks: no plain copy on rank 0)
        print_sample(engine, cfg, tok)
    return dict(step=state.step, consumed_samples=state.consumed_samples)


def print_sample(engine, cfg: Config, tok) -> None:
    """A short generation from the trained model, on rank 0, from a plain copy of the weights (ZeRO-3
    weights are gathered for the copy; the engine's module keeps DeepSpeed hooks that expect every rank)."""
    import deepspeed

    from megatrain.generate import generate
    from megatrain.model import Transformer

    model, state = engine.module, None
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=cfg.parallel.zero_stage == 3):
        if dist.get_rank() == 0:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dist.get_rank() != 0:
        return
    plain = Transformer(cfg.model).to(engine.device)
    plain.load_state_dict(state)
    prompt = "def " if "stdlib" in str(cfg.data.path) else ""
    ids = tok.encode(prompt) if prompt else [tok.eod_id]
    out = generate(plain, torch.tensor([ids], device=engine.device), max_new_tokens=80, temperature=0.8, top_k=40,
                   seed=cfg.train.seed, vocab_limit=tok.vocab_size)
    print("sample:\n" + tok.decode(out[0].tolist()), flush=True)


def command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    run(cfg)
    return 0


if __name__ == "__main__":  # `python -m megatrain.pretrain` (what every launcher runs) = `megatrain pretrain`
    from megatrain.cli import main

    raise SystemExit(main(["pretrain", *sys.argv[1:]]))
