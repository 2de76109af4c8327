"""Tier 3: two gloo ranks build the sample index once and read identical samples."""
import os

import numpy as np

from distributed import run_distributed


def _build_on_ranks(rank, world, prefix, out):
    from megatrain.data import GPTSampleDataset, IndexedDataset

    g = GPTSampleDataset(IndexedDataset(prefix), 8, 64, seed=11)
    np.save(f"{out}/rank{rank}.npy", np.stack([g[i] for i in range(64)]))
    with open(f"{out}/rank{rank}.built", "w") as f:
        f.write(str(int(g.built_now)))


def test_index_built_by_one_rank(tmp_path):
    from megatrain.data import IndexedDatasetWriter

    rng = np.random.RandomState(0)
    with IndexedDatasetWriter(str(tmp_path / "d")) as w:
        for _ in range(50):
            w.add_document(rng.randint(0, 1000, size=rng.randint(1, 40)))
    run_distributed(_build_on_ranks, 2, str(tmp_path / "d"), str(tmp_path), timeout=120)
    built = [open(tmp_path / f"rank{r}.built").read() for r in range(2)]
    assert built == ["1", "0"]  # rank 0 built, rank 1 waited and loaded
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))
    assert sum(f.endswith(".npy") and ".train." in f for f in os.listdir(tmp_path)) == 3
