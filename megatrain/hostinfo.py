"""This machine as a process sees it: the CPU cores it may run on and the CPU's name (no torch, no megatrain)."""
from __future__ import annotations

import os
import platform


def cpu_cores() -> int:
    """The cores this process may run on (a Slurm or taskset cpuset, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo's model name), or what platform knows of it elsewhere."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
