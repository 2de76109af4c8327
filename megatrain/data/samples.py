"""Fixed-length GPT training samples over indexed datasets, with splits, epochs and blending.

A sample is `seq_len + 1` consecutive tokens of a stream made by concatenating the documents of one
split, each epoch in its own shuffled order; samples run across document boundaries and consecutive
samples overlap by one token (the last input's target). Three indices define the stream:

    doc_order    int64[epochs * n_docs]   document ids in stream order (each epoch shuffled)
    sample_idx   int64[S + 1, 2]          (position in doc_order, token offset) where sample i starts, for the
                                          S samples of the whole epochs the stream needs
    shuffle_idx  int64[n_samples]         the order samples are served in: epoch by epoch, each shuffled

With offsets="random" (data.sample_offsets, for the training split) epoch e's windows start at e * tokens_per_epoch + r_e
+ k * seq_len, r_e in [0, seq_len) drawn from a seed of that epoch, and stay inside it: one long document is cut
differently every epoch. A sample is read from its start, seq_len + 1 tokens on (sample_idx's last row is a sentinel).

All three are built with vectorised numpy (no Python loop per sample or document), saved next to the
data under a hash of everything that shapes them, built by one rank while the others wait, and
memory-mapped on load. `GPTSampleDataset[i]` depends only on i, so a resumed run continues from the
number of samples consumed, on any number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megatrain import faults
from megatrain.data.indexed import IndexedDataset
from megatrain.fileio import atomic_path, remove_stale_temporaries, write_atomic

INDEX_VERSION = 2  # bump when the index construction changes, to invalidate old caches


class SampleIndexError(ValueError):
    pass


def parse_split(split: str | Sequence[float]) -> list[float]:
    """'969,30,1' (or [969, 30, 1]) -> train/valid/test fractions that sum to 1."""
    try:
        parts = [float(x) for x in (split.replace("/", ",").split(",") if isinstance(split, str) else split)]
    except (TypeError, ValueError):
        parts = []
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise SampleIndexError(f"data.split {split!r}: give up to three non-negative weights, e.g. '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_ranges(n_docs: int, split: str | Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) document ranges for train/valid/test."""
    fracs = parse_split(split)
    bounds = np.round(np.cumsum([0.0] + fracs) * n_docs).astype(np.int64)
    bounds[-1] = n_docs
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


@dataclass
class SampleIndex:
    doc_order: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray
    epochs: int


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Where epoch `epoch`'s windows start (data.sample_offsets=random): its own seed, so more epochs change none."""
    return int(np.random.RandomState((seed * 7919 + 104729 * (epoch + 1)) % 2**32).randint(seq_len))


