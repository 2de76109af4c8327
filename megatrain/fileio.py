"""Files a reader never sees half-written: write beside the target, then rename over it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator


class BadFileError(ValueError):
    """A file megatrain reads that is not what it should be; the message names it."""


def read_json(path: str | os.PathLike, fix: str = "the file is damaged") -> Any:
    """json.load, or one line naming the file, what is wrong with it and `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BadFileError(f"{os.fspath(path)}: not valid JSON ({str(e).splitlines()[0][:120]}); {fix}") from None


def check_output_path(path: str, flag: str, kind: str = "file", inputs: Iterable[tuple[str, str]] = (),
                      example: str | None = None) -> None:
    """Refuse, before any work, an output `path` (given as `flag`) that cannot be written or would destroy what the
    command reads: empty; a file output that is a folder, or a folder output that is a file; a parent that is a file or
    cannot be written in; the same file or folder as one of `inputs`; an existing file inside an input folder; a
    folder output (replaced whole) that holds an input. `inputs`: (label, path) pairs, the label naming the input in
    the message ("--input"); `example`: a name to suggest ("predictions.jsonl")."""
    assert kind in ("file", "folder")
    eg = f", e.g. {flag} {example}" if example else ""
    if not path:
        raise BadFileError(f"{flag} '': empty; name the {kind} to write{eg}")
    if kind == "file" and (os.path.isdir(path) or path.endswith(("/", os.sep))):
        eg = f", e.g. {flag} {os.path.join(path, example)}" if example else ""
        raise BadFileError(f"{flag} {path}: is a folder; name a file to write{eg}")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise BadFileError(f"{flag} {path}: is a file, not a folder; name a new folder{eg}")
    parent = next(p for p in _folders_above(path) if os.path.exists(p))
    if not os.path.isdir(parent):
        raise BadFileError(f"{flag} {path}: {parent} is a file, not a folder; pick a path inside a folder")
    # NOTE: a file made and removed, not os.access: root passes os.access everywhere, /proc included
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".megatrain-write-test-")
    except OSError as e:
        raise BadFileError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); pick a folder you can write "
                           f"to") from None
    os.close(fd)
    os.unlink(probe)
    out = _stat(path)
    if out is None:  # a new file or folder is no input
        return
    for label, inp in inputs:
        st = _stat(inp)
        what = "folder" if os.path.isdir(inp) else "file"
        if _same(out, st):
            raise BadFileError(f"{flag} {path}: the same {what} as {label} {inp}; writing it would destroy the input: "
                               f"name another {kind}")
        if what == "folder" and _inside(path, st):
            raise BadFileError(f"{flag} {path}: an existing file inside {label} {inp}, which is read; writing it would "
                               f"destroy the input: write it elsewhere")
        if kind == "folder" and st is not None and _inside(inp, out):
            raise BadFileError(f"{flag} {path}: holds {label} {inp}; replacing the folder would delete the input: "
                               f"name another folder")


def _folders_above(path: str, real: bool = False) -> Iterator[str]:
    """The folders above `path`, nearest first, up to the root; `real`: of the path with its links resolved."""
    p = os.path.realpath(path) if real else os.path.abspath(path)
    while os.path.dirname(p) != p:
        p = os.path.dirname(p)
        yield p


def _inside(path: str, folder: os.stat_result | None) -> bool:
    """`path` (its links resolved) lies somewhere under `folder`."""
    return any(_same(_stat(p), folder) for p in _folders_above(path, real=True))


def _stat(path: str) -> os.stat_result | None:
    return os.stat(path) if os.path.exists(path) else None


def _same(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    """The same file or folder, by device and inode: `./x`, `x` and a link to `x` are one."""
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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
