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

from megatrain.config import Config, ConfigError, load_config, validate_world
from megatrain.data import build_gpt_datasets, build_tokenizer
from megatrain.training.dist_env import init_distributed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="a YAML file, or a preset name from configs/ (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def log0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def check_data_path(cfg: Config) -> None:
    from megatrain.data import parse_data_path
    from megatrain.data.indexed import dataset_exists

    if cfg.data.path in (None, "", []):
        return
    for _, prefix in parse_data_path(cfg.data.path):
        if not dataset_exists(prefix):
            raise ConfigError(f"config key data.path: {prefix}.bin/.idx: no such file; make it with "
                              f"`megatrain preprocess --output-prefix {prefix} ...`, or unset data.path for the built-in corpus")


def setup_data(cfg: Config):
    """The tokenizer and train/valid datasets; the built-in corpus when data.path is unset."""
    if cfg.data.path in (None, "", []):
        from megatrain.corpus import builtin_corpus_paths, ensure_builtin_corpus

        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            ensure_builtin_corpus(log0)  # one builder per node; the others wait at the barrier
        dist.barrier()
        cfg.data.path, cfg.data.tokenizer = builtin_corpus_paths()
    tok = build_tokenizer(cfg.data.tokenizer)
    t = cfg.train
    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train_ds, valid_ds, _ = build_gpt_datasets(cfg.data.path, cfg.data.split, cfg.data.seq_len,
                                               [t.max_steps * t.global_batch_size, n_valid, 0], t.seed,
                                               cfg.data.cache_dir or None)
    return tok, train_ds, valid_ds


def run(cfg: Config) -> dict:
    from megatrain.model import Transformer
    from megatrain.parallel.parallelize import parallelize
    from megatrain.parallel.topology import build_grid, check_layout
    from megatrain.training import checkpoint
    from megatrain.training.dist_env import discover
    from megatrain.training.engine import build_engine, resolve_precision
    from megatrain.training.loop import BatchMaker, TrainState, train
    from megatrain.training.metrics import peak_tflops, train_flops_per_token

    check_data_path(cfg)  # fail in one line before any distributed setup
    layout = check_layout(cfg, discover().world_size)  # likewise every invalid TP x PP x DP layout
    info = init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    grad_accum = validate_world(cfg, world)
    grid = build_grid(layout)
    _, dp_rank, _ = layout.coords(rank)
    tok, train_ds, valid_ds = setup_data(cfg)
    if cfg.model.vocab_size == 0:
        m = max(cfg.model.pad_vocab_multiple, cfg.parallel.tp)
        cfg.model.vocab_size = -(-tok.vocab_size // m) * m
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"config key model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    if cfg.model.objective == "mlm" and tok.mask_id is None:
        raise ConfigError(f"model.objective=mlm needs a tokenizer with a mask token; {cfg.data.tokenizer} has none")
    torch.manual_seed(cfg.train.seed)  # every rank builds the same full model, then keeps its slice
    model = Transformer(cfg.model)
    n_params = model.num_params()
    module = parallelize(model, cfg, layout, grid)
    local_params = sum(p.numel() for p in module.parameters())  # before ZeRO-3 partitions them
    precision = resolve_precision(cfg)
    engine, _, _, _ = build_engine(cfg, module, world, mpu=None if layout.pp > 1 else grid)
    layout_rec = dict(world_size=world, dp=layout.dp, tp=layout.tp, pp=layout.pp, zero_stage=cfg.parallel.zero_stage,
                      sequence_parallel=cfg.parallel.sequence_parallel)
    log0(f"megatrain pretrain | launcher {info.launcher} | world {world} = {layout} | ZeRO-{cfg.parallel.zero_stage} | "
         f"{precision} | {n_params / 1e6:.2f}M parameters | grad accumulation {grad_accum} | data {cfg.data.path}")
    log_rank_table(local_params, layout)
    state = TrainState()
    saved = checkpoint.resume(engine, cfg, layout_rec)
    if saved:
        state = TrainState(saved["step"], saved["consumed_samples"])
        log0(f"resumed from {cfg.checkpoint.dir}/{checkpoint.tag_for(state.step)} at step {state.step} "
             f"({state.consumed_samples:,} samples consumed)")
    if state.step >= cfg.train.max_steps:
        log0(f"already trained to step {state.step} (train.max_steps={cfg.train.max_steps}); raise it to train further")
    peak, peak_src = peak_tflops(cfg)
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    log0(f"FLOPs/token (train) {flops_per_token:,.0f} | MFU peak {peak:.2f} TFLOP/s ({peak_src})")
    make = BatchMaker(cfg.model.objective, cfg.train.seed, tok.mask_id, tok.vocab_size, cfg.data.mlm_probability,
                      tuple(i for i in (tok.eod_id, tok.pad_id, tok.bos_id) if i is not None))
    t0 = time.perf_counter()
    state = train(cfg, engine, train_ds, valid_ds, make, state, grad_accum, layout, dp_rank, grid, flops_per_token,
                  peak, layout_rec)
    log0(f"done: step {state.step}, {time.perf_counter() - t0:.1f} s; checkpoint in {cfg.checkpoint.dir}")
    if cfg.model.objective == "causal" and state.step >= cfg.train.max_steps and layout.tp == layout.pp == 1:
        print_sample(engine, cfg, tok)
    return dict(step=state.step, consumed_samples=state.consumed_samples)


def log_rank_table(local_params: int, layout) -> None:
    """Each rank's place in the layout, its parameter count and its memory, printed by rank 0."""
    import resource

    if torch.cuda.is_available():
        mem = f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB GPU"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (dist.get_rank(), local_params, mem))
    for r, n, m in rows:
        pp, dp, tp = layout.coords(r)
        log0(f"  rank {r:>3}: pp {pp} dp {dp} tp {tp} | {n / 1e6:8.2f}M parameters | {m}")


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
                   seed=cfg.train.seed)
    print("sample:\n" + tok.decode(out[0].tolist()), flush=True)


def command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    run(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatrain pretrain", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    from megatrain.cli import user_error_types

    try:
        return command(args)
    except user_error_types() as e:
        print(f"megatrain pretrain: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
