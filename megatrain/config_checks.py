"""The config checks of combinations: sequence-length warmup, expert and context parallelism, evaluation sets and
generation metrics against the rest of the config, and what needs the world size (validate_world). config.validate
calls them; config re-exports them."""
from __future__ import annotations

import difflib

from megatrain.model_config import ConfigError

GENERATION_METRICS = ("exact_match", "rouge", "bleu", "chrf")  # finetune.generation_metrics (tasks/metrics.py)

# (the annotations name config.py's sections: strings here, as config.py imports this module)


def seq_len_warmup_lengths(seq_len: int, keep_tokens: bool) -> list[int]:
    """The lengths a sequence-length warmup step may have below seq_len, ascending: multiples of 8 (kernel-friendly
    shapes; rows split over up to 8 context- or sequence-parallel ranks), and divisors of seq_len when every token is
    kept (a sample is reshaped into whole rows)."""
    return [n for n in range(8, seq_len, 8) if not keep_tokens or seq_len % n == 0]


def _validate_seq_len_warmup(cfg: Config) -> None:
    t, T = cfg.train, cfg.data.seq_len
    if t.seq_len_warmup_steps < 0:
        raise ConfigError(f"config key train.seq_len_warmup_steps: must be at least 0 (0: off), got "
                          f"{t.seq_len_warmup_steps}")
    if not t.seq_len_warmup_steps:
        return
    if cfg.finetune.task:
        raise ConfigError(f"config key train.seq_len_warmup_steps: {t.seq_len_warmup_steps} with finetune.task="
                          f"{cfg.finetune.task}; sequence-length warmup is for pretraining only, set it to 0")
    # DeepSpeed's pipeline engine sizes its receive buffers from the first batch (megatrain sets no dynamic_shape)
    if cfg.parallel.pp > 1:
        raise ConfigError(f"config key train.seq_len_warmup_steps: {t.seq_len_warmup_steps} with parallel.pp="
                          f"{cfg.parallel.pp}; the pipeline needs one sequence length, set it to 0 or parallel.pp=1")
    p = cfg.parallel
    shard = p.cp * (p.tp if p.sequence_parallel else 1)  # each rank holds 1/shard of a row: it must divide 8
    if 8 % shard:
        raise ConfigError(f"config key train.seq_len_warmup_steps: {t.seq_len_warmup_steps} with rows split over "
                          f"parallel.cp{' x tp' if p.sequence_parallel else ''} = {shard} ranks, which does not divide "
                          f"the warmup lengths (multiples of 8); set it to 0")
    start, keep = t.seq_len_warmup_start, t.seq_len_warmup_keep_tokens
    key = "config key train.seq_len_warmup_start"
    if start < 8:
        raise ConfigError(f"{key}: must be at least 8, got {start}")
    if start >= T:
        raise ConfigError(f"{key}: {start} is not below data.seq_len={T}; set a shorter first length")
    if start % 8 or (keep and T % start):
        near = sorted(sorted(seq_len_warmup_lengths(T, keep), key=lambda n: abs(n - start))[:2])
        what = ("is not a multiple of 8" if start % 8 else
                f"does not divide data.seq_len={T} (seq_len_warmup_keep_tokens cuts each sample into rows that long)")
        fix = (f"e.g. {' or '.join(map(str, near))}" if near else
               f"no multiple of 8 below data.seq_len={T} divides it; set train.seq_len_warmup_keep_tokens=false")
        raise ConfigError(f"{key}: {start} {what}; {fix}")


def _validate_expert_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    if not m.moe_experts or m.moe_experts % p.ep:
        raise ConfigError(f"config key parallel.ep: {p.ep} needs a MoE model whose model.moe_experts "
                          f"({m.moe_experts}) it divides")
    if p.zero_stage not in (1, 2):
        why = ("each rank's experts are kept in its ZeRO optimizer partition" if p.zero_stage == 0 else
               "ZeRO-3 would gather each expert over the data-parallel ranks, which is what expert parallelism avoids")
        raise ConfigError(f"config key parallel.zero_stage: {p.zero_stage} with parallel.ep={p.ep}; expert "
                          f"parallelism needs ZeRO-1 or ZeRO-2 ({why})")


def _validate_context_parallel(cfg: Config) -> None:
    m, p, d = cfg.model, cfg.parallel, cfg.data
    why = ("pipeline stages (parallel.pp)" if p.pp > 1 else "Mixture-of-Experts models" if m.moe_experts else
           "fine-tuning (finetune.task)" if cfg.finetune.task else "")
    if why:
        raise ConfigError(f"config key parallel.cp: {p.cp} is not available with {why}; set parallel.cp=1")
    if m.n_heads % (p.tp * p.cp):
        raise ConfigError(f"config key parallel.cp: model.n_heads={m.n_heads} is not divisible by tp x cp = "
                          f"{p.tp} x {p.cp}; each context-parallel rank attends over n_heads / (tp x cp) heads")
    # (KV heads need no check: a TP rank's are repeated up to lcm(n_kv / tp, cp), which divides n_heads / tp too)
    shard = p.cp * (p.tp if p.sequence_parallel else 1)
    if d.seq_len % shard:
        raise ConfigError(f"config key data.seq_len: {d.seq_len} is not divisible by parallel.cp"
                          f"{' x tp' if p.sequence_parallel else ''} = {shard} (each rank holds an equal slice)")


