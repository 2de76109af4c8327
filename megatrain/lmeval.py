"""`megatrain lm-eval --checkpoint DIR --tasks T1,T2 [--include-path TASK_DIR]`: EleutherAI's lm-evaluation-harness
(lm-eval 0.4.x) on a megatrain checkpoint of any layout, in one process.

`MegatrainLM` is an lm-eval model (loglikelihood, loglikelihood_rolling, generate_until) built on lm-eval's own
TemplateLM, so a request is tokenized exactly as lm-eval's `hf` model tokenizes it (trailing spaces of the context
moved to the continuation; an empty context conditioned on the BOS token, else end-of-document; rolling windows of
model.max_seq_len). On a checkpoint and its `convert to-hf` export the two give the same numbers (tested to 1e-4).
Tasks can be lm-eval's own (they download their data: not on an offline machine) or local YAML files over local
jsonl (`--include-path`): see the README.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch
import torch.nn.functional as F

from megatrain.config import ConfigError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # lm-eval is optional (pip install -e ".[eval]"); the command says so
    TemplateLM = object


class MegatrainLM(TemplateLM):
    def __init__(self, checkpoint: str, tag: str | None = None, batch_size: int = 8):
        super().__init__()
        from megatrain.data import build_tokenizer
        from megatrain.generate import load_model

        self.model, saved = load_model(checkpoint, tag)
        self.model.eval()
        cfg = self.model.cfg
        if cfg.objective != "causal":
            raise ConfigError(f"{checkpoint}: lm-eval scores causal language models (this one is {cfg.objective})")
        self.tok = build_tokenizer(saved["config"]["data"]["tokenizer"])
        self.max_length, self.batch_size = cfg.max_seq_len, batch_size
        self.vocab = cfg.true_vocab_size or self.tok.vocab_size

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eod_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax over the real vocabulary at every position of each row, in padded batches."""
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i: i + self.batch_size]
            T = max(len(r) for r in chunk)
            x = torch.zeros((len(chunk), T), dtype=torch.long)
            for b, r in enumerate(chunk):
                x[b, : len(r)] = torch.tensor(r)
            with torch.no_grad():
                logits = self.model(x)[..., : self.vocab].float()
            out += [F.log_softmax(logits[b, : len(r)], dim=-1) for b, r in enumerate(chunk)]
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, conts = [], []
        for _, context, continuation in requests:
            rows.append((context + continuation)[-(self.max_length + 1):][:-1])
            conts.append(continuation)
        results = []
        for lp, row, cont in zip(self._logprobs(rows), rows, conts):
            lp = lp[len(row) - len(cont):]  # the positions that predict the continuation
            target = torch.tensor(cont)
            results.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in (r.args for r in requests):
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megatrain.generate import generate

        out = []
        for context, kw in (r.args for r in requests):
            until = kw.get("until") or [self.tok.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            new = int(kw.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - 1):]
            row = generate(self.model, torch.tensor([ids]), new, temperature=0, eod_id=self.eot_token_id,
                           vocab_limit=self.vocab)[0, len(ids):].tolist()
            text = self.tok.decode([t for t in row if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a causal LM checkpoint of any layout")
    p.add_argument("--tag", default=None, help="a step folder (default: the one DIR/latest names)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of local task YAML files")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default=None, metavar="FILE.json", help="write the results here too")


def check_arguments(args: argparse.Namespace) -> list[str]:
    """The task names of --tasks, after every flag is checked (before the model is read): lm-eval would fail on
    these deep inside its loop, or take a negative --num-fewshot without a word."""
    from megatrain.generate import check_numbers

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"--tasks {args.tasks!r}: names no task; give comma-separated lm-eval task names")
    check_numbers(("--batch-size", args.batch_size, 1), ("--num-fewshot", args.num_fewshot, 0))
    # lm-eval reads a limit below 1 as a share of each task's examples, and from 1 on as a count
    if args.limit is not None and not (0 < args.limit < 1 or (args.limit >= 1 and args.limit.is_integer())):
        raise ConfigError(f"--limit {args.limit:g}: must be a count of examples per task (1, 2, ...) or a share of "
                          f"them between 0 and 1")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise ConfigError(f"--include-path {args.include_path}: no such folder (it should hold the task YAML files)")
    return tasks


def unparsable_yamls(folder: str) -> list[tuple[str, str]]:
    """The YAML files under `folder` that do not parse, each as ('path:line', the problem): lm-eval's index skips
    such a file without a word, so its task reads as one that does not exist."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # lm-eval's `!function module.name` tags
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.yaml"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            try:
                yaml.load(f, Loader=Loader)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                out.append((f"{path}:{mark.line + 1}" if mark else path, getattr(e, "problem", None) or str(e)))
    return out


def evaluate(lm, tasks: list[str], include_path: str | None = None, limit=None, num_fewshot=None,
             manager=None) -> dict:
    """lm-eval's results of `tasks` on `lm`. `manager`: a TaskManager to reuse (building one indexes lm-eval's
    thousands of task YAMLs, ~8 s); by default one over lm-eval's tasks and include_path's."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if manager is None:
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        broken = unparsable_yamls(include_path) if include_path else []
        if broken:
            (where, problem), more = broken[0], len(broken) - 1
            raise ConfigError(f"--tasks: no lm-eval task named {unknown[0]!r}, and {where} is not valid YAML "
                              f"({problem}){f', nor are {more} more files' if more else ''}; lm-eval skips such a "
                              f"file: fix it")
        raise ConfigError(f"--tasks: no lm-eval task named {unknown[0]!r}"
                          + (f" (looked in {include_path} too)" if include_path else "; local YAMLs: --include-path"))
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=False)["results"]


def command(args: argparse.Namespace) -> int:
    if args.output is not None:  # before anything is read or imported
        from megatrain.checkpoint.io import checkpoint_inputs
        from megatrain.fileio import check_output_path

        reads = checkpoint_inputs(args.checkpoint, args.tag)
        check_output_path(args.output, "--output", example="results.json",
                          inputs=reads + ([("--include-path", args.include_path)] if args.include_path else []))
    if TemplateLM is object:
        raise ConfigError("lm-eval is not installed: pip install 'lm-eval==0.4.*' (or pip install -e '.[eval]')")
    tasks = check_arguments(args)
    lm = MegatrainLM(args.checkpoint, args.tag, args.batch_size)
    results = evaluate(lm, tasks, args.include_path, args.limit, args.num_fewshot)
    for task, metrics in results.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    if args.output is not None:
        from megatrain.fileio import write_atomic

        write_atomic(args.output, json.dumps(results, indent=1, default=str))
    print(f"# {args.checkpoint}", file=sys.stderr)
    return 0
