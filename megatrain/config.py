"""The one typed config: dataclasses per section, loaded from YAML presets plus `--set` overrides.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=100", "parallel.zero_stage=2"])

Every knob has a default and a one-line comment here; YAML presets in configs/ override a few. An
unknown key, a value of the wrong type or an impossible combination raises ConfigError with one line
naming the key (and the closest known name for a typo).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


def shipped_dir(folder: str) -> Path:
    """configs/ or ds_configs/: in the repository (editable install), else where setup.py put them
    for a regular install, <prefix>/share/megatrain/."""
    in_repo = Path(__file__).resolve().parent.parent / folder
    return in_repo if in_repo.is_dir() else Path(sys.prefix) / "share" / "megatrain" / folder


PRESET_DIR = shipped_dir("configs")


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


class RunStopped(RuntimeError):
    """A run that cannot go on (non-finite losses in a row, a full disk, a lost rank); the message says where it
    stopped and how to continue."""


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: take it from the tokenizer (rounded up to pad_vocab_multiple)
    pad_vocab_multiple: int = 64  # round the embedding rows up to a multiple of this (fast matmuls, TP-divisible)
    true_vocab_size: int = 0  # rows of vocab_size that are real tokens (from-hf sets it when it pads); 0: the tokenizer's
    n_layers: int = 2  # Transformer blocks
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int = 0  # key/value heads for grouped-query attention; 0: same as n_heads (plain MHA)
    d_model: int = 128  # residual stream width
    d_ff: int = 0  # MLP hidden width; 0: 4*d_model for gelu, 8/3*d_model rounded to ff_multiple for swiglu
    ff_multiple: int = 64  # swiglu hidden width is rounded up to a multiple of this
    max_seq_len: int = 256  # longest sequence (learned positions table size, RoPE cache length)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5  # epsilon inside the norm
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0  # RoPE base frequency
    mlp: str = "swiglu"  # swiglu | gelu
    gelu: str = "tanh"  # mlp=gelu's form: tanh (GPT-2's approximation) | erf (the exact one: nanoGPT, BERT, Pythia)
    bias: bool = False  # biases in linear layers and layernorm
    tie_embeddings: bool = False  # share the input embedding with the output projection
    dropout: float = 0.0  # dropout on attention probabilities, residual branches and embeddings
    init_std: float = 0.02  # std of the normal init; residual output projections get init_std/sqrt(2*n_layers)
    objective: str = "causal"  # causal (GPT next-token) | mlm (BERT-style masked LM, bidirectional)
    fused_kernels: str = "auto"  # auto (fused ops when megatrain._C is built) | on | off (plain PyTorch)


@dataclass
class DataConfig:
    path: Any = None  # dataset prefix (P for P.bin/P.idx), or a blend [w1, P1, w2, P2, ...]; unset: built-in corpus
    tokenizer: str = "byte"  # tokenizer spec the dataset was made with (see `megatrain preprocess --help`)
    seq_len: int = 128  # tokens per training sample (the model sees seq_len, predicts seq_len)
    split: str = "969,30,1"  # train/valid/test weights, split by documents
    cache_dir: str = ""  # where sample indices are cached; empty: next to the data
    # where the training windows start: fixed (every seq_len tokens of the epoch's stream) or random (each epoch from
    # an offset in [0, seq_len) drawn by train.seed for that epoch: one long document is cut differently every epoch)
    sample_offsets: str = "fixed"
    mlm_probability: float = 0.15  # share of tokens masked for the mlm objective (80% mask, 10% random, 10% kept)


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    seed: int = 1234  # seed for init, data order and dropout
    global_batch_size: int = 16  # samples per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 4  # samples per forward/backward on one rank; accumulation fills the rest
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 20  # linear warmup from 0 to lr
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    weight_decay: float = 0.1  # AdamW decay for matrices; norms, biases and embeddings get none
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: off
    eval_interval: int = 100  # run validation every this many steps (and at the end); 0: never
    eval_iters: int = 10  # validation micro-batches per evaluation
    log_interval: int = 10  # console/metrics line every this many steps
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    exit_duration_minutes: float = 0.0  # save and exit cleanly after this many minutes; 0: no limit
    activation_checkpointing: str = "none"  # none | full (recompute each block) | selective (recompute attention)
    max_bad_steps: int = 3  # a non-finite loss or gradient norm skips that update; this many in a row stop the run


@dataclass
class ParallelConfig:
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory (stage >= 1)
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    tp: int = 1  # tensor-parallel ranks: attention heads, MLP, embedding and LM head split Megatron-style
    pp: int = 1  # pipeline-parallel stages (DeepSpeed PipelineModule, 1F1B); needs zero_stage <= 1
    sequence_parallel: bool = False  # with tp > 1: norms/dropout on sequence shards, reduce-scatter/all-gather
    partition_activations: bool = False  # with activation checkpointing and tp > 1: split saved inputs over TP ranks
    drift_check_interval: int = 100  # compare TP-replicated weights (norms, biases) across TP ranks every N steps; 0: off
    timeout_minutes: float = 10.0  # a collective that waits longer than this fails (a lost rank, a hung peer); DeepSpeed: 30


@dataclass
class CheckpointConfig:
    dir: str = "runs/tiny"  # checkpoints, metrics.jsonl and TensorBoard events go here
    interval: int = 100  # save every this many steps (and at the end); 0: only at the end
    resume: bool = True  # continue from dir/latest when it exists
    keep_last: int = 0  # keep only this many newest checkpoints; 0: keep all
    init: str = ""  # start from these weights (a checkpoint of any layout, or a convert output); the model's shape and
    #                 tokenizer come from it and the optimizer starts afresh. Resuming checkpoint.dir/latest wins.


@dataclass
class LoggingConfig:
    tensorboard: bool = True  # write TensorBoard events to checkpoint.dir/tensorboard
    wandb: bool = False  # log to Weights & Biases
    wandb_project: str = "megatrain"  # W&B project
    wandb_mode: str = "offline"  # offline | online | disabled (offline needs no network)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: known GPU table, or measured torch.mm on CPU
    progress_bar: str = "auto"  # auto (on a terminal) | on | off


@dataclass
class FinetuneConfig:
    task: str = ""  # sft | classify | tokens | qa; empty: not a fine-tuning run
    init: str = ""  # the pretrained model: a megatrain checkpoint of any layout, a convert output, or a Hugging Face
    #                 folder (read through from-hf's maps); the model's shape and tokenizer come from it
    train_file: str = ""  # training examples (see format)
    valid_file: str = ""  # evaluated every train.eval_interval steps; the best checkpoint is kept by metric_for_best
    test_file: str = ""  # evaluated once at the end
    format: str = "auto"  # auto (from the extension) | jsonl | csv | tsv | conll | squad
    text_column: str = "text"  # classify: the field (jsonl) or column (csv/tsv) holding the text
    text_pair_column: str = "text_pair"  # classify: an optional second text (pairs are joined by end-of-document)
    label_column: str = "label"  # classify: the field or column holding the label (any string)
    max_seq_len: int = 0  # tokens per example (longer ones are truncated, counted in the log); 0: model.max_seq_len
    epochs: float = 0.0  # when > 0: train.max_steps = epochs x training examples (rows, for sft) / global batch
    metric_for_best: str = ""  # the evaluation metric that picks DIR/best; empty: the task's own (listed in README)
    patience: int = 0  # stop after this many evaluations without a better metric_for_best; 0: never stop early
    labels: list = field(default_factory=list)  # classify/tokens: the label names in id order (derived from train_file)
    scheme: str = "iob2"  # tokens: iob1 | iob2 | bioes, checked on every file
    pooling: str = "auto"  # classify: auto (last real token for a causal model, mean for mlm) | last | mean | first
    pack: bool = True  # sft: several examples per sequence (attention never crosses them)
    doc_stride: int = 64  # qa: context tokens shared by consecutive windows of a long context
    max_answer_tokens: int = 30  # qa: the longest answer span predicted
    lora_rank: int = 0  # LoRA adapters of this rank on lora_targets (the rest frozen); 0: full fine-tuning
    lora_alpha: float = 16.0  # LoRA scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "qkv,o_proj,gate_up,up,down"  # the projections that get adapters (of those the model has)
    freeze: str = ""  # comma-separated: embeddings, blocks:N (the first N blocks), all_but_head


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.position": ("rope", "learned"),
    "model.mlp": ("swiglu", "gelu"),
    "model.gelu": ("tanh", "erf"),
    "model.objective": ("causal", "mlm"),
    "data.sample_offsets": ("fixed", "random"),
    "model.fused_kernels": ("auto", "on", "off"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.lr_schedule": ("cosine", "linear", "constant"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "logging.progress_bar": ("auto", "on", "off"),
    "finetune.task": ("", "sft", "classify", "tokens", "qa"),
    "finetune.format": ("auto", "jsonl", "csv", "tsv", "conll", "squad"),
    "finetune.scheme": ("iob1", "iob2", "bioes"),
    "finetune.pooling": ("auto", "last", "mean", "first"),
}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the field type; ints are accepted for floats, nothing else is converted."""
    if typ is Any:
        return value
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected true or false, got {value!r}")
    if typ is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"config key {key}: expected a list, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and key in CHOICES and "on" in CHOICES[key]:
            return "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. data.split: 1 in YAML
        raise ConfigError(f"config key {key}: expected a string, got {value!r}")
    return value


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset ('tiny' -> configs/tiny.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file or preset{_suggest(name_or_path, names)}; presets: {', '.join(names)}")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set `section.key` values (already parsed) on cfg, checking names and types."""
    classes = _section_classes()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in classes or not key:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(dotted, all_keys())}; keys are section.name, sections: {', '.join(classes)}")
        fields = {f.name: f for f in dataclasses.fields(classes[section])}
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted, all_keys())}")
        typ = typing.get_type_hints(classes[section])[key]
        setattr(getattr(cfg, section), key, _coerce(dotted, value, typ))
    return cfg


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _section_classes().items() for f in dataclasses.fields(cls)]


