"""`megatrain predict --checkpoint DIR --input FILE --output OUT.jsonl`: run a fine-tuned model on a file.

One process, no DeepSpeed: the checkpoint (any layout, LoRA adapters included) is read through the one checkpoint
reader into the model its config describes. What a line of OUT.jsonl holds, by task:
    classify   the input record + "prediction" (a label) and "score" (its probability)
    tokens     "words", "tags" and "entities": [{"type", "text", "start", "end", "words": [first, last + 1]}], the
               offsets in the words joined by single spaces (input: CoNLL, or jsonl {"tokens"} or {"text"})
    qa         "id" and "answer" (the context's characters)
    sft        the input record + "response", generated (greedy unless --temperature) up to the end of the turn
OUT is written whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from megatrain.config import ConfigError


class LocalRun:
    """What a task's evaluation needs of a run, for one process without DeepSpeed."""

    def __init__(self, cfg, batch_size: int):
        from megatrain.parallel.topology import Layout

        self.cfg = cfg.replaced({"train.micro_batch_size": batch_size})
        self.layout, self.dp_rank, self.grid = Layout(1, 1, 1), 0, None


class LocalEngine:
    """A model called the way the training loop calls DeepSpeed's engine."""

    def __init__(self, model: torch.nn.Module):
        self.model = self.module = model.eval()
        self.device = next(model.parameters()).device

    def __call__(self, *args):
        return self.model(*args)

    def eval(self):
        pass

    def train(self):
        pass


def load(ckpt: str, tag: str | None = None):
    """(model, config, tokenizer, task) of a fine-tuning checkpoint."""
    from megatrain.checkpoint.reader import CheckpointReader
    from megatrain.data import build_tokenizer
    from megatrain.heads import build_model
    from megatrain.tasks import finetune_task

    with CheckpointReader(ckpt, tag) as reader:
        cfg = reader.cfg
        if not cfg.finetune.task:
            raise ConfigError(f"{reader.where}: not a fine-tuned model (finetune.task is empty); use megatrain generate "
                              f"for a pretrained language model")
        model = build_model(cfg)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in reader.tensors():
                params[name].copy_(t)
        step = reader.state.get("step", 0)
    tok = build_tokenizer(cfg.data.tokenizer)
    return model.eval(), cfg, tok, finetune_task(cfg, tok), step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a fine-tuning run's checkpoint.dir (or DIR/best)")
    p.add_argument("--tag", default=None, help="a step folder (default: the one DIR/best names, else DIR/latest)")
    p.add_argument("--input", required=True, metavar="FILE", help="examples in the task's file format")
    p.add_argument("--output", required=True, metavar="OUT.jsonl")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="sft: the longest response; at most model.max_seq_len - 1 (default: 128, or what fits)")
    p.add_argument("--temperature", type=float, default=0.0, help="sft: 0 for greedy decoding")


def best_tag(ckpt: str, tag: str | None) -> str | None:
    from megatrain.checkpoint.io import read_pointer

    return tag or read_pointer(ckpt, "best")


def command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from megatrain.checkpoint.io import checkpoint_inputs
    from megatrain.fileio import check_output_path, write_atomic
    from megatrain.generate import check_length, check_numbers

    check_output_path(args.output, "--output", inputs=[("--input", args.input), *checkpoint_inputs(args.checkpoint,
                                                                                                   args.tag)],
                      example="predictions.jsonl")
    check_numbers(("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                  ("--temperature", args.temperature, 0))
    model, cfg, tok, task, step = load(args.checkpoint, best_tag(args.checkpoint, args.tag))
    if cfg.finetune.task in ("sft", "dpo"):
        if args.max_new_tokens is not None:  # the shortest prompt is one token
            check_length(args.max_new_tokens, 1, cfg.model.max_seq_len, args.checkpoint)
        rows = generate_responses(model, cfg, tok, task, args)
    else:
        examples = task.encode(args.input, train=False, labeled=False)
        run, engine = LocalRun(cfg, args.batch_size), LocalEngine(model)
        results = []
        with torch.no_grad():
            for start in tqdm(range(0, len(examples.items), args.batch_size), desc="predict", unit="batch",
                              file=sys.stderr, disable=not sys.stderr.isatty()):
                items = examples.items[start: start + args.batch_size]
                batch = task.collate(items, engine.device)
                _, raw = task.forward_eval(engine, batch)
                results += task.outputs(raw, batch, items)
        del run
        rows = task.present(examples, results)
    write_atomic(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} predictions ({cfg.finetune.task}, step {step}) -> {args.output}", file=sys.stderr)
    return 0


def generate_responses(model, cfg, tok, task, args) -> list[dict]:
    """sft: each record's conversation continued by the assistant, up to its end-of-turn token (every record is read
    and checked before the first is generated)."""
    from tqdm import tqdm

    from megatrain.data.task_files import read_records

    records = read_records(args.input, cfg.finetune.format)
    prompts = [task.prompt_messages(rec) for rec in records]
    ctx, out, cut = cfg.model.max_seq_len, [], 0
    for rec, msgs in tqdm(list(zip(records, prompts)), desc="generate", unit="example", file=sys.stderr,
                          disable=not sys.stderr.isatty()):
        response, short = task.respond(model, msgs, args.max_new_tokens or 128, args.temperature)
        cut += short and args.max_new_tokens is not None  # (the default is 128 or what fits)
        out.append(dict(rec.fields, response=response))
    if cut:
        print(f"note: {cut} of {len(records)} prompts left less room than --max-new-tokens {args.max_new_tokens} in "
              f"model.max_seq_len={ctx}: their responses stop where the context ends", file=sys.stderr)
    return out