def validate_world(cfg: Config, world_size: int) -> int:
    """Checks that need the world size; returns gradient accumulation steps."""
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    if dp % cfg.parallel.cp:
        raise ConfigError(f"config key parallel.cp: {cfg.parallel.cp} does not divide the {dp} data-parallel ranks "
                          f"(world {world_size} / (tp {cfg.parallel.tp} x pp {cfg.parallel.pp}))")
    dp //= cfg.parallel.cp  # the ranks of a context-parallel group read the same samples
    if dp % cfg.parallel.ep:
        raise ConfigError(f"config key parallel.ep: {cfg.parallel.ep} does not divide the {dp} data-parallel ranks "
                          f"(world {world_size} / (tp {cfg.parallel.tp} x pp {cfg.parallel.pp}))")
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"config key train.global_batch_size: {cfg.train.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel ranks = {cfg.train.micro_batch_size} x {dp} = {per_step}")
    return cfg.train.global_batch_size // per_step



def _validate_evals(cfg: Config) -> None:
    """train.eval_sets and train.eval_tasks against the rest (their paths are checked where the run starts)."""
    t = cfg.train
    for name in t.eval_sets:
        if not name or "/" in name or name != name.strip() or " " in name:
            raise ConfigError(f"config key train.eval_sets: {name!r} is not a name to log val_loss/NAME under; use "
                              f"letters, digits, - and _")
    if t.eval_sets and cfg.finetune.task:
        raise ConfigError(f"config key train.eval_sets: a pretraining setting (fine-tuning evaluates "
                          f"finetune.valid_file); remove it for finetune.task={cfg.finetune.task}")
    if t.eval_sets and not t.eval_interval:
        raise ConfigError("config key train.eval_sets: evaluated every train.eval_interval steps, which is 0 (never); "
                          "set train.eval_interval")
    if t.eval_tasks_limit < 0 or (t.eval_tasks_limit > 1 and not float(t.eval_tasks_limit).is_integer()):
        raise ConfigError(f"config key train.eval_tasks_limit: {t.eval_tasks_limit:g} is neither a count of examples "
                          f"(1, 2, ...) nor a share of them between 0 and 1 (0: all)")
    if t.eval_tasks.strip() and cfg.model.objective != "causal":
        raise ConfigError(f"config key train.eval_tasks: lm-eval scores causal language models (model.objective="
                          f"{cfg.model.objective}); set it to \"\"")


def _validate_generation_metrics(cfg: Config) -> None:
    f, p = cfg.finetune, cfg.parallel
    key = "config key finetune.generation_metrics"
    for name in f.generation_metrics:
        if name not in GENERATION_METRICS:
            close = difflib.get_close_matches(str(name), GENERATION_METRICS, n=1, cutoff=0.6)
            raise ConfigError(f"{key}: {name!r} is not one of {', '.join(GENERATION_METRICS)}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
    if f.generation_max_new_tokens < 1:
        raise ConfigError(f"config key finetune.generation_max_new_tokens: must be at least 1, got "
                          f"{f.generation_max_new_tokens}")
    if not f.generation_metrics:
        return
    if f.task != "sft":
        raise ConfigError(f"{key}: scores the responses of a finetune.task=sft model, not "
                          f"finetune.task={f.task or '(empty)'}; remove it")
    # each rank generates its share of the examples alone, from whole weights (ZeRO-3's are gathered into a copy);
    # a model whose layers are split over ranks would need every rank in step for each token
    split = [f"parallel.{k}={n}" for k, n in (("tp", p.tp), ("pp", p.pp), ("ep", p.ep)) if n > 1]
    if split:
        raise ConfigError(f"{key}: responses are generated from each rank's whole model, which {' and '.join(split)} "
                          f"splits over ranks; fine-tune with data parallelism (ZeRO 0-3) or remove it")


def _validate_compile(cfg: Config) -> None:
    """model.compile: the layouts whose blocks are compiled and tested as such (the rest say so in one line)."""
    p, t = cfg.parallel, cfg.train
    other = [f"parallel.{k}={v}" for k, v in (("tp", p.tp), ("pp", p.pp), ("cp", p.cp), ("ep", p.ep)) if v > 1]
    if p.zero_stage == 3:
        other.append("parallel.zero_stage=3 (its parameter hooks fire inside the blocks)")
    if t.activation_checkpointing == "selective":
        other.append("train.activation_checkpointing=selective (use full, or none)")
    if other:
        raise ConfigError(f"config key model.compile: not with {other[0]}; compiled blocks run with data parallelism "
                          f"and ZeRO 0-2 (set model.compile=false for this layout)")
