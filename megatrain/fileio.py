"""Files a reader never sees half-written: write beside the target, then rename over it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator


class BadFileError(ValueError):
    """A file megatrain reads that is not what it should be; the message names it."""


def read_json(path: str | os.PathLike, fix: str = "the file is damaged") -> Any:
    """json.load, or one line naming the file, what is wrong with it and `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BadFileError(f"{os.fspath(path)}: not valid JSON ({str(e).splitlines()[0][:120]}); {fix}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path beside `path` (its folder made if missing) for the block to write; renamed over `path`
    when the block ends, removed if it raises. `suffix` ends the temporary name (np.save wants '.npy')."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove `path`.tmp<pid>* files left by a process of this host that died before its rename (kill -9, a lost
    node); a live process's are kept. Returns what was removed."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    removed = []
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(name + ".tmp"):
            continue
        digits = entry[len(name) + 4:].split(".")[0]
        if not digits.isdigit() or _alive(int(digits)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write `text` to `path` all at once, flushed to disk before the rename; `mode`: the file's permissions."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[str]:
    """A temporary folder beside `path` for the block to fill, renamed to `path` when the block ends and removed if
    it raises, so a folder at `path` is always complete. An existing `path` raises FileExistsError unless `replace`."""
    path = os.fspath(path).rstrip("/")
    if os.path.exists(path) and not replace:
        raise FileExistsError(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            old = f"{path}.old{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_dir() -> str:
    """Where megatrain keeps what it builds or measures once per machine: $MEGATRAIN_CACHE, else ~/.cache/megatrain."""
    return os.environ.get("MEGATRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatrain")
