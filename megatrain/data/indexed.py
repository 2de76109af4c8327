"""Memory-mapped token datasets in Megatron-LM's `MMIDIDX` format (`P.bin` + `P.idx`).

`P.bin` is the token ids of every sequence, back to back, in one dtype. `P.idx` describes it:

    offset  field
    0       magic       9 bytes  b"MMIDIDX\\x00\\x00"
    9       version     <Q       1
    17      dtype code  <B       see DTYPE_CODES
    18      n_seq       <Q       number of sequences
    26      n_doc_idx   <Q       entries in doc_idx (documents + 1)
    34      sizes       int32[n_seq]       tokens per sequence
    ...     pointers    int64[n_seq]       byte offset of each sequence in P.bin
    ...     doc_idx     int64[n_doc_idx]   first sequence of each document, then n_seq

A document is usually one sequence; Megatron's BERT data splits documents into sentences, which is
why the format has both. Files written here open in Megatron-LM and GPT-NeoX and vice versa.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from megatrain import faults
from megatrain.fileio import remove_stale_temporaries

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34

# Megatron's dtype codes; the numbers are part of the on-disk format.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A `.bin/.idx` pair that is missing, truncated or inconsistent."""


def token_dtype_for_vocab(vocab_size: int) -> type:
    """uint16 when every id fits (the Megatron rule: vocab < 65500), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


class IndexedDatasetWriter:
    """Streams sequences into `P.bin` and writes `P.idx` on close.

    Both files are written under temporary names and renamed only when the `with` block ends without
    an exception, so an interrupted run never leaves a `.bin/.idx` that looks complete.

        with IndexedDatasetWriter("data/wiki", dtype=np.uint16) as w:
            for tokens in documents:
                w.add_document(tokens)
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type = np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise IndexedDatasetError(
                f"dtype {self.dtype} cannot be stored in MMIDIDX; use one of "
                + ", ".join(str(np.dtype(t)) for t in DTYPE_CODES.values())
            )
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]
        self._bin = None
        self._tmp_bin = f"{bin_path(self.prefix)}.tmp{os.getpid()}"
        self._tmp_idx = f"{idx_path(self.prefix)}.tmp{os.getpid()}"
        # Files finalised next to the pair (e.g. a metadata sidecar) are renamed with it.
        self._extra_files: dict[str, str] = {}

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "IndexedDatasetWriter":
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        for final in (bin_path(self.prefix), idx_path(self.prefix), f"{self.prefix}.meta.json"):
            remove_stale_temporaries(final)  # a killed writer's half-written files
        self._bin = open(self._tmp_bin, "wb")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    # -- writing ---------------------------------------------------------------------------------
    def add_item(self, tokens) -> None:
        """Append one sequence to the current document (Megatron's `add_item`)."""
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
                raise IndexedDatasetError(
                    f"token id {int(arr.max())} does not fit in {self.dtype}; "
                    f"write with dtype=np.int32 for vocabularies of 65500 or more"
                )
            arr = arr.astype(self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append many one-sequence documents at once: `tokens` is their concatenation."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(tokens.tobytes(order="C"))
        first = len(self._sizes)
        self._sizes.extend(int(s) for s in sizes)
        self._doc_idx.extend(range(first + 1, len(self._sizes) + 1))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one document."""
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        """Append a document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_file_on_finalize(self, tmp_path: str, final_path: str) -> None:
        """Rename `tmp_path` to `final_path` together with the `.bin/.idx` (or delete it on abort)."""
        self._extra_files[tmp_path] = final_path

    def finalize(self) -> None:
        self._bin.close()
        if self._doc_idx[-1] != len(self._sizes):
            self.end_document()  # sequences added with add_item but no end_document
        write_index(self._tmp_idx, self.dtype, np.asarray(self._sizes, np.int32), np.asarray(self._doc_idx, np.int64))
        # The .idx goes last: a .bin without its .idx is never mistaken for a finished dataset. An older dataset's
        # .idx goes first, so that no moment pairs the new .bin with the old .idx (a kill -9 between the renames).
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        for tmp, final in self._extra_files.items():
            os.replace(tmp, final)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        faults.kill_here("kill_before_index")
        os.replace(self._tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        if self._bin is not None and not self._bin.closed:
            self._bin.close()
        for p in [self._tmp_bin, self._tmp_idx, *self._extra_files]:
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


def token_offsets(sizes: np.ndarray) -> np.ndarray:
    """Where each sequence starts, in tokens, plus the total: int64[len(sizes) + 1]."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, dtype=np.int64, out=out[1:])
    return out


def write_index(path: str, dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write an MMIDIDX `.idx` file; byte pointers are derived from the sizes."""
    dtype = np.dtype(dtype)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    pointers = token_offsets(sizes)[:-1] * dtype.itemsize
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", _CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))


class IndexedDataset:
    """Read-only, memory-mapped view of a `P.bin/P.idx` pair.

    `ds[i]` is sequence i as a numpy array that points into the mapped file (no copy); `ds.get(i,
    offset, length)` reads part of one. Everything is checked at open: a truncated or mismatched pair
    raises IndexedDatasetError with the file name and what to do.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"{p}: no such file; build the dataset with `megatrain preprocess`")
        if os.path.getsize(ipath) < HEADER_BYTES:  # (np.memmap cannot map an empty file)
            raise IndexedDatasetError(f"{ipath}: not an MMIDIDX index (too short); rebuild it with `megatrain preprocess`")
        self._idx_mmap = np.memmap(ipath, mode="r", order="C")
        idx = memoryview(self._idx_mmap)
        if len(idx) < HEADER_BYTES or bytes(idx[:9]) != MAGIC:
            raise IndexedDatasetError(f"{ipath}: not an MMIDIDX index (bad magic or too short); rebuild it with `megatrain preprocess`")
        (version,) = struct.unpack_from("<Q", idx, 9)
        (code,) = struct.unpack_from("<B", idx, 17)
        n_seq, n_doc_idx = struct.unpack_from("<QQ", idx, 18)
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: index version {version}, only version 1 is supported")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{ipath}: unknown dtype code {code} (corrupted index?)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        want = HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc_idx
        if len(idx) != want:
            raise IndexedDatasetError(
                f"{ipath}: {len(idx)} bytes but the header describes {n_seq} sequences and "
                f"{n_doc_idx} doc_idx entries ({want} bytes): the index is truncated or corrupted; rebuild it"
            )
        off = HEADER_BYTES
        self.sizes = np.frombuffer(idx, np.int32, n_seq, off)
        self.pointers = np.frombuffer(idx, np.int64, n_seq, off + 4 * n_seq)
        self.doc_idx = np.frombuffer(idx, np.int64, n_doc_idx, off + 12 * n_seq)
        self._check_consistent(ipath, bpath)
        self._bin_mmap = np.memmap(bpath, mode="r", order="C") if os.path.getsize(bpath) else np.zeros(0, np.uint8)
        self._bin = memoryview(self._bin_mmap)

    def _check_consistent(self, ipath: str, bpath: str) -> None:
        n = len(self.sizes)
        if len(self.doc_idx) == 0 or self.doc_idx[0] != 0 or self.doc_idx[-1] != n or np.any(np.diff(self.doc_idx) < 0):
            raise IndexedDatasetError(f"{ipath}: doc_idx must rise from 0 to {n} (corrupted index); rebuild it")
        if n and np.any(self.sizes < 0):
            raise IndexedDatasetError(f"{ipath}: negative sequence size (corrupted index); rebuild it")
        # kept: samples.py reads tokens by these offsets instead of re-deriving them
        self.offsets = token_offsets(self.sizes)
        nbytes = int(self.offsets[-1]) * self.dtype.itemsize
        if n:
            if not np.array_equal(self.offsets[:-1] * self.dtype.itemsize, self.pointers):
                raise IndexedDatasetError(f"{ipath}: pointers disagree with sizes (corrupted index); rebuild it")
        actual = os.path.getsize(bpath)
        if actual != nbytes:
            what = "truncated" if actual < nbytes else "longer than its index"
            raise IndexedDatasetError(
                f"{bpath}: {actual} bytes but {ipath} describes {nbytes}: the .bin is {what} "
                f"(interrupted copy, or a .bin/.idx from different runs); rebuild or re-copy the pair"
            )

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        return np.frombuffer(self._bin, self.dtype, int(self.sizes[i]), int(self.pointers[i]))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence i, without copying."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"sequence {i} has {size} tokens; asked for [{offset}, {offset + length})")
        return np.frombuffer(self._bin, self.dtype, length, int(self.pointers[i]) + offset * self.dtype.itemsize)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def document_sizes(self) -> np.ndarray:
        """Tokens per document (sums of its sequences); equals `sizes` when each doc is one sequence."""
        if len(self.doc_idx) - 1 == len(self.sizes):
            return self.sizes
        return self.offsets[self.doc_idx[1:]] - self.offsets[self.doc_idx[:-1]]

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, dtype={self.dtype})"