def build_sample_index(doc_sizes: np.ndarray, docs: np.ndarray, seq_len: int, num_samples: int, seed: int,
                       offsets: str = "fixed") -> SampleIndex:
    """Build the three indices for `num_samples` samples over `docs` (ids into `doc_sizes`)."""
    docs = np.asarray(docs, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(doc_sizes, np.int64)[docs].sum()) if len(docs) else 0
    if tokens_per_epoch <= 1:
        raise SampleIndexError(f"the split holds {tokens_per_epoch} tokens: too few to make any sample")
    if offsets == "random":
        if tokens_per_epoch < 2 * seq_len:
            raise SampleIndexError(f"the split holds {tokens_per_epoch} tokens: data.sample_offsets=random needs at "
                                   f"least 2 x data.seq_len ({2 * seq_len}); use data.sample_offsets=fixed")
        # epoch e holds (T - 1 - r_e) // seq_len windows of seq_len + 1 tokens, starting at e*T + r_e
        shifts, per_epoch = [], []
        while sum(per_epoch) < num_samples:
            shifts.append(epoch_offset(seed, len(shifts), seq_len))
            per_epoch.append((tokens_per_epoch - 1 - shifts[-1]) // seq_len)
        epochs = len(shifts)
        bounds = np.concatenate([[0], np.cumsum(per_epoch)]).tolist()
        starts = np.concatenate([e * tokens_per_epoch + r + seq_len * np.arange(k + (e == epochs - 1), dtype=np.int64)
                                 for e, (r, k) in enumerate(zip(shifts, per_epoch))])  # + the sentinel
    else:
        epochs = max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))
        # Every sample the whole epochs hold: S(e) = (e * tokens_per_epoch - 1) // seq_len start in the first e epochs.
        bounds = [(e * tokens_per_epoch - 1) // seq_len if e else 0 for e in range(epochs + 1)]
        starts = np.arange(bounds[-1] + 1, dtype=np.int64) * seq_len
    rng = np.random.RandomState(seed % 2**32)
    doc_order = np.concatenate([rng.permutation(docs) for _ in range(epochs)])
    # End of each document in the stream, then the start of every sample located by binary search.
    ends = np.cumsum(np.asarray(doc_sizes, np.int64)[doc_order])
    where = np.searchsorted(ends, starts, side="right")
    offset = starts - np.concatenate([[0], ends])[where]
    sample_idx = np.stack([where, offset], axis=1).astype(np.int64)
    # Served order: each epoch's samples shuffled among themselves, by a seed of that epoch, epoch after epoch. Asking
    # for more samples (a run extended by raising train.max_steps) appends to this order and never reorders what was
    # served: the continued run serves the rest of the current epoch, then the next.
    shuffle_idx = np.concatenate([lo + np.random.RandomState((seed + 1 + e) % 2**32).permutation(hi - lo)
                                  for e, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])[:num_samples]
    return SampleIndex(doc_order, sample_idx, shuffle_idx.astype(np.int64), epochs)


class GPTSampleDataset:
    """`num_samples` samples of `seq_len + 1` tokens from one split of one indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        seq_len: int,
        num_samples: int,
        seed: int = 1234,
        split: str = "1",
        split_name: str = "train",
        cache_dir: str | None = None,
        offsets: str = "fixed",
    ):
        if seq_len < 1 or num_samples < 1:
            raise SampleIndexError(f"seq_len and num_samples must be positive (got {seq_len}, {num_samples})")
        self.indexed, self.seq_len, self.num_samples, self.seed = indexed, seq_len, num_samples, seed
        split_i = ("train", "valid", "test").index(split_name)
        self.doc_range = split_ranges(len(indexed), split)[split_i]
        start, stop = self.doc_range
        if stop <= start:
            raise SampleIndexError(f"{indexed.prefix}: the {split_name} split of {split!r} holds no documents")
        key = dict(version=INDEX_VERSION, prefix=os.path.abspath(indexed.prefix), n_seq=len(indexed),
                   n_tokens=indexed.num_tokens, docs=[start, stop], seq_len=seq_len, num_samples=num_samples, seed=seed)
        if offsets != "fixed":  # (fixed keeps the key, so the indices cached before this option stay valid)
            key["offsets"] = offsets
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        base = cache_dir or os.path.dirname(os.path.abspath(indexed.prefix))
        self.cache_prefix = os.path.join(base, f"{os.path.basename(indexed.prefix)}.{split_name}.{digest}")
        index, self.built_now = _load_or_build(self.cache_prefix, key, lambda: build_sample_index(
            indexed.sizes, np.arange(start, stop), seq_len, num_samples, seed, offsets))
        self.doc_order, self.sample_idx, self.shuffle_idx = index.doc_order, index.sample_idx, index.shuffle_idx
        self.epochs = index.epochs
        # Every token of the dataset as one flat array, and where each sequence starts in it.
        self._tokens = np.frombuffer(indexed._bin, indexed.dtype) if len(indexed._bin) else np.zeros(0, indexed.dtype)
        self._start = indexed.offsets

    def __len__(self) -> int:
        return self.num_samples

    def _span(self, i: int) -> tuple[int, int, int, int]:
        """(position in doc_order, offset) of sample i's first token and of its last: seq_len + 1 tokens on."""
        d0, o0 = self.sample_idx[int(self.shuffle_idx[i])].tolist()
        d, left = d0, o0 + self.seq_len + 1  # tokens from the start of stream document d to the sample's end
        while left > (size := int(self.indexed.sizes[self.doc_order[d]])):
            left -= size
            d += 1
        return d0, o0, d, left - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i: `seq_len + 1` token ids (a fresh int64 array)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        d, o = self.sample_idx[int(self.shuffle_idx[i])].tolist()
        # Hot path: one int64 output filled piece by piece straight from the mapped tokens.
        tokens, start, n = self._tokens, self._start, self.seq_len + 1
        doc = int(self.doc_order[d])
        a = int(start[doc]) + o
        if int(start[doc + 1]) - a >= n:
            return tokens[a: a + n].astype(np.int64)
        out = np.empty(n, np.int64)
        filled = 0
        while True:
            take = min(n - filled, int(start[doc + 1]) - a)
            out[filled: filled + take] = tokens[a: a + take]
            filled += take
            if filled == n:
                return out
            d += 1
            doc = int(self.doc_order[d])
            a = int(start[doc])

    def documents_of(self, i: int) -> list[tuple[int, int, int]]:
        """Where sample i came from: (document id, first token offset, token count) per piece."""
        d0, o0, d1, o1 = self._span(i)
        out = []
        for d in range(d0, d1 + 1):
            doc = int(self.doc_order[d])
            lo = o0 if d == d0 else 0
            hi = o1 + 1 if d == d1 else int(self.indexed.sizes[doc])
            out.append((doc, lo, hi - lo))
        return out


def _load_or_build(cache_prefix: str, key: dict, build) -> tuple[SampleIndex, bool]:
    """Local rank 0 of each node builds and saves (atomically: safe on a shared or a node-local file
    system); every rank waits at a barrier, then memory-maps the saved arrays."""
    torch = sys.modules.get("torch")  # not initialised if torch was never imported: don't import it
    dist = torch.distributed if torch is not None else None
    names = ("doc_order", "sample_idx", "shuffle_idx")
    paths = {n: f"{cache_prefix}.{n}.npy" for n in names}
    meta_path = f"{cache_prefix}.json"
    distributed = dist is not None and dist.is_available() and dist.is_initialized()
    built = False
    if not distributed or int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        if not os.path.isfile(meta_path):  # the .json is written last: its presence means complete
            index = build()
            for n in names:
                remove_stale_temporaries(paths[n])  # a killed build's half-written arrays
                with atomic_path(paths[n], suffix=".npy") as tmp:
                    np.save(tmp, getattr(index, n))
            faults.kill_here("kill_before_sample_meta")
            write_atomic(meta_path, json.dumps(dict(key, epochs=index.epochs), indent=1))
            built = True
    if distributed:
        dist.barrier()
    with open(meta_path) as f:
        epochs = json.load(f)["epochs"]
    # Plain ndarray views of the mapped files: np.memmap's Python-level __getitem__ is ~10x slower.
    arrays = {n: np.load(paths[n], mmap_mode="r").view(np.ndarray) for n in names}
    return SampleIndex(arrays["doc_order"], arrays["sample_idx"], arrays["shuffle_idx"], epochs), built


class BlendedDataset:
    """Serves samples from several datasets in proportion to `weights`, deterministically.

    Dataset d's k-th sample is due at time (k + 0.5) / w_d; sorting all due times interleaves the
    datasets so that every prefix of the blend is within one sample per dataset of its target share.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(datasets) != len(w) or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
            raise SampleIndexError(f"blending needs one non-negative weight per dataset, got {list(weights)}")
        w = w / w.sum()
        self.datasets, self.weights, self.num_samples = list(datasets), w, num_samples
        counts = np.asarray(self.samples_per_dataset(w, num_samples), dtype=np.int64)
        ds_ids = np.repeat(np.arange(len(w)), counts)
        ks = np.concatenate([np.arange(c) for c in counts])
        with np.errstate(divide="ignore"):
            due = (ks + 0.5) / w[ds_ids]
        order = np.argsort(due, kind="stable")[:num_samples]
        self.dataset_index = ds_ids[order].astype(np.int16)
        self.dataset_sample_index = ks[order].astype(np.int64)
        for d, ds in enumerate(self.datasets):
            need = int((self.dataset_index == d).sum())
            if need > len(ds):
                raise SampleIndexError(f"dataset {d} serves {len(ds)} samples but the blend needs {need}")

    @staticmethod
    def samples_per_dataset(weights: Sequence[float], num_samples: int) -> list[int]:
        """How many samples each component must provide for a blend of `num_samples`."""
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        return [int(c) + 1 for c in np.ceil(w * num_samples).astype(np.int64)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]

    def documents_of(self, i: int) -> tuple[int, list[tuple[int, int, int]]]:
        """(component dataset, its documents_of) for sample i."""
        d = int(self.dataset_index[i])
        return d, self.datasets[d].documents_of(int(self.dataset_sample_index[i]))


def parse_data_path(path: str | Sequence) -> list[tuple[float, str]]:
    """'P' | ['P'] | [w1, P1, w2, P2, ...] | [{'path': P, 'weight': w}, ...] -> [(weight, prefix)]."""
    if isinstance(path, str):
        items: list = path.split()
    else:
        items = list(path)
    if not items:
        raise SampleIndexError("data.path is empty: give a dataset prefix (P for P.bin/P.idx) or a weighted list")
    if all(isinstance(x, dict) for x in items):
        return [(float(x.get("weight", 1.0)), str(x["path"])) for x in items]
    if len(items) == 1:
        return [(1.0, str(items[0]))]
    if len(items) % 2:
        raise SampleIndexError(f"data.path {items}: a blend is weight, prefix, weight, prefix, ... (odd length)")
    out = []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            out.append((float(w), str(p)))
        except (TypeError, ValueError):
            raise SampleIndexError(f"data.path: {w!r} is not a weight; a blend is weight, prefix, weight, prefix, ...") from None
    if any(not w >= 0 for w, _ in out) or sum(w for w, _ in out) <= 0:
        raise SampleIndexError(f"data.path: blend weights {[w for w, _ in out]} must be non-negative and not all zero")
    return out


def build_gpt_datasets(
    data_path: str | Sequence,
    split: str,
    seq_len: int,
    num_samples: Sequence[int],
    seed: int = 1234,
    cache_dir: str | None = None,
    sample_offsets: str = "fixed",
) -> list:
    """Train/valid/test datasets (None where a split is empty or asks for 0 samples), blended when
    `data_path` names several weighted prefixes. Components are over-provisioned by 0.5%, as Megatron
    does, so rounding never starves the blend. `sample_offsets` (data.sample_offsets) applies to the training split: the
validation and test windows stay fixed, so their losses compare across settings."""
    blend = parse_data_path(data_path)
    indexed = [IndexedDataset(p) for _, p in blend]
    out = []
    for split_i, name in enumerate(("train", "valid", "test")):
        n = int(num_samples[split_i])
        fracs = parse_split(split)
        if n <= 0 or fracs[split_i] == 0:
            out.append(None)
            continue
        offsets = sample_offsets if name == "train" else "fixed"
        if len(blend) == 1:
            out.append(GPTSampleDataset(indexed[0], seq_len, n, seed, split, name, cache_dir, offsets))
            continue
        weights = [w for w, _ in blend]
        per = BlendedDataset.samples_per_dataset(weights, n)
        comps = [GPTSampleDataset(ix, seq_len, int(np.ceil(k * 1.005)), seed + j, split, name, cache_dir, offsets)
                 for j, (ix, k) in enumerate(zip(indexed, per))]
        out.append(BlendedDataset(comps, weights, n))
    return out
