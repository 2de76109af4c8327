"""safetensors files written one tensor at a time, and read by byte offset.

The format (https://github.com/huggingface/safetensors): 8 bytes of little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensors' bytes back to
back. Knowing every name, shape and dtype up front is enough to write the header first and then stream each
tensor as it is produced, so a model of any size goes to disk while memory holds one tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


class SafetensorsWriter:
    """w = SafetensorsWriter(path, [(name, shape, dtype), ...]); w.write(name, t) for each, in that order; w.close()."""

    def __init__(self, path: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict | None = None):
        self.path, self.specs, self.next = path, specs, 0
        header, at = {}, 0
        for name, shape, dtype in specs:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
            at += n
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.size = 8 + len(raw) + at
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        want, shape, dtype = self.specs[self.next]
        if name != want or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.path}: expected {want} {tuple(shape)} next, got {name} {tuple(t.shape)}")
        t = t.detach().to("cpu", dtype).contiguous()
        self.f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.specs):
            raise ValueError(f"{self.path}: {len(self.specs) - self.next} tensors were never written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        self.f.close()


def read_header(path: str) -> tuple[dict, int]:
    """A safetensors file's header (without __metadata__) and the byte offset where its data starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        n = struct.unpack("<Q", raw)[0]
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes, its header describes {8 + n + end})")
    return header, 8 + n
