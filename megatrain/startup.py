"""Where a run's start-up goes, from the package's import to the first step: each entrypoint marks the end of a
phase, and the start-up lines end with the split, e.g.

    start-up 4.1 s: imports 2.0 | distributed 0.4 | data 0.3 | model 0.1 | engine 1.0 | MFU peak 0.3
"""
from __future__ import annotations

import time

import megatrain

_marks: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """`phase` ended now (it began where the previous mark, or the import of megatrain, ended)."""
    _marks.append((phase, time.perf_counter()))


def line() -> str:
    """The split of the marks so far, as one line; the marks are then forgotten (a second run in the process starts
    its own, from the end of this one)."""
    start = megatrain.STARTED
    parts = []
    for phase, t in _marks:
        parts.append(f"{phase} {t - start:.1f}")
        start = t
    total = (_marks[-1][1] if _marks else time.perf_counter()) - megatrain.STARTED
    megatrain.STARTED = _marks[-1][1] if _marks else time.perf_counter()
    _marks.clear()
    return f"start-up {total:.1f} s: " + " | ".join(parts)
