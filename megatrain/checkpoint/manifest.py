"""A checkpoint's manifest: every file of a step folder with its size and CRC-32, written last (before `latest`
moves), so that a file changed, cut short or lost after the save is found before anything reads it.

    step00000100/manifest.json   {"files": {"mp_rank_00_model_states.pt": {"size": 123, "crc32": 456}, ...}}

The ranks share the hashing: the folder's files in name order, rank r hashes every world-th from r, and rank 0 writes
what they found (a shared checkpoint filesystem, as the rest of the save assumes). Verifying is shared the same way.
`checkpoint.verify`: full (sizes and CRC-32s), size (sizes only: a truncated or missing file, in no time) or none.
A checkpoint written without a manifest verifies as it is (nothing to compare against).
"""
from __future__ import annotations

import json
import os
import zlib

import torch.distributed as dist

from megatrain.fileio import write_atomic

MANIFEST_FILE = "manifest.json"
_CHUNK = 8 << 20


def crc32_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def _files(folder: str) -> list[str]:
    """Every file below `folder` but the manifest, as paths relative to it, in name order."""
    out = []
    for d, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(d, n), folder) for n in names]
    return sorted(n for n in out if n != MANIFEST_FILE)


def _share(items: list, rank: int, world: int) -> list:
    return items[rank::world]


def _ranks() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(part):
    rank, world = _ranks()
    if world == 1:
        return [part]
    everyone = [None] * world
    dist.all_gather_object(everyone, part)
    return everyone


def write_manifest(folder: str, known: dict | None = None) -> str | None:
    """Hash this rank's share of the folder's files; rank 0 writes the manifest. Returns what went wrong (a file that
    could not be read or the manifest not written: on every rank alike), or None. Collective when distributed: a
    rank that fails to read still takes part. `known` (on every rank, or on none): entries this rank made already
    (a background save's writer hashes the files it wrote); the ranks share the hashing of the rest."""
    rank, world = _ranks()
    mine, problem = {}, None
    done = {}
    if known is not None:
        for part in _gather(known):
            done.update(part)
    try:
        listing = _files(folder)
        if rank == 0:
            mine.update({n: done[n] for n in listing if n in done})
        for n in _share([n for n in listing if n not in done], rank, world):
            where = os.path.join(folder, n)
            mine[n] = dict(size=os.path.getsize(where), crc32=crc32_of(where))
    except OSError as e:
        problem = f"{folder}: hashing for the manifest failed ({e})"
    files = {}
    for part, trouble in _gather((mine, problem)):
        files.update(part)
        problem = problem or trouble
    if rank == 0 and problem is None:
        try:
            write_atomic(os.path.join(folder, MANIFEST_FILE), json.dumps({"files": dict(sorted(files.items()))},
                                                                         indent=1))
        except OSError as e:
            problem = f"{os.path.join(folder, MANIFEST_FILE)}: {e}"
    return problem


def check(folder: str, mode: str, rank: int = 0, world: int = 1) -> str | None:
    """What is wrong with the folder against its manifest (the share of its files of `rank` of `world`: all of them
    by default), or None."""
    path = os.path.join(folder, MANIFEST_FILE)
    if mode == "none" or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path}: not a readable manifest ({type(e).__name__})"
    for name in _share(sorted(files), rank, world):
        want, where = files[name], os.path.join(folder, name)
        if not os.path.isfile(where):
            return f"{where}: missing (the manifest lists it)"
        size = os.path.getsize(where)
        if size != want["size"]:
            return f"{where}: {size:,} bytes, the manifest records {want['size']:,} (cut short or overwritten)"
        if mode == "full" and crc32_of(where) != want["crc32"]:
            return f"{where}: its CRC-32 differs from the manifest's (the file changed after it was saved)"
    return None


def verify(folder: str, mode: str) -> str | None:
    """check() over every rank's share: the first problem any rank found (the same on every rank), or None.
    Collective when distributed."""
    return next((p for p in _gather(check(folder, mode, *_ranks())) if p), None)

