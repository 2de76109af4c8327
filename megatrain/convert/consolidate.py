"""`megatrain convert consolidate`: a checkpoint of any layout -> OUT/model.safetensors + OUT/megatrain.json + the
tokenizer's files, one tensor at a time (memory holds the tensor being written, whatever the model's size).

OUT is itself a checkpoint every reader takes: `megatrain generate --checkpoint OUT`, `checkpoint.init: OUT`,
`megatrain convert to-hf OUT`. Its megatrain.json is the saved config (tokenizer spec relative to OUT), the step and
samples reached, and where it came from.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

from megatrain.checkpoint.io import STATE_FILE, checkpoint_inputs
from megatrain.checkpoint.reader import CONSOLIDATED, CheckpointError, CheckpointReader
from megatrain.checkpoint.stream import SafetensorsWriter
from megatrain.data.tokenizer import parse_spec
from megatrain.fileio import atomic_dir, check_output_path
from megatrain.training.engine import PRECISION_DTYPE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")


def check_output(out: str, force: bool, inputs: list[tuple[str, str]]) -> None:
    """Before anything is read: `out` can be made, is none of `inputs` and holds none (--force replaces it whole)."""
    check_output_path(out, "--output", kind="folder", inputs=inputs)
    if os.path.exists(out) and not force:
        raise CheckpointError(f"--output {out}: already exists; pick a new folder or pass --force to replace it")


def copy_tokenizer(spec: str, out: str) -> str:
    """Copy the files of tokenizer `spec` into `out`; the spec that finds them there, relative to `out`."""
    kind, path = parse_spec(spec)
    if kind == "byte":
        return spec
    if not os.path.exists(path):
        print(f"note: tokenizer {spec} not found from here; its files are not copied (the spec is kept as is)",
              file=sys.stderr)
        return spec
    if os.path.isdir(path):
        if kind != "hf" and os.path.isfile(os.path.join(path, "tokenizer.model")) and not \
                os.path.isfile(os.path.join(path, "tokenizer.json")):
            shutil.copy2(os.path.join(path, "tokenizer.model"), os.path.join(out, "tokenizer.model"))
            return "sentencepiece:tokenizer.model"
        for name in os.listdir(path):  # a Hugging Face tokenizer folder: everything but weights
            src = os.path.join(path, name)
            if os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES) and name not in (STATE_FILE, "config.json"):
                shutil.copy2(src, os.path.join(out, name))
        return "hf:."
    if path.endswith(".json"):
        shutil.copy2(path, os.path.join(out, "tokenizer.json"))
        return "hf:tokenizer.json"
    shutil.copy2(path, os.path.join(out, "tokenizer.model"))
    return "sentencepiece:tokenizer.model"


def consolidate(src: str, out: str, tag: str | None = None, dtype: str = "fp32", force: bool = False) -> str:
    check_output(out, force, checkpoint_inputs(src, tag))
    t0 = time.perf_counter()
    with CheckpointReader(src, tag, merge_lora=True, verify="full") as reader, atomic_dir(out, replace=force) as tmp:
        write_consolidated(reader, tmp, PRECISION_DTYPE[dtype])
    n = sum(torch.Size(reader.shape(k)).numel() for k in reader.names())
    size = os.path.getsize(os.path.join(out, CONSOLIDATED))
    print(f"consolidated {reader.where}: {len(reader.names())} tensors, {n / 1e6:.2f}M parameters, {dtype}, "
          f"step {reader.state.get('step', 0)} -> {out}/{CONSOLIDATED} ({size / 1e9:.2f} GB in "
          f"{time.perf_counter() - t0:.2f} s)")
    return out


def write_consolidated(reader: CheckpointReader, out: str, dtype: torch.dtype = torch.float32) -> None:
    """OUT/model.safetensors, OUT/megatrain.json and the tokenizer, from `reader`, one tensor at a time."""
    specs = [(name, reader.shape(name), dtype) for name in reader.names()]
    writer = SafetensorsWriter(os.path.join(out, CONSOLIDATED), specs, metadata={"format": "pt"})
    try:
        for name, t in reader.tensors():
            writer.write(name, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    resolved = reader.resolved.but(tokenizer=copy_tokenizer(reader.cfg.data.tokenizer, out)).to_dict()
    state = {k: v for k, v in reader.state.items() if k not in ("config", "resolved", "layout")}
    state.update(config=reader.asked.to_dict(), resolved=resolved,
                 consolidated_from=dict(path=reader.folder, layout=reader.layout),
                 dtype=str(dtype).removeprefix("torch."))
    with open(os.path.join(out, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
