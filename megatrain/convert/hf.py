"""`megatrain convert to-hf` and `from-hf`: megatrain checkpoints <-> Hugging Face transformers folders.

The families and their name maps are in checkpoint/hf_families.py (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3, OLMo 2, GPT-2) and checkpoint/hf_moe.py (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE). Both directions check
themselves: the export is loaded with transformers and run beside megatrain's model on a fixed batch (logits within 1e-4, greedy tokens equal past the sliding window), and a failed
check leaves no output behind. from-hf keeps the source's class and generation_config.json beside the checkpoint;
to-hf writes them back.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import replace

import torch

from megatrain.checkpoint.hf import (Family, HFWeights, check_hf_weights, family_of, has_tokenizer, read_hf_config,
                                     to_hf_tensors)
from megatrain.checkpoint.hf_families import hf_config_kwargs
from megatrain.checkpoint.source import is_hf_folder
from megatrain.checkpoint.io import checkpoint_inputs
from megatrain.checkpoint.reader import CheckpointError, CheckpointReader
from megatrain.checkpoint.stream import SafetensorsWriter
from megatrain.config import LM_TASKS, Config, ModelConfig, has_window_layers
from megatrain.convert.consolidate import check_output
from megatrain.convert.writer import Job, finish, layout_words, target_config, write
from megatrain.data import TokenizerError, build_tokenizer
from megatrain.data.tokenizer import save_hf_tokenizer
from megatrain.fileio import atomic_dir
from megatrain.generate import generate, load_weights
from megatrain.model import Transformer
from megatrain.training.engine import PRECISION_DTYPE

TOLERANCE = 1e-4  # max |logit difference| a conversion may show (both models run in float64 for the check)
GREEDY_MAX = 128  # the longest greedy continuation the check compares (past a sliding window up to 120 tokens)


# -- to-hf ----------------------------------------------------------------------------------------------------


def hf_config(m: ModelConfig, fam: Family, vocab: int, tok):
    """The transformers config object for megatrain's model config (fam.config_class, every feature set)."""
    import transformers

    ids = dict(bos_token_id=tok.bos_id if tok else None, eos_token_id=tok.eod_id if tok else None,
               pad_token_id=tok.pad_id if tok else None)
    config_class = getattr(transformers, fam.config_class)
    return config_class(**hf_config_kwargs(m, fam, vocab), architectures=[fam.architecture], **ids)


def parse_size(text: str) -> int:
    """--max-shard-size: '5GB', '500MB', '2GiB' or a number of bytes -> bytes (at least 1)."""
    m = re.fullmatch(r"\s*(-?\d*\.?\d+)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"--max-shard-size {text}: expected a size like 5GB, 500MB or a number of bytes")
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "TIB": 2**40}
    size = int(float(m.group(1)) * units[(m.group(2) or "").upper()])
    if size < 1:
        raise CheckpointError(f"--max-shard-size {text}: a shard holds at least 1 byte; give a size like 5GB or 500MB "
                              f"(default 5GB)")
    return size


def _load_tokenizer(spec: str):
    try:
        return build_tokenizer(spec)
    except TokenizerError as e:
        print(f"note: tokenizer not exported ({e})", file=sys.stderr)
        return None


