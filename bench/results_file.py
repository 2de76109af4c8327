"""How every benchmark writes its results file: the figures, and under "meta" the run that measured them.

    from results_file import run_meta, write_results
    write_results("bench/results/bench_x.json", {"rows": [...]})          # meta first, then the figures

meta holds:
    command   the command as run (`python` + sys.argv, after the environment variables named in `env` that were set)
    commit    `git rev-parse HEAD` of this checkout; dirty: true when tracked files outside bench/results/ differ from it
    date      when the results were written, UTC, ISO 8601
    machine   CPU model (/proc/cpuinfo), cores, memory, Python, torch and DeepSpeed versions, the GPU's name (null
              without CUDA)
bench/report.py prints these above each benchmark's tables in docs/benchmarks.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatrain.fileio import write_atomic  # noqa: E402
from megatrain.hostinfo import cpu_model  # noqa: E402


def _git(*args: str) -> str | None:
    try:
        run = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except OSError:
        pass
    return None


def machine() -> dict:
    """What the figures were measured on."""
    from importlib import metadata

    import torch

    try:
        deepspeed = metadata.version("deepspeed")  # without importing it (seconds, and it may pick an accelerator)
    except metadata.PackageNotFoundError:
        deepspeed = None
    return dict(cpu=cpu_model(), cores=os.cpu_count(), memory_gib=_memory_gib(), python=platform.python_version(),
                torch=torch.__version__, deepspeed=deepspeed,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def run_meta(env: tuple[str, ...] = ()) -> dict:
    """The command, commit, date and machine of this run. `env`: environment variables that change what the bench
    measures (e.g. BENCH_ONLY); those set are written before the command, as one would type them."""
    prefix = [f"{k}={os.environ[k]}" for k in env if os.environ.get(k)]
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return dict(command=" ".join(prefix + [shlex.join(["python", *sys.argv])]), commit=commit,
                dirty=bool(changes) if changes is not None else None,
                date=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
                machine=machine())


def write_results(path: str, results: dict, meta: dict | None = None, indent: int = 2) -> None:
    """Write `results` to `path` (atomically) with "meta" first: `meta`, or this run's."""
    body = {k: v for k, v in results.items() if k != "meta"}
    write_atomic(path, json.dumps({"meta": meta or run_meta(), **body}, indent=indent))
