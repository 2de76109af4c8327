"""What a parameter is to megatrain, whoever holds it: its full size, also once ZeRO-3 has partitioned it. Plain
attribute reads (no torch import), so the FLOP formulas and the checkpoint reader can share them with the engine.
"""
from __future__ import annotations


def numel(p) -> int:
    """A parameter's full element count, also once ZeRO-3 has partitioned it (its .numel() is then 0)."""
    return getattr(p, "ds_numel", None) or p.numel()


def ndim(p) -> int:
    """A parameter's full number of dimensions, also once ZeRO-3 has partitioned it (its data is then 1-D, empty)."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()
