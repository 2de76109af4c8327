"""The .bin/.idx pair is Megatron's MMIDIDX byte for byte, and damage is caught at open."""
import os
import struct

import numpy as np
import pytest

from megatrain.data import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter


def reference_idx_bytes(code: int, sizes: list[int], doc_idx: list[int], itemsize: int) -> bytes:
    """The MMIDIDX layout written independently of megatrain, field by field with struct."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    ptr = 0
    for s in sizes:
        out += struct.pack("<q", ptr)
        ptr += s * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


DOCS = [[1, 2, 3], [65000], [], [7, 8, 9, 10, 11], [300] * 17]


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5), (np.uint8, 1)])
def test_writer_matches_reference_layout(tmp_path, dtype, code):
    docs = DOCS if dtype != np.uint8 else [[1, 2], [255], [], [0]]
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, dtype=dtype) as w:
        for d in docs:
            w.add_document(d)
    itemsize = np.dtype(dtype).itemsize
    expect_idx = reference_idx_bytes(code, [len(d) for d in docs], list(range(len(docs) + 1)), itemsize)
    assert open(prefix + ".idx", "rb").read() == expect_idx
    fmt = {1: "B", 4: "i", 5: "q", 8: "H"}[code]
    expect_bin = b"".join(struct.pack("<" + fmt * len(d), *d) for d in docs)
    assert open(prefix + ".bin", "rb").read() == expect_bin


def test_reader_opens_reference_layout(tmp_path):
    """The other direction: bytes laid out by hand (as Megatron would) read back correctly."""
    seqs = [[5, 6], [7], [8, 9, 10]]
    doc_idx = [0, 2, 3]  # two documents: the first has two sequences (Megatron BERT-style)
    prefix = str(tmp_path / "m")
    with open(prefix + ".idx", "wb") as f:
        f.write(reference_idx_bytes(4, [len(s) for s in seqs], doc_idx, 4))
    with open(prefix + ".bin", "wb") as f:
        f.write(b"".join(struct.pack(f"<{len(s)}i", *s) for s in seqs))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_documents == 2
    assert [ds[i].tolist() for i in range(3)] == seqs
    assert ds.doc_idx.tolist() == doc_idx
    assert ds.sizes.tolist() == [2, 1, 3]
    assert ds.document_sizes().tolist() == [3, 3]
    assert ds.get(2, 1, 2).tolist() == [9, 10]
    assert ds[-1].tolist() == [8, 9, 10]


def test_items_and_documents_round_trip(tmp_path):
    prefix = str(tmp_path / "x")
    with IndexedDatasetWriter(prefix) as w:
        w.add_item([1, 2])
        w.add_item([3])
        w.end_document()
        w.add_documents(np.array([4, 5, 6, 7]), np.array([1, 3]))
    ds = IndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 2, 3, 4]
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4], [5, 6, 7]]
    arr = ds[3]
    assert not arr.flags.owndata and not arr.flags.writeable  # a view into the mapped file


def test_token_too_large_for_dtype(tmp_path):
    with pytest.raises(IndexedDatasetError, match="does not fit in uint16"):
        with IndexedDatasetWriter(str(tmp_path / "big"), dtype=np.uint16) as w:
            w.add_document([70000])
    assert os.listdir(tmp_path) == []  # nothing half-written left behind


def _write(tmp_path, name="d"):
    prefix = str(tmp_path / name)
    with IndexedDatasetWriter(prefix) as w:
        for d in DOCS:
            w.add_document(d)
    return prefix


def test_truncated_bin_is_detected(tmp_path):
    prefix = _write(tmp_path)
    data = open(prefix + ".bin", "rb").read()
    open(prefix + ".bin", "wb").write(data[:-4])
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: .* the \.bin is truncated"):
        IndexedDataset(prefix)


def test_mismatched_pair_is_detected(tmp_path):
    a, b = _write(tmp_path, "a"), str(tmp_path / "b")
    with IndexedDatasetWriter(b) as w:
        w.add_document([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28])
    os.replace(b + ".bin", a + ".bin")
    with pytest.raises(IndexedDatasetError, match="longer than its index"):
        IndexedDataset(a)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b"XXXXXXXXX" + b[9:], "bad magic"),
    (lambda b: b[:-8], "truncated or corrupted"),
    (lambda b: b[:17] + b"\x63" + b[18:], "unknown dtype code 99"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
    (lambda b: b[:34] + struct.pack("<i", 2) + b[38:], "pointers disagree with sizes"),
    (lambda b: b[:-8] + struct.pack("<q", 3), "doc_idx must rise"),
    (lambda b: b[:5], "too short"),
])
def test_corrupted_idx_is_detected(tmp_path, damage, match):
    prefix = _write(tmp_path)
    data = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(damage(data))
    with pytest.raises(IndexedDatasetError, match=match):
        IndexedDataset(prefix)


def test_missing_files(tmp_path):
    with pytest.raises(IndexedDatasetError, match="no such file"):
        IndexedDataset(str(tmp_path / "nope"))
