"""`megatrain convert VERB ...` (also `python -m megatrain.convert VERB ...`): move checkpoints between layouts and
to and from Hugging Face transformers. All four verbs read through checkpoint/reader.py (any layout) and write
through one writer per format; every output appears whole under its final name or not at all.

    consolidate CKPT --output OUT [--dtype bf16]        one safetensors file + megatrain.json + tokenizer
    reshard CKPT --output NEW --set parallel.tp=2 ... --world-size N   resumable under the new layout, optimizer too
    to-hf CKPT --output HF_DIR                          the transformers class of the model, checked against megatrain
    from-hf HF_DIR --output CKPT [--set parallel.tp=2 --world-size N]  a step-0 checkpoint (Llama, Mistral, Qwen2/3,
                                                        Gemma 2/3, Phi-3, OLMo 2, GPT-2)
"""
from __future__ import annotations

import argparse
import re

VERBS = {
    "consolidate": "one full-precision safetensors file from a checkpoint of any layout (ZeRO 0-3, TP, PP)",
    "reshard": "rewrite a checkpoint for another layout (tp, pp, ZeRO stage, world size), optimizer state included",
    "to-hf": "export to a Hugging Face transformers folder (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2 or GPT-2 "
             "class), checked logit for logit",
    "from-hf": "import a Hugging Face Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2 or GPT-2 model as a megatrain "
               "checkpoint of any layout",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    c = sub.add_parser("consolidate", help=VERBS["consolidate"], description=VERBS["consolidate"])
    c.add_argument("checkpoint", metavar="CKPT_DIR", help="a checkpoint.dir (its latest), or one of its step folders")
    c.add_argument("--tag", default=None, help="a step folder name (default: the one `latest` names)")
    _output(c)
    c.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="precision written (default fp32)")

    r = sub.add_parser("reshard", help=VERBS["reshard"], description=VERBS["reshard"])
    r.add_argument("checkpoint", metavar="CKPT_DIR")
    r.add_argument("--tag", default=None, help="a step folder name (default: the one `latest` names)")
    _output(r)
    _layout(r)

    t = sub.add_parser("to-hf", help=VERBS["to-hf"], description=VERBS["to-hf"])
    t.add_argument("checkpoint", metavar="CKPT_DIR")
    t.add_argument("--tag", default=None, help="a step folder name (default: the one `latest` names)")
    _output(t)
    t.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="precision written (default fp32)")
    t.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (default 5GB)")
    # argparse takes a word like -5GB for an unknown flag ("expected one argument"): read it as a value, so that
    # parse_size can say what is wrong with it (private, but the one knob argparse has for this)
    t._negative_number_matcher = re.compile(r"^-\d*\.?\d+\s*[A-Za-z]*$")
    t.add_argument("--no-verify", action="store_true", help="skip the parity check against megatrain's own model")

    f = sub.add_parser("from-hf", help=VERBS["from-hf"], description=VERBS["from-hf"])
    f.add_argument("hf_dir", metavar="HF_DIR", help="a Hugging Face model folder (config.json + safetensors)")
    _output(f)
    _layout(f)
    f.add_argument("--trust-pickle", action="store_true",
                   help="also read pytorch_model.bin (a pickle; only for a file you trust)")
    f.add_argument("--no-verify", action="store_true", help="skip the parity check against transformers")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, metavar="OUT", help="where to write it (must not exist)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="the target layout: parallel.tp, parallel.pp, parallel.zero_stage, parallel.* and "
                        "train.micro_batch_size")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="ranks of the target run (default: tp x pp); N local processes unless a launcher started them")


def command(args: argparse.Namespace) -> int:
    if args.verb == "consolidate":
        from megatrain.convert.consolidate import consolidate

        consolidate(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype, force=args.force)
    elif args.verb == "reshard":
        from megatrain.convert.writer import reshard

        reshard(args.checkpoint, args.output, args.set, args.world_size, tag=args.tag, force=args.force)
    elif args.verb == "to-hf":
        from megatrain.convert.hf import to_hf

        return to_hf(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     verify=not args.no_verify, force=args.force)
    else:
        from megatrain.convert.hf import from_hf

        return from_hf(args.hf_dir, args.output, args.set, args.world_size, trust_pickle=args.trust_pickle,
                       verify=not args.no_verify, force=args.force)
    return 0
