"""tinyshakespeare as a byte-level pretraining dataset, for the benchmarks that train on it (bench_ckpt, bench_long,
bench_moe)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def prepare_data(text_file: str, work: str, env: dict | None = None) -> str:
    """tinyshakespeare as two documents (90% / 10%), byte tokenizer: the prefix of the preprocessed files in `work`
    (made once; `env`: the preprocess process's environment)."""
    src, prefix = os.path.join(work, "shakespeare.jsonl"), os.path.join(work, "shakespeare")
    if os.path.isfile(prefix + ".idx"):
        return prefix
    text = open(text_file, encoding="utf-8").read()
    cut = int(len(text) * 0.9)
    with open(src, "w") as g:
        g.write(json.dumps({"text": text[:cut]}) + "\n" + json.dumps({"text": text[cut:]}) + "\n")
    subprocess.run([sys.executable, "-m", "megatrain", "preprocess", "--input", src, "--tokenizer", "byte",
                    "--output-prefix", prefix], check=True, capture_output=True, env=env)
    return prefix
