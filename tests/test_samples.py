"""GPT samples: the right tokens across document boundaries and epochs, blends, cached indices."""
import json
import os

import numpy as np
import pytest

from megatrain.data import (BlendedDataset, GPTSampleDataset, IndexedDataset, IndexedDatasetWriter,
                            SampleIndexError, build_gpt_datasets, parse_data_path, split_ranges)


def make_dataset(path, n_docs=40, seed=0, base=0):
    """Documents whose tokens encode (doc id, position) so any sample can be checked exactly."""
    rng = np.random.RandomState(seed)
    docs = [base + i * 100 + np.arange(rng.randint(1, 60)) % 100 for i in range(n_docs)]
    with IndexedDatasetWriter(str(path), dtype=np.int32) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(str(path)), docs


def test_samples_equal_the_concatenated_shuffled_stream(tmp_path):
    ds, docs = make_dataset(tmp_path / "d")
    seq_len, n = 16, 50
    g = GPTSampleDataset(ds, seq_len, n, seed=3, split="1", cache_dir=str(tmp_path / "cache"))
    stream = np.concatenate([docs[d] for d in g.doc_order])
    for i in range(n):
        s = int(g.shuffle_idx[i])
        sample = g[i]
        assert sample.dtype == np.int64 and len(sample) == seq_len + 1
        np.testing.assert_array_equal(sample, stream[s * seq_len: s * seq_len + seq_len + 1])
        # documents_of names exactly the pieces the sample is made of
        pieces = np.concatenate([docs[d][lo:lo + k] for d, lo, k in g.documents_of(i)])
        np.testing.assert_array_equal(pieces, sample)
    assert any(len(g.documents_of(i)) > 1 for i in range(n))  # some samples cross a boundary
    assert len(set(g.shuffle_idx.tolist())) == n  # n distinct samples of the first epoch (which holds more)


def test_several_epochs_each_a_permutation(tmp_path):
    ds, docs = make_dataset(tmp_path / "d", n_docs=10)
    total = sum(len(d) for d in docs)
    seq_len = 8
    n = (3 * total) // seq_len  # needs about three passes over the data
    g = GPTSampleDataset(ds, seq_len, n, seed=1)
    assert g.epochs >= 3
    order = np.asarray(g.doc_order).reshape(g.epochs, 10)
    for epoch in order:
        assert sorted(epoch.tolist()) == list(range(10))
    assert not all(np.array_equal(order[0], e) for e in order[1:])  # reshuffled each epoch
    g[n - 1]  # the last sample is complete


