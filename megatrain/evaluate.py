"""`megatrain evaluate --checkpoint DIR --input FILE`: the task's metric table for a fine-tuned model on a file.

One process, no DeepSpeed, the same evaluation the training run logs: loss and the task's metrics (classify:
accuracy, macro and per-class precision / recall / F1, confusion matrix; tokens: entity precision / recall / F1 per
type, token accuracy; qa: exact match and F1; sft: loss and perplexity, and the scores of greedy responses that the
run's finetune.generation_metrics names; dpo: loss, reward accuracy, rewards and margin against the reference model,
finetune.init, and how often each model gives the chosen response the higher log-probability). --json prints them
as one JSON object.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a fine-tuning run's checkpoint.dir")
    p.add_argument("--tag", default=None, help="a step folder (default: the one DIR/best names, else DIR/latest)")
    p.add_argument("--input", required=True, metavar="FILE", help="labelled examples in the task's file format")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def reference_of(cfg, task, examples, batch_size: int) -> None:
    """dpo: the reference model's log-probabilities of the file's pairs, from finetune.init (the run's reference)."""
    import os

    from megatrain.config import ConfigError
    from megatrain.generate import load_model
    from megatrain.predict import LocalEngine, LocalRun

    init = cfg.finetune.init
    if not os.path.exists(init):
        raise ConfigError(f"finetune.init {init}: not there, and a dpo model's rewards are measured against it (the "
                          f"reference model); put it back where the run read it")
    reference, _ = load_model(init)
    task.set_reference(LocalRun(cfg, batch_size), LocalEngine(reference), examples)


def command(args: argparse.Namespace) -> int:
    from megatrain.generate import check_numbers
    from megatrain.predict import LocalEngine, LocalRun, best_tag, load

    check_numbers(("--batch-size", args.batch_size, 1))
    model, cfg, tok, task, step = load(args.checkpoint, best_tag(args.checkpoint, args.tag))
    examples = task.encode(args.input, train=False)
    if cfg.finetune.task == "dpo" and cfg.finetune.dpo_reference != "none":
        reference_of(cfg, task, examples, args.batch_size)
    row = task.evaluate(LocalRun(cfg, args.batch_size), LocalEngine(model), examples, prefix="eval")
    row = {k.removeprefix("eval_"): v for k, v in row.items()}
    if args.json:
        print(json.dumps(dict(checkpoint=args.checkpoint, step=step, task=cfg.finetune.task, input=args.input, **row)))
        return 0
    n = len(getattr(examples, "examples", examples.items))  # qa: questions, not their windows
    print(f"{args.checkpoint} (step {step}), {cfg.finetune.task}, {n} "
          f"{ {'sft': 'rows', 'dpo': 'pairs'}.get(cfg.finetune.task, 'examples')} of {args.input}")
    width = max([18] + [len(k) + 2 for k, v in row.items() if isinstance(v, float)])
    for k, v in row.items():
        if isinstance(v, float):
            print(f"  {k:<{width}}{v:10.4f}")
    table = row.get("per_class") or row.get("per_type")
    if table:
        print(f"\n  {'':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for name, m in table.items():
            print(f"  {name[:16]:<16}{m['precision']:10.4f}{m['recall']:10.4f}{m['f1']:10.4f}{m['support']:10d}")
    if "confusion" in row:
        labels = cfg.finetune.labels
        width = max(8, max(len(x) for x in labels) + 2)
        print("\n  confusion (rows: gold, columns: predicted)")
        print("  " + " " * width + "".join(f"{x[:width - 1]:>{width}}" for x in labels))
        for name, counts in zip(labels, row["confusion"]):
            print(f"  {name[:width - 1]:<{width}}" + "".join(f"{c:>{width}d}" for c in counts))
    return 0
