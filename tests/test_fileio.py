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
