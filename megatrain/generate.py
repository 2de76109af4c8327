"""Sampling with a KV cache, and `megatrain generate --checkpoint DIR --prompt "..."`.

The checkpoint (any layout: ZeRO 0-3, TP, PP) is read into full fp32 weights in this one process through
checkpoint/reader.py, so generation needs neither DeepSpeed's engine nor the training world size.
"""
from __future__ import annotations

import argparse
import sys

import torch

from megatrain.config import ConfigError
from megatrain.model import KVCache, Transformer


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, eod_id: int | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Extend prompt [B, T] by up to max_new_tokens sampled tokens (greedy when temperature is 0). `vocab_limit`:
    the tokenizer's vocabulary; ids from there up to model.vocab_size are padding rows and never chosen."""
    was_training = model.training
    model.eval()
    cfg = model.cfg
    B, T = prompt.shape
    total = min(T + max_new_tokens, cfg.max_seq_len)
    param = next(model.parameters())
    cache = KVCache(cfg, B, total, prompt.device, param.dtype)
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    out = prompt
    logits = model(prompt, cache=cache, pos=0)[:, -1]
    for pos in range(T, total):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        out = torch.cat([out, nxt], dim=1)
        if eod_id is not None and bool((nxt == eod_id).all()):  # every row ended its document
            break
        if pos + 1 < total:
            logits = model(nxt, cache=cache, pos=pos)[:, -1]
    model.train(was_training)
    return out


def load_model(ckpt_dir: str, tag: str | None = None) -> tuple[Transformer, dict]:
    """A one-process model from a checkpoint of any layout (its `latest`, or `tag`), or a consolidated folder,
    read tensor by tensor through the one checkpoint reader. Returns the model and the saved state (config, step)."""
    from megatrain.checkpoint.reader import CheckpointReader

    with CheckpointReader(ckpt_dir, tag, merge_lora=True) as reader:
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint.dir of a training run")
    p.add_argument("--tag", default=None, help="a step folder (default: the one named in DIR/latest)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0: all")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the one the run trained with)")


def command(args: argparse.Namespace) -> int:
    from megatrain.data import build_tokenizer

    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1),
                             ("--top-k", args.top_k, 0), ("--temperature", args.temperature, 0)):
        if not value >= low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    model, saved = load_model(args.checkpoint, args.tag)
    if model.cfg.objective != "causal":
        raise ConfigError("generate needs a causal LM checkpoint (this one was trained with objective=mlm)")
    tok = build_tokenizer(args.tokenizer or saved["config"]["data"]["tokenizer"])
    if tok.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"--tokenizer {args.tokenizer}: {tok.vocab_size} pieces, more than the model's vocabulary of "
                          f"{model.cfg.vocab_size}; use the tokenizer the run trained with (the default)")
    ids = tok.encode(args.prompt) if args.prompt else [tok.eod_id]
    if len(ids) >= model.cfg.max_seq_len:
        raise ConfigError(f"--prompt is {len(ids)} tokens; this model reads at most model.max_seq_len="
                          f"{model.cfg.max_seq_len}, with room left to generate: shorten it")
    prompt = torch.tensor([ids] * args.num_samples)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, eod_id=tok.eod_id,
                   vocab_limit=model.cfg.true_vocab_size or tok.vocab_size)
    print(f"# {args.checkpoint} step {saved['step']}", file=sys.stderr)
    for row in out:
        print(tok.decode(row.tolist()))
        if args.num_samples > 1:
            print("-" * 40)
    return 0
