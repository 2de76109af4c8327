"""`megatrain <command>`: one entry point; each command lives in its own module.

Modules are imported only when their command runs, so `megatrain preprocess` never pays for
importing torch or DeepSpeed. A user error (bad file, bad value) prints one line and exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module with add_arguments(parser) and command(args), one-line help)
COMMANDS = {
    "train-tokenizer": ("megatrain.data.train_tokenizer", "train a sentencepiece vocabulary on your corpus"),
    "preprocess": ("megatrain.data.preprocess", "tokenize jsonl/txt/parquet/datasets into P.bin + P.idx"),
    "data-info": ("megatrain.data.info", "describe a P.bin + P.idx dataset and decode a sample"),
    "pretrain": ("megatrain.pretrain", "pretrain a Transformer LM with DeepSpeed (one process; see README for many)"),
    "finetune": ("megatrain.finetune", "fine-tune a pretrained model: sft, classify, tokens (NER) or qa, full or LoRA"),
    "evaluate": ("megatrain.evaluate", "a fine-tuned model's metric table on a labelled file"),
    "predict": ("megatrain.predict", "run a fine-tuned model on a file: labels, entities, answers or responses"),
    "plan": ("megatrain.plan", "memory per rank and time per step of a model x cluster x layout, or the best layouts"),
    "plot": ("megatrain.plot", "training curves of one or more runs as a PNG (or .pdf, .svg, ...)"),
    "lm-eval": ("megatrain.lmeval", "lm-evaluation-harness tasks on a checkpoint of any layout"),
    "generate": ("megatrain.generate", "sample text from a checkpoint (any layout) with a KV cache"),
    "serve": ("megatrain.serve", "an OpenAI-compatible HTTP server for a checkpoint, batching requests together"),
    "convert": ("megatrain.convert", "consolidate, reshard, to-hf, from-hf: move checkpoints between layouts and formats"),
    "hostfile": ("megatrain.launch.hostfile", "write a DeepSpeed hostfile from SLURM_JOB_NODELIST or a host list"),
    "launch": ("megatrain.launch.multinode", "preflight-check every host, then `deepspeed --hostfile` over pdsh + ssh"),
}


def user_error_types() -> tuple[type, ...]:
    """Exceptions that mean 'bad input', reported as one line rather than a traceback."""
    from megatrain.config import ConfigError, RunStopped  # CheckpointError is a ConfigError
    from megatrain.data import IndexedDatasetError, InputError, SampleIndexError, TokenizerError
    from megatrain.fileio import BadFileError
    from megatrain.launch.hostfile import HostfileError
    from megatrain.launch.multinode import LaunchError

    # Not IndexError or FileNotFoundError: where input is bad the code raises one of these typed errors, so a bug that
    # raises a built-in error shows its traceback instead of passing for a user's mistake.
    return (LaunchError, HostfileError, ConfigError, RunStopped, BadFileError, IndexedDatasetError, InputError,
            SampleIndexError, TokenizerError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="megatrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:  # only the chosen command's module is imported (pretrain imports torch)
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        rc = int(module.command(args) or 0)
    except user_error_types() as e:
        if not getattr(e, "quiet", False):  # an error every rank raises alike is said by rank 0
            print(f"megatrain {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"megatrain {args.command}: interrupted", file=sys.stderr)
        return 130
    if "torch.distributed" in sys.modules:  # never imports torch for a command that did not (preprocess, plan, ...)
        from megatrain.training.dist_env import end_distributed

        end_distributed()  # this rank's work is done: the process groups end before the interpreter does
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
