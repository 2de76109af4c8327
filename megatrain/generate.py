"""`megatrain generate --checkpoint DIR --prompt "..."`, and loading a checkpoint for it (sampling with a KV cache,
`generate`, lives with the model in model.py, where the tasks reach it too).

The checkpoint (any layout: ZeRO 0-3, TP, PP) is read into full fp32 weights in this one process through
checkpoint/reader.py, so generation needs neither DeepSpeed's engine nor the training world size; a Hugging Face
model folder is read as finetune.init reads one (checkpoint/source.py).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from megatrain.config import LM_TASKS, ConfigError
from megatrain.model import Transformer, generate


def load_model(ckpt_dir: str, tag: str | None = None) -> tuple[Transformer, dict]:
    """A one-process language model from a checkpoint of any layout (its `latest`, or `tag`), a consolidated folder
    or a Hugging Face model folder, read tensor by tensor. Returns the model and the saved state (its effective
    config, step; a Hugging Face folder's: the default config with its model and tokenizer, step 0). A fine-tuned
    classify / tokens / qa model is refused: its head scores labels, not the next token."""
    from megatrain.checkpoint.reader import CheckpointReader
    from megatrain.checkpoint.source import WeightSource, is_hf_folder
    from megatrain.config import Config

    if tag is None and is_hf_folder(ckpt_dir):
        source = WeightSource(ckpt_dir)
        try:
            model = Transformer(source.model)
            weights, _ = source.weights(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(weights(name))
        finally:
            source.close()
        cfg = Config().replaced({"model": source.model, "data.tokenizer": source.tokenizer})
        return model, {"step": 0, "config": cfg.to_dict()}
    with CheckpointReader(ckpt_dir, tag, merge_lora=True) as reader:
        task = reader.cfg.finetune.task
        if task not in LM_TASKS:
            raise ConfigError(f"{reader.where}: a finetune.task={task} model, not a language model (its head scores "
                              f"{'labels' if task == 'classify' else 'tags' if task == 'tokens' else 'answer spans'}"
                              f", not the next token); use megatrain predict or evaluate on it")
        model = Transformer(reader.cfg.model)
        load_weights(model, reader)
        saved = dict(reader.state, config=reader.cfg.to_dict())
    return model, saved


def load_weights(model: Transformer, reader) -> None:
    """Copy every parameter from a CheckpointReader into a full (unsplit) model, one tensor at a time."""
    params = dict(model.named_parameters())
    if set(params) != set(reader.names()):
        raise ConfigError(f"{reader.where}: does not fit the model (missing {sorted(set(params) - set(reader.names()))[:3]}, "
                          f"unexpected {sorted(set(reader.names()) - set(params))[:3]})")
    with torch.no_grad():
        for name, t in reader.tensors():
            params[name].copy_(t)


def check_numbers(*checks: tuple[str, float | int | None, float]) -> None:
    """Command-line numbers: each (flag, value, least) a finite number at least `least` (None: not given)."""
    for flag, value, low in checks:
        if value is not None and not (math.isfinite(value) and value >= low):
            raise ConfigError(f"{flag} {value}: must be a number at least {low:g}")


def check_length(max_new_tokens: int, prompt_tokens: int, max_seq_len: int, where: str) -> None:
    """--max-new-tokens that the model's context has no room for (the model reads at most max_seq_len tokens, the
    prompt's among them) is refused: the text would stop short of it without a word."""
    room = max_seq_len - prompt_tokens
    if max_new_tokens > room:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: {where} reads at most model.max_seq_len={max_seq_len} "
                          f"tokens; after a {prompt_tokens}-token prompt at most {room} new tokens fit")


def run_tokenizer(model: Transformer, saved: dict, ckpt_dir: str, spec: str | None = None):
    """The tokenizer a checkpoint trained with, or `spec` (--tokenizer) when it has the same vocabulary."""
    from megatrain.data import TokenizerError, build_tokenizer
    from megatrain.data.tokenizer import check_same_vocabulary

    own = saved["config"]["data"]["tokenizer"]
    try:
        tok = build_tokenizer(spec or own)
    except TokenizerError as e:
        if spec:
            raise
        raise TokenizerError(f"{e} (the tokenizer {ckpt_dir} was trained with; or pass --tokenizer SPEC of "
                             f"the same vocabulary)") from None
    if spec:  # ids mean what the run's tokenizer says they mean: another one decodes them to other text
        check_same_vocabulary(tok, f"--tokenizer {spec}", own, f"{ckpt_dir} was trained with")
    if tok.vocab_size > model.cfg.vocab_size:  # ids the model has no rows for (where the above could not compare)
        raise ConfigError(f"--tokenizer {spec}: {tok.vocab_size} pieces, more than the model's vocabulary of "
                          f"{model.cfg.vocab_size}; use the tokenizer the run trained with (the default)")
    return tok


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint.dir of a training run, a convert output or a Hugging Face model folder")
    p.add_argument("--tag", default=None, help="a step folder (default: the one named in DIR/latest)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to add; at most model.max_seq_len minus the prompt's (default: 100, or what fits)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0: all")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the one the run trained with)")


def command(args: argparse.Namespace) -> int:
    check_numbers(("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1),
                  ("--top-k", args.top_k, 0), ("--temperature", args.temperature, 0))
    model, saved = load_model(args.checkpoint, args.tag)
    if model.cfg.objective != "causal":
        raise ConfigError("generate needs a causal LM checkpoint (this one was trained with objective=mlm)")
    tok = run_tokenizer(model, saved, args.checkpoint, args.tokenizer)
    ids = tok.encode(args.prompt) if args.prompt else [tok.eod_id]
    if len(ids) >= model.cfg.max_seq_len:
        raise ConfigError(f"--prompt is {len(ids)} tokens; this model reads at most model.max_seq_len="
                          f"{model.cfg.max_seq_len}, with room left to generate: shorten it")
    if args.max_new_tokens is None:
        args.max_new_tokens = min(100, model.cfg.max_seq_len - len(ids))
    check_length(args.max_new_tokens, len(ids), model.cfg.max_seq_len, args.checkpoint)
    prompt = torch.tensor([ids] * args.num_samples)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, eod_id=tok.eod_id,
                   vocab_limit=model.cfg.true_vocab_size or tok.vocab_size)
    print(f"# {args.checkpoint} step {saved['step']}", file=sys.stderr)
    for row in out:
        print(tok.decode(row.tolist()))
        if args.num_samples > 1:
            print("-" * 40)
    return 0
