"""Tier 1: files written beside their target and renamed over it, never seen half-written."""
import os
import stat

import numpy as np
import pytest

from megatrain.fileio import atomic_path, write_atomic


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