def _flatten(tree: dict, where: str) -> dict[str, Any]:
    out = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model:, data:, train:, ...)")
    for section, values in tree.items():
        if not isinstance(section, str):  # YAML keys can be null, numbers, lists...
            raise ConfigError(f"{where}: {section!r} is not a section name (model:, data:, train:, ...)")
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown config section {section!r}{_suggest(section, SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of key: value")
        for k, v in values.items():
            out[f"{section}.{k}"] = v
    return out


def parse_set(item: str) -> tuple[str, Any]:
    """'train.max_steps=100' -> ('train.max_steps', 100); values are YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class _UniqueKeys(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | None = "tiny", sets: list[str] | None = None) -> Config:
    """Defaults <- preset/YAML file <- `--set` overrides, then validate. `cfg.explicit` holds the keys the file or
    the command line set (a checkpoint's model may not be contradicted by them)."""
    cfg = Config()
    explicit: set[str] = set()
    if path:
        p = resolve_preset(path)
        try:
            tree = yaml.load(p.read_text(), Loader=_UniqueKeys) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        flat = _flatten(tree, str(p))
        apply_overrides(cfg, flat)
        explicit |= set(flat)
    overrides = dict(parse_set(s) for s in sets or [])
    apply_overrides(cfg, overrides)
    cfg.explicit = explicit | set(overrides)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config saved with to_dict() (e.g. from a checkpoint)."""
    cfg = Config()
    apply_overrides(cfg, _flatten(tree, "saved config"))
    return cfg


def ffn_width(m: ModelConfig) -> int:
    if m.d_ff:
        return m.d_ff
    if m.mlp == "gelu":
        return 4 * m.d_model
    hidden = int(8 * m.d_model / 3)
    return -(-hidden // m.ff_multiple) * m.ff_multiple


def padded_vocab_size(n: int, pad_vocab_multiple: int, tp: int) -> int:
    """The embedding rows for an n-piece tokenizer: rounded up to pad_vocab_multiple and to a multiple of tp."""
    step = math.lcm(pad_vocab_multiple, tp)
    return -(-n // step) * step


def kv_heads(m: ModelConfig) -> int:
    return m.n_kv_heads or m.n_heads


def validate(cfg: Config) -> None:
    """Checks that need no world size: choices, ranges and combinations."""
    for dotted, options in CHOICES.items():
        section, key = dotted.split(".")
        v = getattr(getattr(cfg, section), key)
        if v not in options:
            raise ConfigError(f"config key {dotted}: {v!r} is not one of {', '.join(options)}{_suggest(str(v), options)}")
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    positive = {"model.n_layers": m.n_layers, "model.n_heads": m.n_heads, "model.d_model": m.d_model,
                "model.max_seq_len": m.max_seq_len, "data.seq_len": d.seq_len, "train.max_steps": t.max_steps,
                "train.global_batch_size": t.global_batch_size, "train.micro_batch_size": t.micro_batch_size,
                "train.log_interval": t.log_interval, "parallel.tp": p.tp, "parallel.pp": p.pp,
                "model.pad_vocab_multiple": m.pad_vocab_multiple}
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"config key {k}: must be at least 1, got {v}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"config key model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if (m.d_model // m.n_heads) % 2 and m.position == "rope":
        raise ConfigError(f"config key model.n_heads: head size {m.d_model // m.n_heads} must be even for RoPE")
    if m.n_heads % kv_heads(m):
        raise ConfigError(f"config key model.n_kv_heads: model.n_heads={m.n_heads} is not divisible by {kv_heads(m)}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"config key data.seq_len: {d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"config key model.dropout: must be in [0, 1), got {m.dropout}")
    if not 0.0 < d.mlm_probability < 1.0:
        raise ConfigError(f"config key data.mlm_probability: must be in (0, 1), got {d.mlm_probability}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key parallel.zero_stage: must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("config key parallel.offload_params: needs parallel.zero_stage=3")
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError("config key parallel.offload_optimizer: needs parallel.zero_stage >= 1")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"config key parallel.zero_stage: ZeRO-{p.zero_stage} cannot be combined with pipeline "
                          f"parallelism (parallel.pp={p.pp}); DeepSpeed supports ZeRO-0/1 with pipelines")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("config key parallel.sequence_parallel: needs parallel.tp > 1")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"config key train.global_batch_size: {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if t.min_lr > t.lr:
        raise ConfigError(f"config key train.min_lr: {t.min_lr} exceeds train.lr={t.lr}")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key train.warmup_steps: must be at least 0, got {t.warmup_steps}")
    if not p.timeout_minutes > 0:
        raise ConfigError(f"config key parallel.timeout_minutes: must be above 0, got {p.timeout_minutes}")
    nonnegative = {"train.lr": t.lr, "train.min_lr": t.min_lr, "train.weight_decay": t.weight_decay,
                   "train.grad_clip": t.grad_clip, "train.eval_interval": t.eval_interval, "train.eval_iters":
                   t.eval_iters, "checkpoint.interval": cfg.checkpoint.interval,
                   "checkpoint.keep_last": cfg.checkpoint.keep_last, "train.exit_duration_minutes":
                   t.exit_duration_minutes, "parallel.drift_check_interval": p.drift_check_interval}
    for k, v in nonnegative.items():
        if not v >= 0:
            raise ConfigError(f"config key {k}: must be at least 0, got {v}")
    if t.max_bad_steps < 1:
        raise ConfigError(f"config key train.max_bad_steps: must be at least 1, got {t.max_bad_steps}")
    f = cfg.finetune
    for k in ("max_seq_len", "patience", "lora_rank"):
        if getattr(f, k) < 0:
            raise ConfigError(f"config key finetune.{k}: must be at least 0, got {getattr(f, k)}")
    for k in ("doc_stride", "max_answer_tokens"):
        if getattr(f, k) < 1:
            raise ConfigError(f"config key finetune.{k}: must be at least 1, got {getattr(f, k)}")
    if f.epochs < 0 or f.lora_alpha <= 0 or not 0 <= f.lora_dropout < 1:
        bad = "epochs" if f.epochs < 0 else "lora_alpha" if f.lora_alpha <= 0 else "lora_dropout"
        raise ConfigError(f"config key finetune.{bad}: out of range ({getattr(f, bad)})")


def validate_world(cfg: Config, world_size: int) -> int:
    """Checks that need the world size; returns gradient accumulation steps."""
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp)
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"config key train.global_batch_size: {cfg.train.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel ranks = {cfg.train.micro_batch_size} x {dp} = {per_step}")
    return cfg.train.global_batch_size // per_step

