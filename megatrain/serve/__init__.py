"""`megatrain serve --checkpoint DIR`: an OpenAI-compatible HTTP server with continuous batching.

The checkpoint (any layout, a convert output or a Hugging Face model folder; LoRA merged) is read into one process as
`megatrain generate` reads it; batcher.py shares each forward among the requests running, api.py speaks OpenAI's
protocol (FastAPI + uvicorn).

    megatrain serve --checkpoint runs/sft --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "sft", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
"""
from __future__ import annotations

import argparse
import os
import socket
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint.dir of a training run, a convert output or a Hugging Face model folder")
    p.add_argument("--tag", default=None, help="a step folder (default: the one named in DIR/latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients send (default: DIR's folder name)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (the batch; each holds a KV "
                                                         "cache row of --max-len positions)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests queued for a slot; more are answered 429 (retry later)")
    p.add_argument("--max-len", type=int, default=None,
                   help="prompt + output tokens of one request (default and most: model.max_seq_len)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may wait and run before it is ended with 504")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the one the run trained with)")


def check_port(host: str, port: int) -> None:
    from megatrain.config import ConfigError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another "
                              f"--port, or stop what holds it") from None


def load(args: argparse.Namespace):
    """The model on its device and dtype, its tokenizer, and what the API needs (api.Served)."""
    import torch

    from megatrain.config import ConfigError, config_from_dict
    from megatrain.generate import check_numbers, load_model, run_tokenizer
    from megatrain.serve.api import Served
    from megatrain.serve.batcher import Batcher
    from megatrain.tasks.lm import SFT

    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port}: must be 1 to 65535 (0: any free port)")
    check_numbers(("--slots", args.slots, 1), ("--max-waiting", args.max_waiting, 1),
                  ("--max-len", args.max_len, 2), ("--request-timeout", args.request_timeout, 0.001))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    model, saved = load_model(args.checkpoint, args.tag)
    if model.cfg.objective != "causal":
        raise ConfigError("serve needs a causal LM checkpoint (this one was trained with objective=mlm)")
    tok = run_tokenizer(model, saved, args.checkpoint, args.tokenizer)
    model.to(device=device, dtype=getattr(torch, args.dtype))
    batcher = Batcher(model, tok.eod_id, model.cfg.true_vocab_size or tok.vocab_size, slots=args.slots,
                      max_waiting=args.max_waiting, max_len=args.max_len)
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    chat = SFT(config_from_dict(saved["config"]), tok)  # a chat is rendered as sft trains on it
    served = Served(batcher, tok, chat.prompt_ids, name, args.request_timeout)
    return served, saved


def command(args: argparse.Namespace) -> int:
    import uvicorn

    from megatrain.serve.api import build_app

    served, saved = load(args)  # (the checks of every flag and the checkpoint first)
    check_port(args.host, args.port)
    app = build_app(served)
    served.batcher.start()
    print(f"megatrain serve: {served.model_id} ({args.checkpoint}, step {saved['step']}) on "
          f"http://{args.host}:{args.port}/v1, {args.slots} slots of {served.batcher.max_len} tokens",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        served.batcher.stop()
    return 0
