"""What a parameter is to megatrain, whoever holds it: its full size, also once ZeRO-3 has partitioned it, and whether
AdamW decays it. Plain attribute reads and names (no torch import), so the FLOP formulas and the checkpoint reader
share them with the engine.
"""
from __future__ import annotations


def numel(p) -> int:
    """A parameter's full element count, also once ZeRO-3 has partitioned it (its .numel() is then 0)."""
    return getattr(p, "ds_numel", None) or p.numel()


def ndim(p) -> int:
    """A parameter's full number of dimensions, also once ZeRO-3 has partitioned it (its data is then 1-D, empty)."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()


def decay_groups(named: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Indices of (name, ndim) pairs that get weight decay (matrices) and that don't (norms, biases, embeddings).
    The optimizer holds its parameters in this order, so checkpoint readers use the same rule."""
    decay, no_decay = [], []
    for i, (name, dims) in enumerate(named):
        is_embedding = name.endswith(("embed.weight", "pos_embed.weight"))
        (decay if dims >= 2 and not is_embedding else no_decay).append(i)
    return decay, no_decay
