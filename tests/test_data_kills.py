"""kill -9 on the data path (README "Failures and recovery"): `megatrain preprocess` and the sample-index build
killed mid-way leave nothing that a later run mistakes for complete, and the rerun gives the uninterrupted output.

Kills at random moments (seeded; the seed is in the test id) and at the one moment between two renames that a random
kill would rarely hit, injected through MEGATRAIN_FAULTS (megatrain/faults.py).
"""
import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_documents, write_jsonl
from megatrain.data.indexed import dataset_exists

SEED = 20261129


def preprocess_cmd(src, prefix) -> list[str]:
    return [sys.executable, "-m", "megatrain.cli", "preprocess", "--input", str(src), "--tokenizer", "byte",
            "--output-prefix", str(prefix), "--append-eod", "--no-progress"]


def leftovers(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if ".tmp" in f)


def same_dataset(a, b) -> bool:
    return all(filecmp.cmp(f"{a}{ext}", f"{b}{ext}", shallow=False) for ext in (".bin", ".idx"))


@pytest.mark.slow
def test_preprocess_killed_anywhere_leaves_no_dataset_that_looks_complete(tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl", make_documents(30000, seed=3, max_words=200))
    ref = tmp_path / "ref" / "data"
    t0 = time.perf_counter()
    subprocess.run(preprocess_cmd(src, ref), check=True, capture_output=True, timeout=300)
    took = time.perf_counter() - t0
    out = tmp_path / "out" / "data"
    rng = random.Random(SEED)
    finished = 0
    for _ in range(4):  # SIGKILL at a random moment of a run (start-up included)
        p = subprocess.Popen(preprocess_cmd(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.95) * took)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        if dataset_exists(out):  # renamed into place before the kill (or it finished): then it is the whole dataset
            assert same_dataset(out, ref), f"seed {SEED}: a killed preprocess left an incomplete .bin/.idx pair"
            for ext in (".bin", ".idx", ".meta.json"):
                os.remove(f"{out}{ext}")
            finished += 1
    assert finished < 4, "every run finished before its kill: nothing was tested"
    subprocess.run(preprocess_cmd(src, out), check=True, capture_output=True, timeout=300)
    assert same_dataset(out, ref)
    assert leftovers(out.parent) == []  # the killed runs' half-written files are cleared by the rerun


def test_preprocess_killed_between_its_renames_over_an_older_dataset(tmp_path):
    """The riskiest moment: the new .bin is in place and the new .idx is not. The older dataset's .idx is removed
    before, so the prefix never pairs a new .bin with an old .idx: a later run refuses it in one line."""
    old = write_jsonl(tmp_path / "old.jsonl", make_documents(300, seed=1))
    new = write_jsonl(tmp_path / "new.jsonl", make_documents(300, seed=2))
    prefix = tmp_path / "data" / "corpus"
    subprocess.run(preprocess_cmd(old, prefix), check=True, capture_output=True, timeout=300)
    r = subprocess.run(preprocess_cmd(new, prefix), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MEGATRAIN_FAULTS="kill_before_index"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not dataset_exists(prefix)
    info = subprocess.run([sys.executable, "-m", "megatrain.cli", "data-info", str(prefix)], capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in info.stderr.splitlines() if line.startswith("megatrain data-info: error:")]
    assert info.returncode == 1 and len(errors) == 1, info.stderr[-2000:]
    subprocess.run(preprocess_cmd(new, prefix), check=True, capture_output=True, timeout=300)
    ref = tmp_path / "ref" / "corpus"
    subprocess.run(preprocess_cmd(new, ref), check=True, capture_output=True, timeout=300)
    assert same_dataset(prefix, ref) and leftovers(prefix.parent) == []


BUILD = """
import sys
from megatrain.data import build_gpt_datasets
train, valid, _ = build_gpt_datasets(sys.argv[1], "90,10,0", 32, [500, 50, 0], 1234, sys.argv[2])
print(" ".join(str(int(train[i][:8].sum())) for i in range(0, 500, 37)))
"""


def test_a_sample_index_build_killed_before_its_marker_is_rebuilt(tmp_path):
    from megatrain.data.preprocess import preprocess

    prefix = str(tmp_path / "data" / "c")
    os.makedirs(tmp_path / "data")
    preprocess([write_jsonl(tmp_path / "c.jsonl", make_documents(400, seed=5, max_words=80))], "byte", prefix,
               append_eod=True)

    def build(cache, faults=None):
        env = dict(os.environ, MEGATRAIN_FAULTS=faults) if faults else None
        return subprocess.run([sys.executable, "-c", BUILD, prefix, str(cache)], capture_output=True, text=True,
                              timeout=300, env=env)

    killed = build(tmp_path / "cache", "kill_before_sample_meta")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cache_files = os.listdir(tmp_path / "cache")
    assert any(f.endswith(".npy") for f in cache_files) and not any(f.endswith(".json") for f in cache_files)
    again, fresh = build(tmp_path / "cache"), build(tmp_path / "fresh")
    assert again.returncode == 0 and again.stdout == fresh.stdout, again.stderr[-2000:]
    assert leftovers(tmp_path / "cache") == []
    for f in os.listdir(tmp_path / "cache"):
        if f.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "cache" / f), np.load(tmp_path / "fresh" / f))
        elif f.endswith(".json"):
            assert json.loads((tmp_path / "cache" / f).read_text()) == json.loads((tmp_path / "fresh" / f).read_text())
