"""Where a run's start-up goes, from the package's import to the first step: each entrypoint marks the end of a
phase, and the start-up lines end with the split, e.g.

    start-up 4.4 s: imports 2.1 | distributed 0.5 | data 0.0 | model 0.0 | engine 1.8 | MFU peak 0.0
"""
from __future__ import annotations

import time

import megatrain

_marks: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """`phase` ended now (it began where the previous mark, or the import of megatrain, ended). A second run in the
    same process (tests) starts its split at its own first mark."""
    now = time.perf_counter()
    if megatrain.STARTED is None:
        megatrain.STARTED = now
    _marks.append((phase, now))


def line() -> str:
    """The split of the marks so far, as one line; the marks are then forgotten."""
    start = megatrain.STARTED if megatrain.STARTED is not None else time.perf_counter()
    total = (_marks[-1][1] if _marks else time.perf_counter()) - start
    parts = []
    for phase, t in _marks:
        parts.append(f"{phase} {t - start:.1f}")
        start = t
    megatrain.STARTED = None
    _marks.clear()
    return f"start-up {total:.1f} s: " + " | ".join(parts)
