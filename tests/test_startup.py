"""The start-up split line (megatrain/startup.py): each phase is the time since the one before, the total their sum,
and a second run in one process starts its split at its own first mark."""
import re
import time

import megatrain
from megatrain import startup


def test_the_split_adds_up_and_a_second_run_starts_afresh(monkeypatch):
    monkeypatch.setattr(megatrain, "STARTED", time.perf_counter())
    time.sleep(0.05)
    startup.mark("imports")
    time.sleep(0.1)
    startup.mark("engine")
    line = startup.line()
    m = re.fullmatch(r"start-up ([\d.]+) s: imports ([\d.]+) \| engine ([\d.]+)", line)
    assert m, line
    total, imports, engine = map(float, m.groups())
    assert imports >= 0.05 and engine >= 0.1 and abs(total - imports - engine) <= 0.11, line
    time.sleep(0.2)  # (a first run's training: not the second run's start-up)
    startup.mark("imports")
    startup.mark("engine")
    again = re.fullmatch(r"start-up ([\d.]+) s: imports ([\d.]+) \| engine ([\d.]+)", startup.line())
    assert again and float(again.group(1)) < 0.1 and float(again.group(2)) == 0.0
