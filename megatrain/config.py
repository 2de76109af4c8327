"""The one typed config: dataclasses per section, loaded from YAML presets plus `--set` overrides.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=100", "parallel.zero_stage=2"])

Every knob has a default and a comment here (the model section's in model_config.py): the comment lines right above
its line and the comment at the end of it. They are the key's documentation: `python -m megatrain.config_docs`
turns them into docs/configuration.md, and a test fails on a key without one. YAML presets in configs/ override a
few. An unknown key, a value of the wrong type or an impossible combination raises ConfigError with one line naming
the key (and the closest known name for a typo).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from megatrain.model_config import (MODEL_CHOICES, ConfigError, ModelConfig, _Section, ffn_width,  # noqa: F401
                                    has_window_layers, head_dim, is_local_layer, is_moe_layer, kv_heads, kv_repeat,
                                    moe_ffn_width, padded_vocab_size, shared_ffn_width, validate_model)
from megatrain.config_checks import (_validate_compile, _validate_context_parallel, _validate_evals,  # noqa: F401
                                     _validate_expert_parallel, _validate_generation_metrics, _validate_seq_len_warmup,
                                     seq_len_warmup_lengths, validate_world)


def shipped_dir(folder: str) -> Path:
    """configs/ or ds_configs/: in the repository (editable install), else where setup.py put them
    for a regular install, <prefix>/share/megatrain/."""
    in_repo = Path(__file__).resolve().parent.parent / folder
    return in_repo if in_repo.is_dir() else Path(sys.prefix) / "share" / "megatrain" / folder


PRESET_DIR = shipped_dir("configs")


class RunStopped(RuntimeError):
    """A run that cannot go on (non-finite losses in a row, a full disk, a lost rank); the message says where it
    stopped and how to continue."""


@dataclass
class DataConfig(_Section):
    """The pretraining data: a tokenized dataset (or the built-in corpus), how it is split and cut into samples."""

    # dataset prefix P of P.bin/P.idx (written by megatrain preprocess), or a weighted blend [w1, P1, w2, P2, ...],
    # e.g. [0.7, data/web, 0.3, data/code]; unset: the built-in corpus
    path: str | list | None = None
    # the tokenizer the data was made with: byte, a sentencepiece .model file, a tokenizer.json, or a folder holding
    # one (see megatrain preprocess --help); unset with checkpoint.init or finetune.init: theirs (a tokenizer of
    # another vocabulary than theirs is refused)
    tokenizer: str = "byte"
    # tokens per training sample (the model reads seq_len tokens and predicts the next seq_len); at most
    # model.max_seq_len (starting from weights, cut to their max_seq_len unless set)
    seq_len: int = 128
    # train/valid/test weights (up to three, comma-separated, scaled to sum to 1); the documents are split in
    # contiguous ranges in this proportion
    split: str = "969,30,1"
    cache_dir: str = ""  # where the sample indices are cached; empty: next to the data
    # where the training windows start: fixed (every seq_len tokens of each epoch's shuffled stream) | random (each
    # epoch from its own offset in [0, seq_len) drawn from train.seed: one long document is cut differently every
    # epoch; resumable, and an extended run keeps what was served). Validation windows stay fixed
    sample_offsets: str = "fixed"
    # objective=mlm: the share of tokens made targets, in (0, 1); of those 80% become the mask token, 10% a random
    # token and 10% stay as they are
    mlm_probability: float = 0.15
    # objective=causal: a sample's tokens attend only within their own document (a document ends at the tokenizer's
    # end-of-document token, which belongs to it), its positions restarting at each document's first token;
    # attention runs document by document (no [T, T] mask). Not with pipeline stages. false: across the whole sample
    document_attention: bool = False


@dataclass
class TrainConfig(_Section):
    """The optimization: steps, batch, AdamW and its learning-rate schedule, evaluation, precision, stopping."""

    # optimizer steps; a rerun with a larger value resumes and goes on (the schedule follows the new length);
    # finetune.epochs > 0 sets it
    max_steps: int = 200
    # seed for the initial weights, data order, random sample offsets, MLM masking and dropout; a fine-tuning
    # run's new parts (task head, LoRA adapters) start from it and their names
    seed: int = 1234
    # samples per optimizer step over all data-parallel ranks, the same whatever the world size; a multiple of
    # micro_batch_size x data-parallel ranks
    global_batch_size: int = 16
    micro_batch_size: int = 4  # samples per forward/backward on one rank; gradient accumulation fills the rest
    lr: float = 1e-3  # peak learning rate, reached at the end of the warmup
    min_lr: float = 1e-4  # learning rate at max_steps for the cosine and linear schedules; at most lr
    # linear warmup from 0 to lr over this many steps; finetune.epochs caps it at a tenth of the run
    warmup_steps: int = 20
    # after the warmup: cosine (decay to min_lr at max_steps) | linear (the same, in a straight line) | constant (lr)
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1  # AdamW decay for matrices; norms, biases and embeddings get none
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm (over every rank) to this; 0: off
    # run validation every this many steps and at the end; 0: never. Fine-tuning evaluates finetune.valid_file
    eval_interval: int = 100
    # validation global batches (of global_batch_size samples) per pretraining evaluation; fine-tuning evaluates
    # its whole finetune.valid_file
    eval_iters: int = 10
    # more pretraining validation sets, evaluated with the validation split and logged as val_loss/NAME and
    # val_ppl/NAME: {NAME: PATH, ...}, each a preprocessed prefix of the same tokenizer read through its validation
    # split (data.split), e.g. one per domain of a blend; {}: none
    eval_sets: dict = field(default_factory=dict)
    # lm-eval tasks (comma-separated names) run on each saved checkpoint in a background process on rank 0's node,
    # one checkpoint at a time, while training goes on; each score is logged at that checkpoint's step as
    # lm_eval/TASK/METRIC; "": off
    eval_tasks: str = ""
    eval_tasks_include: str = ""  # a folder of local lm-eval task YAML files that train.eval_tasks may name
    # examples per task for train.eval_tasks (lm-eval's --limit: a count, or a share of them below 1); 0: all
    eval_tasks_limit: float = 0.0
    # a console line and a metrics.jsonl row (loss, lr, grad norm, tokens/s, TFLOP/s, MFU) every this many steps
    # and at the last; at least 1
    log_interval: int = 10
    log_first_step: bool = True  # also log step 1 of a run that starts from scratch: its loss within seconds
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    # save a checkpoint and exit 0 this many minutes after training started (a rerun resumes); 0: no limit
    exit_duration_minutes: float = 0.0
    # none | full (recompute each block in the backward pass) | selective (recompute attention only)
    activation_checkpointing: str = "none"
    max_bad_steps: int = 3  # a non-finite loss or gradient norm skips that update; this many in a row stop the run
    # sequence-length warmup (pretraining, parallel.pp=1): the first this many steps train on shorter sequences,
    # from seq_len_warmup_start growing linearly to data.seq_len (each step's length a multiple of 8, rounded down;
    # a function of the step, so a resumed run continues exactly); the samples per step stay global_batch_size; 0: off
    seq_len_warmup_steps: int = 0
    # the first step's sequence length; a multiple of 8 below data.seq_len (a divisor of it with
    # seq_len_warmup_keep_tokens)
    seq_len_warmup_start: int = 8
    # true: reshape each [b, seq_len] micro-batch into [b x seq_len / L, L] rows (every token of every sample is
    # trained on, the tokens per step unchanged; L divides data.seq_len); false: truncate each sample to its first L
    # tokens (the rest of it is not trained on; fewer tokens per step)
    seq_len_warmup_keep_tokens: bool = True


@dataclass
class ParallelConfig(_Section):
    """How the ranks share the work: ZeRO data parallelism, tensor and pipeline parallelism. The world size is
    tp x pp x data-parallel ranks."""

    # DeepSpeed ZeRO stage: 0 (none), 1 (optimizer state sharded over data-parallel ranks), 2 (and gradients),
    # 3 (and parameters); with pp > 1: 0 or 1. One data-parallel rank in fp32 runs 1 and 2 as 0 (nothing to shard)
    zero_stage: int = 1
    offload_optimizer: bool = False  # ZeRO's optimizer state in CPU memory (zero_stage >= 1)
    offload_params: bool = False  # ZeRO-3's parameters in CPU memory (zero_stage=3)
    # tensor-parallel ranks: attention heads, MLP, embedding and LM head split Megatron-style; divides
    # model.n_heads and model.n_kv_heads
    tp: int = 1
    # pipeline-parallel stages (DeepSpeed PipelineModule, 1F1B, equal numbers of blocks); needs zero_stage <= 1;
    # not for fine-tuning
    pp: int = 1
    # with tp > 1: norms and dropout on sequence shards (reduce-scatter and all-gather at the TP borders); a
    # fine-tuning run: sft only
    sequence_parallel: bool = False
    # expert-parallel ranks: each MoE layer's experts split over ep ranks carved out of the data-parallel ones
    # (tokens reach their experts by all-to-all; the expert weights are averaged over the dp / ep ranks holding the
    # same experts); divides the data-parallel ranks and model.moe_experts; 1: every rank holds every expert
    ep: int = 1
    # context-parallel ranks (DeepSpeed-Ulysses): each sample's sequence split over cp ranks carved out of the
    # data-parallel ones; attention gathers the whole sequence for heads / cp of the heads by all-to-all. Divides
    # the data-parallel ranks and model.n_heads / tp (KV heads are replicated when fewer); data.seq_len a multiple
    # of cp (of cp x tp with sequence_parallel); pretraining, pp=1, dense models
    cp: int = 1
    partition_activations: bool = False  # with activation checkpointing and tp > 1: split saved inputs over TP ranks
    # compare the weights every TP rank holds whole (norms, row-parallel biases) across the TP group by checksum
    # every this many steps (and at step 1); a mismatch stops the run naming the parameter; 0: off
    drift_check_interval: int = 100
    # a collective that waits longer than this fails (a lost rank, a hung peer) instead of hanging; above 0.
    # DeepSpeed's own default is 30
    timeout_minutes: float = 10.0


@dataclass
class CheckpointConfig(_Section):
    """Where a run saves, when, and what it starts from."""

    # the run's folder: checkpoints (step00000100/ ..., the latest and best pointers), megatrain.json,
    # metrics.jsonl and TensorBoard events
    dir: str = "runs/tiny"
    # save every this many steps and at the end (and on SIGUSR1/SIGTERM or train.exit_duration_minutes); 0: only
    # at the end
    interval: int = 100
    # continue from dir/latest when it exists; false: start afresh
    resume: bool = True
    # resuming under another layout (parallel.tp/pp/zero_stage/ep, the world size, train.micro_batch_size) reshards
    # dir/latest into a new step folder beside it (the original kept) and continues with the same global batch and
    # sample order; false: such a resume is refused (and names the `megatrain convert reshard` line)
    elastic: bool = True
    keep_last: int = 0  # keep only this many newest checkpoints (never the one `best` names); 0: keep all
    # start from these weights (a checkpoint of any layout, or a convert output); the model's shape and tokenizer
    # come from it and the optimizer starts afresh; resuming checkpoint.dir/latest wins
    init: str = ""
    # before resuming, compare the checkpoint's files with the manifest its save wrote last: full (sizes and CRC-32s;
    # a changed byte anywhere) | size (sizes only: a truncated or missing file, without reading the files) | none
    verify: str = "full"
    # write checkpoints in the background: at a save each rank copies its state to host memory (one copy of the
    # rank's checkpoint) and a writer thread writes and fsyncs the files while training goes on; `latest` moves once
    # every rank's files are on disk. At most one save in flight: the next one (or the end of the run) waits for it
    async_save: bool = False


@dataclass
class LoggingConfig(_Section):
    """Where the metrics go besides the console and checkpoint.dir/metrics.jsonl, and the MFU denominator."""

    tensorboard: bool = True  # write TensorBoard events to checkpoint.dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases (the wandb package)
    wandb_project: str = "megatrain"  # W&B project
    wandb_mode: str = "offline"  # offline | online | disabled (offline needs no network)
    # per-device peak TFLOP/s for MFU; 0: a table of data-sheet peaks on a GPU (for the run's precision), on CPU
    # the node's fp32 matmul rate (through the linear layers' product), measured once and cached in
    # ~/.cache/megatrain/cpu-peak.json
    peak_tflops: float = 0.0
    progress_bar: str = "auto"  # a progress bar on stderr: auto (when stderr is a terminal) | on | off
    # profile this training step (1-based) with torch.profiler: each rank's op table and Chrome trace go to
    # checkpoint.dir/profile/, and the step's split (matmuls, attention, the rest) to the log; 0: off
    profile_step: int = 0


LM_TASKS = ("", "sft", "dpo")  # finetune.task values whose model is the language model itself (no task head)


@dataclass
class FinetuneConfig(_Section):
    """A fine-tuning run (megatrain finetune): the task, the pretrained model, the files, LoRA and freezing."""

    # sft (instruction tuning of the LM) | dpo (preference tuning of the LM on chosen/rejected pairs) | classify (a
    # label per text) | tokens (a tag per word, e.g. NER) | qa (an answer span in a context, SQuAD-style); empty: not
    # a fine-tuning run
    task: str = ""
    # the pretrained model: a megatrain checkpoint of any layout, a convert output, or a Hugging Face folder (read
    # through from-hf's maps); the model's shape and tokenizer come from it
    init: str = ""
    train_file: str = ""  # training examples in the task's format (see format); required
    # evaluated every train.eval_interval steps; the best checkpoint by metric_for_best is named in DIR/best;
    # empty: no validation
    valid_file: str = ""
    test_file: str = ""  # evaluated once at the end, with the weights DIR/best names (the last without valid_file)
    # auto (from the extension, .gz aside: .jsonl, .ndjson and .json are jsonl, .csv csv, .tsv tsv, anything else
    # conll; qa reads SQuAD JSON as well) | jsonl | csv | tsv | conll | squad
    format: str = "auto"
    text_column: str = "text"  # classify: the field (jsonl) or column (csv/tsv) holding the text
    text_pair_column: str = "text_pair"  # classify: an optional second text (pairs are joined by end-of-document)
    label_column: str = "label"  # classify: the field or column holding the label (any string)
    # tokens per example (longer ones are truncated, counted in the log; qa cuts a long context into windows
    # instead); 0: model.max_seq_len
    max_seq_len: int = 0
    # when > 0: train.max_steps = epochs x training rows / train.global_batch_size, rounded up (rows: packed
    # sequences for sft, context windows for qa, examples otherwise), and train.warmup_steps at most a tenth of it
    epochs: float = 0.0
    # the evaluation metric that picks DIR/best (lower is better for val_loss and val_ppl, higher for the rest);
    # empty: the task's own: val_loss (sft), val_accuracy (classify), val_f1 (tokens, qa)
    metric_for_best: str = ""
    patience: int = 0  # stop after this many evaluations without a better metric_for_best; 0: never stop early
    # classify/tokens: the label names in id order; empty: the training file's labels, sorted (saved with every
    # checkpoint, so a resumed run keeps the order)
    labels: list = field(default_factory=list)
    scheme: str = "iob2"  # tokens: the tagging scheme, iob1 | iob2 | bioes; every file is checked against it
    # classify: what the head reads: auto (last for a causal model, mean for mlm) | last (the last real token) |
    # mean (of the real tokens) | first (the first token)
    pooling: str = "auto"
    # sft: several examples per sequence (attention and positions never cross them); false: one per sequence
    pack: bool = True
    # sft: scores of the responses generated for finetune.valid_file / test_file (and by megatrain evaluate), each the
    # greedy continuation of a row's conversation up to its last assistant turn, against that turn; logged beside the
    # loss, in percent: exact_match (stripped texts equal), rouge (rouge1, rouge2, rougeL: F-measure, stemmed), bleu,
    # chrf (sacrebleu, corpus level). Empty: no generation
    generation_metrics: list = field(default_factory=list)
    # sft: the longest response generated for generation_metrics, in tokens (fewer where the model's context ends);
    # it stops earlier at the end-of-turn (end-of-document) token
    generation_max_new_tokens: int = 128
    dpo_beta: float = 0.1  # dpo: beta, how far the policy may move from the reference (the rewards' scale); above 0
    # dpo: the share of pairs taken as mislabelled (conservative DPO: the loss also pulls towards the rejected
    # response by this much); 0 to below 0.5
    dpo_label_smoothing: float = 0.0
    # dpo: the reference model's log-probabilities: precompute (one pass with finetune.init's weights before
    # training, stored in checkpoint.dir/dpo_reference.safetensors; one model in memory) | hold (the reference kept
    # in memory, scoring each micro-batch: under LoRA the policy with its adapters off, else a frozen second copy of
    # finetune.init's model, cut and partitioned as the policy) | none (reference-free)
    dpo_reference: str = "precompute"
    doc_stride: int = 64  # qa: tokens shared by consecutive windows of a long context; 1 to (max_seq_len + 1) // 2 - 2
    max_answer_tokens: int = 30  # qa: the longest answer span predicted, in tokens; at least 1
    # LoRA adapters of this rank on lora_targets, every other weight but the task head frozen; 0: full fine-tuning
    lora_rank: int = 0
    lora_alpha: float = 16.0  # LoRA scale is lora_alpha / lora_rank; above 0
    lora_dropout: float = 0.0  # dropout on the adapters' input, in [0, 1)
    # the projections of every block that get adapters, comma-separated: qkv, o_proj (attention), gate_up (swiglu
    # MLP), up (gelu MLP), down (on a MoE block: every routed expert's and the shared expert's); those the model
    # lacks are skipped, but one at least must exist
    lora_targets: str = "qkv,o_proj,gate_up,up,down"
    # parameters to freeze, comma-separated: embeddings, blocks:N (the first N blocks), all_but_head; empty: none
    freeze: str = ""


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

    def freeze(self) -> "Config":
        """Make every section read-only (an assignment raises ConfigError); returns self."""
        for name in SECTIONS:
            getattr(self, name).__dict__["_frozen"] = True
        self.__dict__["_frozen"] = True
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise ConfigError(f"config: cannot set {name!r}, the config is read-only after validation")
        object.__setattr__(self, name, value)

    def replaced(self, changes: dict[str, Any]) -> "Config":
        """A new Config with `changes` ({"section.key": value}, or {"section": a whole section}); this one stays as
        it is. The copy is frozen when this one is, and keeps `explicit`."""
        sections = {name: copy.deepcopy(getattr(self, name)) for name in SECTIONS}
        for dotted, value in changes.items():
            section, _, key = dotted.partition(".")
            if key:
                sections[section] = dataclasses.replace(sections[section], **{key: value})
            else:
                sections[section] = dataclasses.replace(value)
        new = Config(**{name: dataclasses.replace(sec) for name, sec in sections.items()})  # unfrozen copies
        if "explicit" in self.__dict__:
            new.explicit = set(self.explicit)
        return new.freeze() if self.__dict__.get("_frozen") else new


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
CHOICES = {
    **MODEL_CHOICES,
    "data.sample_offsets": ("fixed", "random"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.lr_schedule": ("cosine", "linear", "constant"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "checkpoint.verify": ("full", "size", "none"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "logging.progress_bar": ("auto", "on", "off"),
    "finetune.task": ("", "sft", "dpo", "classify", "tokens", "qa"),
    "finetune.dpo_reference": ("precompute", "hold", "none"),
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
    if typ is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return value
        raise ConfigError(f"config key {key}: expected a mapping of NAME: PATH, e.g. {{web: data/web, code: "
                          f"data/code}}, got {value!r}")
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
    return cfg.freeze()


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config saved with to_dict() (e.g. from a checkpoint)."""
    cfg = Config()
    apply_overrides(cfg, _flatten(tree, "saved config"))
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need no world size: choices, ranges and combinations."""
    for dotted, options in CHOICES.items():
        section, key = dotted.split(".")
        v = getattr(getattr(cfg, section), key)
        if v not in options:
            raise ConfigError(f"config key {dotted}: {v!r} is not one of {', '.join(options)}{_suggest(str(v), options)}")
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    validate_model(m)
    positive = {"data.seq_len": d.seq_len, "train.max_steps": t.max_steps,
                "train.global_batch_size": t.global_batch_size, "train.micro_batch_size": t.micro_batch_size,
                "train.log_interval": t.log_interval, "parallel.tp": p.tp, "parallel.pp": p.pp,
                "parallel.ep": p.ep, "parallel.cp": p.cp}
    for k, v in positive.items():
        if v < 1:
            raise ConfigError(f"config key {k}: must be at least 1, got {v}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"config key data.seq_len: {d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
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
    _validate_evals(cfg)
    if m.compile:
        _validate_compile(cfg)
    if p.ep > 1:
        _validate_expert_parallel(m, p)
    if p.cp > 1:
        _validate_context_parallel(cfg)
    if d.document_attention and (m.objective != "causal" or p.pp > 1):
        raise ConfigError("config key data.document_attention: needs model.objective=causal and parallel.pp=1")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("config key parallel.sequence_parallel: needs parallel.tp > 1")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"config key train.global_batch_size: {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key train.warmup_steps: must be at least 0, got {t.warmup_steps}")
    if not p.timeout_minutes > 0:
        raise ConfigError(f"config key parallel.timeout_minutes: must be above 0, got {p.timeout_minutes}")
    nonnegative = {"train.lr": t.lr, "train.min_lr": t.min_lr, "train.weight_decay": t.weight_decay,
                   "train.grad_clip": t.grad_clip, "train.eval_interval": t.eval_interval, "train.eval_iters":
                   t.eval_iters, "checkpoint.interval": cfg.checkpoint.interval,
                   "checkpoint.keep_last": cfg.checkpoint.keep_last, "train.exit_duration_minutes":
                   t.exit_duration_minutes, "parallel.drift_check_interval": p.drift_check_interval,
                   "logging.profile_step": cfg.logging.profile_step}
    for k, v in nonnegative.items():
        if not v >= 0:
            raise ConfigError(f"config key {k}: must be at least 0, got {v}")
    if t.min_lr > t.lr:  # after the ranges: train.lr=-1 is train.lr's mistake, not min_lr's
        raise ConfigError(f"config key train.min_lr: {t.min_lr} exceeds train.lr={t.lr}")
    if t.max_bad_steps < 1:
        raise ConfigError(f"config key train.max_bad_steps: must be at least 1, got {t.max_bad_steps}")
    _validate_seq_len_warmup(cfg)
    _validate_generation_metrics(cfg)
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
    if f.dpo_beta <= 0 or not 0 <= f.dpo_label_smoothing < 0.5:
        bad = "dpo_beta" if f.dpo_beta <= 0 else "dpo_label_smoothing"
        raise ConfigError(f"config key finetune.{bad}: out of range ({getattr(f, bad)}; beta above 0, label smoothing "
                          f"0 to below 0.5)")