def to_hf(src: str, out: str, tag: str | None = None, dtype: str = "fp32", max_shard_size: str = "5GB",
          verify: bool = True, force: bool = False) -> int:
    check_output(out, force, checkpoint_inputs(src, tag))
    limit = parse_size(max_shard_size)
    with CheckpointReader(src, tag, merge_lora=True, verify="full") as reader:
        m = reader.cfg.model
        if reader.cfg.finetune.task not in LM_TASKS:
            raise CheckpointError(f"finetune.task={reader.cfg.finetune.task}: to-hf exports language models; use "
                                  f"`megatrain convert consolidate` for a fine-tuned {reader.cfg.finetune.task} model")
        architecture, generation = hf_origin(reader)
        fam = family_of(m, prefer=architecture)
        tok = _load_tokenizer(reader.cfg.data.tokenizer)
        vocab = min(m.true_vocab_size or (tok.vocab_size if tok else m.vocab_size), m.vocab_size)  # padding rows go
        with atomic_dir(out, replace=force) as tmp:
            t0 = time.perf_counter()
            n_files = _write_hf_weights(reader, tmp, fam, vocab, PRECISION_DTYPE[dtype], limit)
            seconds = time.perf_counter() - t0
            nbytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
            hf_config(m, fam, vocab, tok).save_pretrained(tmp)
            if generation:  # the imported model's own: its end tokens and sampling defaults
                shutil.copy2(generation, os.path.join(tmp, GENERATION_CONFIG))
            else:
                _generation_config(tmp)
            if tok:
                save_hf_tokenizer(tok, tmp, m.max_seq_len)
            if verify:
                why = check_parity(_megatrain_model(reader, PRECISION_DTYPE[dtype]), tmp, vocab)
                if why:
                    raise CheckpointError(f"the export does not compute megatrain's model ({why}); nothing was "
                                          f"written to {out}")
    print(f"exported {reader.where} as {fam.architecture} ({dtype}, vocab {vocab}, {n_files} safetensors file"
          f"{'s' if n_files > 1 else ''}) -> {out} ({nbytes / 1e9:.2f} GB of weights in {seconds:.2f} s)")
    return 0


def _write_hf_weights(reader: CheckpointReader, out: str, fam: Family, vocab: int, dtype: torch.dtype,
                      limit: int) -> int:
    """model.safetensors (or model-0000i-of-0000n.safetensors + index above `limit` bytes), one tensor at a time."""
    m = reader.cfg.model
    plan = []  # (hf name, shape), in the order they are produced
    for name in reader.names():
        meta = torch.empty(reader.shape(name), device="meta")
        plan += [(n, tuple(t.shape)) for n, t in to_hf_tensors(name, meta, m, fam, vocab)]
    size = torch.empty((), dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for n, shape in plan:
        nbytes = math.prod(shape) * size
        if current and used + nbytes > limit:
            shards.append(current)
            current, used = [], 0
        current.append((n, shape, dtype))
        used += nbytes
    shards.append(current)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    writers = [SafetensorsWriter(os.path.join(out, f), specs, metadata={"format": "pt"})
               for f, specs in zip(files, shards)]
    which = {n: w for w, specs in zip(writers, shards) for n, _, _ in specs}
    try:
        for name, t in reader.tensors():
            for n, part in to_hf_tensors(name, t, m, fam, vocab):
                which[n].write(n, part)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * size for _, s in plan)},
                 "weight_map": {n: f for f, specs in zip(files, shards) for n, _, _ in specs}}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
    return len(files)


def _generation_config(out: str) -> None:
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(out)).save_pretrained(out)


GENERATION_CONFIG = "generation_config.json"
HF_SOURCE = "hf_source.json"  # what from-hf imported: {"architecture": ..., "from": ...}


def hf_origin(reader: CheckpointReader) -> tuple[str | None, str | None]:
    """(the transformers class, the generation_config.json file) of the Hugging Face model a checkpoint came from:
    a from-hf output keeps both, a run started from one (checkpoint.init, finetune.init) names it; (None, None) for a
    model trained from scratch."""
    cfg = reader.cfg
    folders = [reader.folder, reader.dir, cfg.checkpoint.init, cfg.finetune.init]
    architecture = generation = None
    for folder in (f for f in folders if f and os.path.isdir(f)):
        source = os.path.join(folder, HF_SOURCE)
        try:
            if architecture is None and os.path.isfile(source):
                with open(source) as f:
                    architecture = json.load(f).get("architecture")
            elif architecture is None and is_hf_folder(folder):
                with open(os.path.join(folder, "config.json")) as f:
                    architecture = (json.load(f).get("architectures") or [None])[0]
        except (OSError, ValueError, AttributeError, IndexError):
            pass  # a damaged note: the model's features pick the class
        if generation is None and os.path.isfile(os.path.join(folder, GENERATION_CONFIG)):
            generation = os.path.join(folder, GENERATION_CONFIG)
    return architecture, generation


