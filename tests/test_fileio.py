"""Tier 1: files written beside their target and renamed over it, never seen half-written."""
import os
import stat

import numpy as np
import pytest

from megatrain.fileio import BadFileError, atomic_path, check_output_path, write_atomic


def test_atomic_path_renames_when_the_block_ends_and_leaves_nothing_when_it_raises(tmp_path):
    target = tmp_path / "sub" / "arr.npy"  # the folder is made
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, np.arange(3))
        assert not target.exists()  # not before the block ends
    assert np.load(target).tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError):
        with atomic_path(target, suffix=".npy") as tmp:
            np.save(tmp, np.arange(5))
            raise RuntimeError("killed half-way")
    assert np.load(target).tolist() == [0, 1, 2]  # the old file stands
    assert os.listdir(target.parent) == ["arr.npy"]  # and no temporary is left


def test_write_atomic_text_and_mode(tmp_path):
    target = tmp_path / "note"
    write_atomic(target, "first\n")
    write_atomic(target, "second\n", mode=0o600)
    assert target.read_text() == "second\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["note"]


def test_a_half_written_metrics_row_is_cut_reading_only_the_tail(tmp_path):
    """A run killed mid-row leaves half a line in metrics.jsonl: the resumed run cuts it (and nothing else), however
    long the file or the half line (the cut reads back from the end in blocks)."""
    from megatrain.training.metrics import _drop_partial_line

    path = tmp_path / "metrics.jsonl"
    rows = "".join(f'{{"step": {i}, "loss": 1.0}}\n' for i in range(5000))
    for tail in ('{"step": 5000, "lo', '{"x": "' + "y" * 200_000):  # a short and a block-spanning half line
        path.write_text(rows + tail)
        _drop_partial_line(str(path))
        assert path.read_text() == rows
    _drop_partial_line(str(path))  # whole lines: unchanged
    assert path.read_text() == rows
    path.write_text('{"step": 1, "lo')  # only half a line
    _drop_partial_line(str(path))
    assert path.read_text() == ""


def test_check_output_path_refuses_what_cannot_be_written_or_is_an_input(tmp_path, monkeypatch):
    """One line naming the flag and the path, before any work: an empty path, a file output that is a folder (or
    ends in '/'), a folder output that is a file, a parent that is a file or cannot be written in; and an output that
    is an input (by inode: `./x` and a link are the same file), an existing file inside an input folder, or a folder
    output (replaced whole) that holds an input. What may be written passes and leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to("in.jsonl")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "task.yaml").write_text("task: x\n")
    inputs = [("--input", "in.jsonl"), ("--include-path", str(tmp_path / "folder"))]

    def refused(path, must, kind="file"):
        with pytest.raises(BadFileError) as e:
            check_output_path(path, "--output", kind, inputs, example="out.jsonl")
        assert str(e.value).startswith(f"--output {path or repr(path)}") and must in str(e.value), str(e.value)

    refused("", "empty; name the file to write, e.g. --output out.jsonl")
    refused("", "empty; name the folder to write", kind="folder")
    refused("folder", "is a folder; name a file to write, e.g. --output folder/out.jsonl")
    refused("new/", "is a folder")
    refused("in.jsonl/x.jsonl", "in.jsonl is a file, not a folder")
    refused("in.jsonl", "is a file, not a folder", kind="folder")
    if os.path.isdir("/proc/self"):  # Linux: nothing can be made in /proc, even by root (who passes os.access)
        refused("/proc/x.jsonl", "cannot write in /proc")
    for same in ("in.jsonl", "./in.jsonl", str(tmp_path / "in.jsonl"), "link.jsonl"):
        refused(same, "the same file as --input in.jsonl")
    refused("folder/task.yaml", f"an existing file inside --include-path {tmp_path / 'folder'}")
    refused(".", "holds --input in.jsonl", kind="folder")
    refused("folder", f"the same folder as --include-path {tmp_path / 'folder'}", kind="folder")
    before = sorted(os.listdir(tmp_path))
    for path, kind in (("out.jsonl", "file"), ("deep/er/out.jsonl", "file"), ("folder/new.json", "file"),
                       ("tok", "folder"), ("runs/new", "folder")):
        check_output_path(path, "--output", kind, inputs)
    assert sorted(os.listdir(tmp_path)) == before  # the write test leaves nothing
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        refused("ro/x.jsonl", f"cannot write in {tmp_path / 'ro'}")