def test_a_longer_run_keeps_the_served_order_and_serves_the_unseen_samples_next(tmp_path):
    """Raising train.max_steps asks for more samples: the served prefix stays as it was, and the positions after it
    serve the rest of the current epoch first. (Before, the whole order was reshuffled for the new count: measured
    24,000 -> 48,000 samples, the continued positions served 12,036 already-served samples.)"""
    ds, docs = make_dataset(tmp_path / "d", n_docs=30)
    seq_len = 8
    total = sum(len(d) for d in docs)
    per_epoch, two_epochs = (total - 1) // seq_len, (2 * total - 1) // seq_len  # samples in the first 1 and 2 epochs
    n = per_epoch * 3 // 2  # stops half-way through the second epoch
    short = GPTSampleDataset(ds, seq_len, n, seed=5, cache_dir=str(tmp_path / "c"))
    longer = GPTSampleDataset(ds, seq_len, 2 * n, seed=5, cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(longer.shuffle_idx[:n], short.shuffle_idx)
    for i in (0, n // 2, n - 1):
        np.testing.assert_array_equal(longer[i], short[i])
    second_epoch_served = set(short.shuffle_idx[per_epoch:n].tolist())
    rest_of_epoch = set(longer.shuffle_idx[n:two_epochs].tolist())
    assert not second_epoch_served & rest_of_epoch
    assert second_epoch_served | rest_of_epoch == set(range(per_epoch, two_epochs))


def test_random_offsets_cut_every_epoch_at_its_own_offset_and_extend_without_reordering(tmp_path):
    """data.sample_offsets=random: epoch e's windows are e*T + r_e + k*seq_len of the epoch's shuffled stream, inside
    the epoch, r_e drawn per epoch (one long document is cut differently every epoch); more samples add epochs and
    change nothing already served; the fixed layout is the same as before the option existed."""
    from megatrain.data.samples import epoch_offset

    ds, docs = make_dataset(tmp_path / "d", n_docs=12)
    total = sum(len(d) for d in docs)
    seq_len = 8
    n = (3 * total) // seq_len
    g = GPTSampleDataset(ds, seq_len, n, seed=2, cache_dir=str(tmp_path / "c"), offsets="random")
    stream = np.concatenate([docs[d] for d in g.doc_order])
    shifts = [epoch_offset(2, e, seq_len) for e in range(g.epochs)]
    assert len(set(shifts)) > 1
    starts = np.concatenate([e * total + r + seq_len * np.arange((total - 1 - r) // seq_len)
                             for e, r in enumerate(shifts)])
    for i in range(n):
        s = int(g.shuffle_idx[i])
        np.testing.assert_array_equal(g[i], stream[starts[s]: starts[s] + seq_len + 1])
        pieces = np.concatenate([docs[d][lo:lo + k] for d, lo, k in g.documents_of(i)])
        np.testing.assert_array_equal(pieces, g[i])
        assert starts[s] // total == (starts[s] + seq_len) // total  # the window stays inside its epoch
    longer = GPTSampleDataset(ds, seq_len, 2 * n, seed=2, cache_dir=str(tmp_path / "c"), offsets="random")
    np.testing.assert_array_equal(longer.shuffle_idx[:n], g.shuffle_idx)
    np.testing.assert_array_equal(np.stack([longer[i] for i in range(n)]), np.stack([g[i] for i in range(n)]))
    fixed = GPTSampleDataset(ds, seq_len, n, seed=2, cache_dir=str(tmp_path / "c"))
    assert fixed.cache_prefix != g.cache_prefix and "offsets" not in json.load(open(fixed.cache_prefix + ".json"))
    with pytest.raises(SampleIndexError, match="needs at least 2 x data.seq_len"):
        GPTSampleDataset(ds, total, 2, seed=2, cache_dir=str(tmp_path / "c"), offsets="random")
    train, valid, _ = build_gpt_datasets(str(tmp_path / "d"), "80,20,0", seq_len, [20, 5, 0], seed=2,
                                         cache_dir=str(tmp_path / "c"), sample_offsets="random")
    assert json.load(open(train.cache_prefix + ".json"))["offsets"] == "random"
    assert "offsets" not in json.load(open(valid.cache_prefix + ".json"))  # the validation windows stay fixed


def test_splits_are_disjoint_document_ranges(tmp_path):
    assert split_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, "1") == [(0, 10), (10, 10), (10, 10)]
    ds, _ = make_dataset(tmp_path / "d", n_docs=100)
    train, valid, test = build_gpt_datasets(str(tmp_path / "d"), "80,15,5", 8, [50, 10, 5], seed=0)
    used = [{doc for i in range(len(x)) for doc, _, _ in x.documents_of(i)} for x in (train, valid, test)]
    assert used[0] <= set(range(80)) and used[1] <= set(range(80, 95)) and used[2] <= set(range(95, 100))
    with pytest.raises(SampleIndexError, match="give up to three"):
        split_ranges(10, "1,2,3,4")
    none_test = build_gpt_datasets(str(tmp_path / "d"), "90,10,0", 8, [5, 5, 5])
    assert none_test[2] is None


def test_cache_is_reused_and_keyed(tmp_path):
    ds, _ = make_dataset(tmp_path / "d")
    a = GPTSampleDataset(ds, 16, 30, seed=5)
    assert a.built_now
    b = GPTSampleDataset(ds, 16, 30, seed=5)
    assert not b.built_now and b.cache_prefix == a.cache_prefix
    assert not b.sample_idx.flags.owndata and not b.sample_idx.flags.writeable  # mapped from the cache file
    np.testing.assert_array_equal(np.stack([a[i] for i in range(30)]), np.stack([b[i] for i in range(30)]))
    c = GPTSampleDataset(ds, 16, 30, seed=6)
    assert c.built_now and c.cache_prefix != a.cache_prefix
    files = os.listdir(tmp_path)
    assert sum(f.endswith(".json") and ".train." in f for f in files) == 2


def test_blending_proportions(tmp_path):
    dsets = [make_dataset(tmp_path / f"d{j}", n_docs=30, seed=j, base=10000 * j)[0] for j in range(3)]
    weights = [0.2, 0.5, 0.3]
    comps = [GPTSampleDataset(d, 8, k, seed=j) for j, (d, k) in
             enumerate(zip(dsets, BlendedDataset.samples_per_dataset(weights, 2000)))]
    blend = BlendedDataset(comps, weights, 2000)
    for prefix_len in (100, 1000, 2000):
        share = np.bincount(blend.dataset_index[:prefix_len], minlength=3) / prefix_len
        assert np.all(np.abs(share - weights) < 0.01), share
    # the sample really comes from the dataset the index names
    for i in range(0, 2000, 97):
        d, _ = blend.documents_of(i)
        assert int(blend[i][0]) // 10000 == d
    # same through the config-level builder, with a weighted data.path
    train, _, _ = build_gpt_datasets(["2", str(tmp_path / "d0"), "8", str(tmp_path / "d1")], "1", 8, [1000, 0, 0])
    share = np.bincount(train.dataset_index, minlength=2) / 1000
    assert abs(share[0] - 0.2) < 0.01


def test_data_path_forms():
    assert parse_data_path("p") == [(1.0, "p")]
    assert parse_data_path("0.3 a 0.7 b") == [(0.3, "a"), (0.7, "b")]
    assert parse_data_path([{"path": "a", "weight": 2}]) == [(2.0, "a")]
    for bad, msg in [([], "empty"), (["1", "a", "2"], "odd length"), (["x", "a"], "not a weight")]:
        with pytest.raises(SampleIndexError, match=msg):
            parse_data_path(bad)


def test_too_small_split(tmp_path):
    ds, _ = make_dataset(tmp_path / "d", n_docs=3)
    with pytest.raises(SampleIndexError, match="holds no documents"):
        GPTSampleDataset(ds, 8, 10, split="99,1", split_name="valid")
