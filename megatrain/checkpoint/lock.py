"""One checkpoint directory, one run: global rank 0 holds an exclusive lock on checkpoint.dir/.lock for the life of
its process (flock: the kernel drops it when the process dies, however it dies).

A second run pointed at the same directory is refused at start-up, in one line naming the holder (host, pid, start
time, from the file's contents). A lock file whose holder is gone (kill -9, a lost node) is stale: the next run takes
it over and says so. flock works across the hosts of a cluster on NFSv4 and Lustre (mounted with flock); on a
filesystem without it the lock is refused with the OS's reason, naming the directory.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time

from megatrain.config import ConfigError

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # directory (real path) -> descriptor, for the locks this process holds
_created: set[str] = set()  # the directories acquire() made (removed again if the run wrote nothing else there)


def _describe(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {when}"


def acquire(ckpt_dir: str, command: str = "run") -> str | None:
    """Lock ckpt_dir for this process (again: a no-op). Returns a line to print when a stale lock was taken over."""
    try:
        key = os.path.realpath(ckpt_dir)
        if key in _held:
            return None
        if not os.path.isdir(ckpt_dir):
            os.makedirs(ckpt_dir)
            _created.add(key)
        fd = os.open(os.path.join(ckpt_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"config key checkpoint.dir: cannot write in {ckpt_dir} ({e.strerror}); choose a directory "
                          f"this user can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise ConfigError(f"checkpoint.dir {ckpt_dir} is in use by another run ({_describe(holder)}); wait for it to "
                          f"end or stop it, or give this run another checkpoint.dir") from None
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"checkpoint.dir {ckpt_dir}: cannot lock it ({e.strerror}); use a filesystem with flock "
                          f"support") from None
    stale = _read(fd)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    _held[key] = fd
    if stale:  # a holder that never released it: its process is gone, or flock would have refused us
        return (f"checkpoint.dir {ckpt_dir}: took over the lock of a run that is gone ({_describe(stale)}); it stopped "
                f"without releasing it (killed?), and resumes from its last complete checkpoint")
    return None


def release_all() -> None:
    """On a normal exit: empty the file (a lock file with contents is the mark of a run that died) and unlock."""
    for key, fd in _held.items():
        try:
            os.ftruncate(fd, 0)
            os.close(fd)
            if key in _created and os.listdir(key) == [LOCK_FILE]:  # a run that stopped before writing anything
                os.remove(os.path.join(key, LOCK_FILE))
                os.rmdir(key)
        except OSError:
            pass
    _held.clear()


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "?"}


atexit.register(release_all)
