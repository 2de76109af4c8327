"""Fuzzing the parsers of files and strings a user hands over (hypothesis): each may refuse its input only with its
own one-line error type, never crash otherwise, hang or allocate without bound.

    .idx reader           mutated valid headers, sizes and pointers, truncations   -> IndexedDatasetError
    config loader         random `--set` strings and random YAML files              -> ConfigError
    tokenizer specs       random spec strings                                       -> TokenizerError
    hostfiles, node lists random files and Slurm node lists                         -> HostfileError
    jsonl / text readers  random bytes as .jsonl, .txt and .jsonl.gz                -> InputError

The default tier runs FUZZ_EXAMPLES examples per target; `pytest -m fuzz` runs 10^5 per target (README figures).
"""
import gzip
import os
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatrain.config import ConfigError, load_config, parse_set
from megatrain.data import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, InputError, TokenizerError
from megatrain.data.readers import iter_texts
from megatrain.data.tokenizer import build_tokenizer
from megatrain.launch.hostfile import HostfileError, expand_nodelist, parse_hostfile

CI_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
LONG_EXAMPLES = 100_000
TMP = tempfile.mkdtemp(prefix="megatrain-fuzz-")


def _valid_index() -> tuple[bytes, bytes]:
    prefix = os.path.join(TMP, "valid")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for n in (3, 1, 7, 2):
            w.add_document(np.arange(n, dtype=np.uint16))
    return open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()


IDX, BIN = _valid_index()


def _open_and_read(idx: bytes, binary: bytes) -> None:
    prefix = os.path.join(TMP, "case")
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)
    with open(prefix + ".bin", "wb") as f:
        f.write(binary)
    try:
        ds = IndexedDataset(prefix)
        for i in range(len(ds)):
            ds[i]
    except IndexedDatasetError:
        pass


mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, len(IDX) - 1), st.integers(0, 255)),
    st.tuples(st.just("u64"), st.sampled_from([9, 18, 26]), st.integers(0, 2**64 - 1)),  # version, n_seq, n_doc_idx
    st.tuples(st.just("truncate"), st.integers(0, len(IDX)), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 64), st.integers(0, 255)),
)


def _mutate(idx: bytes, ops) -> bytes:
    b = bytearray(idx)
    for kind, a, v in ops:
        if kind == "byte" and a < len(b):
            b[a] = v
        elif kind == "u64" and a + 8 <= len(b):
            b[a: a + 8] = struct.pack("<Q", v)
        elif kind == "truncate":
            del b[a:]
        elif kind == "append":
            b += bytes([v]) * a
    return bytes(b)


def _write_text(name: str, text: str) -> str:
    """Generated text as a file in TMP (lone surrogates kept as they are); its path."""
    path = os.path.join(TMP, name)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    return path


def _idx_reader(examples):
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(mutation, min_size=1, max_size=4), st.integers(-8, 8))
    def run(ops, bin_delta):
        binary = BIN[: len(BIN) + bin_delta] if bin_delta < 0 else BIN + bytes(bin_delta)
        _open_and_read(_mutate(IDX, ops), binary)

    run()


def _config(examples):
    keys = st.sampled_from(["train.lr", "train.max_steps", "model.n_heads", "data.split", "parallel.tp",
                            "model.dropout", "checkpoint.keep_last", "logging.wandb", "nope.key", "train"])
    values = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                       st.floats(allow_nan=True).map(str), st.sampled_from(["[", "{a: 1}", "null", "true", "- x"]))
    sets = st.one_of(st.text(max_size=30), st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"))

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(sets, max_size=3), st.text(max_size=120))
    def run(set_strings, yaml_text):
        try:
            for s in set_strings:
                parse_set(s)
            load_config("tiny", set_strings)
        except ConfigError:
            pass
        try:
            load_config(_write_text("c.yaml", yaml_text))
        except (ConfigError, UnicodeError):
            pass

    run()


def _tokenizer_spec(examples):
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.one_of(st.text(max_size=40), st.sampled_from(["sp:", "hf:", "sentencepiece:/nope", "byte ", "hf:/tmp",
                                                            "sp:/dev/null", TMP])))
    def run(spec):
        try:
            build_tokenizer(spec)
        except TokenizerError:
            pass

    run()


def _hosts(examples):
    bracket = st.builds(lambda a, b, c: f"n[{a}-{b}]{c}", st.integers(0, 10**7), st.integers(0, 10**7),
                        st.sampled_from(["", ",x", "[0-99]", "[1,2]"]))

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.one_of(st.text(max_size=40), bracket), st.text(max_size=200))
    def run(nodelist, hostfile):
        try:
            assert len(expand_nodelist(nodelist)) <= 100_000
        except HostfileError:
            pass
        try:
            parse_hostfile(_write_text("hosts", hostfile))
        except HostfileError:
            pass

    run()


def _readers(examples):
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.binary(max_size=300), st.sampled_from([".jsonl", ".txt", ".jsonl.gz"]), st.booleans())
    def run(data, suffix, compress):
        path = os.path.join(TMP, "in" + suffix)
        with open(path, "wb") as f:
            f.write(gzip.compress(data) if suffix.endswith(".gz") and compress else data)
        try:
            for _ in iter_texts([path]):
                pass
        except InputError:
            pass

    run()


TARGETS = {"idx reader": _idx_reader, "config loader": _config, "tokenizer spec": _tokenizer_spec,
           "hostfile and node list": _hosts, "jsonl/text readers": _readers}


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_ci_sized(target):
    TARGETS[target](CI_EXAMPLES)


@pytest.mark.fuzz
@pytest.mark.timeout(7200)  # 10^5 examples take longer than the suite's 600 s per test (which cut every target short)
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_long(target):
    TARGETS[target](LONG_EXAMPLES)