def _megatrain_model(reader: CheckpointReader, dtype: torch.dtype = torch.float32):
    """megatrain's own model from `reader` (weights rounded through `dtype`, as the export stores them)."""
    model = Transformer(replace(reader.cfg.model, dropout=0.0))
    load_weights(model, reader)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model.eval()


# -- the parity check -----------------------------------------------------------------------------------------


def check_parity(model, hf_dir: str, vocab: int) -> str | None:
    """Run megatrain's `model` and transformers' load of `hf_dir` side by side: the largest logit difference on one
    fixed batch, and greedy continuations longer than the sliding window (when there is one). Prints both; returns
    None when they agree, else the one-line reason. Both run in float64, so what shows is the conversion and not
    rounding (a 30-layer model's fp32 logits differ by ~1e-4 from its own fp64 ones, in transformers as in
    megatrain). Both continue greedily under the same rule: the argmax, never stopping at an end token nor kept
    from one."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    # eager experts: a MoE class's default grouped matmul has no float64
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, local_files_only=True,
                                              experts_implementation="eager").eval()
    # the folder's generation_config.json (end tokens, min_new_tokens, repetition penalties) would change the rule
    hf.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = Transformer(replace(model.cfg, fused_kernels="off"))  # the plain-PyTorch path takes float64
    ours.load_state_dict(model.state_dict())
    ours = ours.double().eval()
    cfg = ours.cfg
    g = torch.Generator().manual_seed(0)
    T = min(32, cfg.max_seq_len)
    ids = torch.randint(0, vocab, (2, T), generator=g)
    with torch.no_grad():
        diff = float((ours(ids)[..., :vocab] - hf(input_ids=ids).logits).abs().max())
    window = cfg.sliding_window if has_window_layers(cfg) else 0
    P = min(8, T - 1)
    prompt, new = ids[:1, :P], min(max(16, window + 8 - P), GREEDY_MAX, cfg.max_seq_len - P)  # past the window
    if window and P + new <= window:  # a real model's window (Gemma 3: 512+): float64 decoding past it takes long
        print(f"note: the parity check's {new}-token continuation stays inside the {window}-token sliding window; "
              f"the window itself is checked by megatrain's tests against transformers", file=sys.stderr)
    greedy_ours = generate(ours, prompt, new, temperature=0, vocab_limit=vocab)[0, P:].tolist()
    with torch.no_grad():
        greedy_hf = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                do_sample=False)[0, P:].tolist()
    same, why = "same", None
    if greedy_ours != greedy_hf:
        j = next((i for i, (a, b) in enumerate(zip(greedy_ours, greedy_hf)) if a != b), min(len(greedy_ours),
                                                                                          len(greedy_hf)))
        gap = _logit_gap(ours, prompt, greedy_ours, greedy_hf, j, vocab)
        if gap is not None and gap <= 2 * TOLERANCE:  # a near tie the logit tolerance lets either way
            same = f"same up to a near tie at token {j}: logits {gap:.1e} apart"
        else:
            same = "DIFFERENT"
            why = f"greedy tokens differ at token {j} of {new}: megatrain {_at(greedy_ours, j)}, transformers " \
                  f"{_at(greedy_hf, j)}"
    print(f"parity: max |logit difference| {diff:.2e} on {ids.shape[0]}x{T} tokens, float64 (tolerance {TOLERANCE:g}); "
          f"greedy tokens megatrain {_short(greedy_ours)} | transformers {_short(greedy_hf)} ({same})", flush=True)
    if diff > TOLERANCE:
        return f"max |logit difference| {diff:.2e} above {TOLERANCE:g}"
    return why


def _logit_gap(ours, prompt, greedy_ours: list[int], greedy_hf: list[int], j: int, vocab: int) -> float | None:
    """How far apart megatrain's logits put the two tokens chosen at the first difference, token j (None: one side
    stopped early)."""
    if j >= min(len(greedy_ours), len(greedy_hf)):
        return None
    seq = torch.cat([prompt, torch.tensor([greedy_ours[:j]], dtype=prompt.dtype)], dim=1)
    with torch.no_grad():
        logits = ours(seq)[0, -1, :vocab]
    return float(logits[greedy_ours[j]] - logits[greedy_hf[j]])


def _at(tokens: list[int], j: int) -> str:
    return str(tokens[j]) if j < len(tokens) else f"ended after {len(tokens)} tokens"


def _short(tokens: list[int]) -> str:
    return str(tokens) if len(tokens) <= 40 else f"[{', '.join(map(str, tokens[:20]))}, ... {len(tokens)} tokens]"


# -- from-hf --------------------------------------------------------------------------------------------------


def from_hf(hf_dir: str, out: str, sets: list[str], world: int | None, trust_pickle: bool = False, verify: bool = True,
            force: bool = False) -> int:
    check_output(out, force, [("HF_DIR", hf_dir)])
    fam, m, V, arch = read_hf_config(hf_dir)
    weights = HFWeights(hf_dir, trust_pickle)
    check_hf_weights(weights, m, fam, V)
    base = Config()
    base.model = m
    base.data.seq_len = min(base.data.seq_len, m.max_seq_len)
    cfg, world = target_config(base, sets, world)
    step = math.lcm(cfg.model.pad_vocab_multiple, cfg.parallel.tp)  # rows TP can split (zero padding, dropped by to-hf)
    cfg.model.vocab_size, cfg.model.true_vocab_size = -(-V // step) * step, V
    out = os.path.abspath(out)
    cfg.checkpoint.dir = out
    tokenizer = hf_dir if has_tokenizer(hf_dir) else None
    cfg.data.tokenizer = f"hf:{out}/tokenizer" if tokenizer else f"hf:{os.path.abspath(hf_dir)}"
    if not tokenizer:
        print(f"note: {hf_dir} holds no tokenizer; data.tokenizer names the folder, set it before training",
              file=sys.stderr)
    job = Job(cfg.to_dict(), None, None, os.path.abspath(hf_dir), trust_pickle, f"{out}.partial", 0, 0,
              tokenizer_from=tokenizer)
    t0 = time.perf_counter()
    if not write(job, world):
        return 0  # a launcher's rank other than 0: rank 0 checks and finishes
    seconds = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(job.tmp) for f in files)
    # kept beside the checkpoint for to-hf: the class it came from and its generation defaults (end tokens, ...)
    with open(os.path.join(job.tmp, HF_SOURCE), "w") as f:
        json.dump({"architecture": arch, "from": os.path.abspath(hf_dir)}, f)
    if os.path.isfile(os.path.join(hf_dir, GENERATION_CONFIG)):
        shutil.copy2(os.path.join(hf_dir, GENERATION_CONFIG), os.path.join(job.tmp, GENERATION_CONFIG))
    if verify:
        with CheckpointReader(job.tmp) as reader:
            model = _megatrain_model(reader)
        why = check_parity(model, hf_dir, V)
        if why:
            shutil.rmtree(job.tmp, ignore_errors=True)
            raise CheckpointError(f"the import does not compute the Hugging Face model ({why}); nothing was written "
                                  f"to {out}")
    finish(job.tmp, out, force)
    print(f"imported {hf_dir} ({arch}, vocab {V} -> {cfg.model.vocab_size} rows) -> {out} "
          f"({layout_words(cfg, world)}, step 0; {nbytes / 1e9:.2f} GB written by {world} "
          f"rank{'s' if world > 1 else ''} in {seconds:.1f} s)")
    return 0
