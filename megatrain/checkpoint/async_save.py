"""Checkpoint saves in the background (checkpoint.async_save): training stalls only for a copy of the state.

At a save, every rank file DeepSpeed writes goes through the engine's checkpoint_engine (io.harden); here its
state_dict is copied to host memory instead (pinned on a GPU machine) and queued, with the rank's RNG states and
frozen experts. DeepSpeed's state_dicts hold the live tensors of the model and the optimizer, so the copy is taken
before save_checkpoint returns. A writer thread then writes each file, fsyncs it, reads it back for the manifest's
CRC-32 and fsyncs the folder; it never raises (the first error is kept, and the rank's later files are skipped, as
the synchronous save skips them).

The commit (megatrain.json, the manifest, `latest`, `best`, pruning: io.commit, as a synchronous save ends) is
collective, so it runs on the main thread: at each step boundary while a save is in flight the ranks all-reduce
"my writer is done" (MIN; one int), and when every rank's is, they commit. The next save, the end of training and a
stop wait for the save in flight and commit it first; rank 0 says so in one line when it had to wait. `latest`
therefore moves only once every rank's files are durable: a kill at any moment leaves it naming a complete
checkpoint, and a save a crash interrupts is simply not committed (its partial folder is overwritten or pruned by
the later saves). A write that failed stops the run as a synchronous one does (io.failed).

Memory: one host copy of what the rank's files hold, from the save until its writer is done.
"""
from __future__ import annotations

import copy
import errno
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from megatrain import faults
from megatrain.checkpoint import manifest


@dataclass
class Pending:
    """A save whose files a writer thread is writing; committed by poll() or wait() (io.commit) on the main thread."""

    ckpt_dir: str
    tag: str
    step: int
    state: dict  # megatrain.json
    keep_last: int
    best: bool  # also point `best` at it once committed
    files: list  # [(path, write(path))] this rank writes, in order
    error: str | None = None  # the first write that failed (this rank)
    inject: bool = False  # faults: ENOSPC after the first file
    hashes: dict = field(default_factory=dict)  # manifest entries of the files written: {name: {size, crc32}}
    thread: threading.Thread | None = None
    # io's own steps, handed in (io imports this module): guard(write, path) -> the reason a write failed, or None;
    # commit(ckpt_dir, tag, state, error, keep_last, best, hashes=): megatrain.json, manifest, latest (collective)
    guard: Callable | None = None
    commit: Callable | None = None

    @property
    def folder(self) -> str:
        return os.path.join(self.ckpt_dir, self.tag)

    def write_all(self) -> None:
        for i, (path, write) in enumerate(self.files):
            if self.error is not None:  # (the rest skipped, as a synchronous save skips them)
                break
            entry = {}
            self.error = self.guard(lambda p: entry.update(_durably(write, p, self.inject and i == 0)), path)
            name = os.path.relpath(path, self.folder)
            if self.error is None and not name.startswith(".."):
                self.hashes[name] = entry
            if i == 0:  # faults: a kill (or a slow disk) after the first file
                faults.kill_here("kill_mid_async_write", self.step)
                if faults.fires("slow_async_write", self.step):
                    time.sleep(2.0)
        self.files = []  # the host copy goes as soon as it is on disk
        if self.error is not None:
            return
        try:
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)  # the folder's entries (the new files' names)
            finally:
                os.close(fd)
        except OSError:
            pass

    def run(self) -> None:
        try:
            self.write_all()
        except BaseException as e:  # never raised in the thread: the commit reports it on every rank
            self.error = self.error or f"{self.folder}: background write failed ({type(e).__name__}: {e})"
            self.files = []


def _durably(write, path: str, inject: bool) -> dict:
    """write(file) (a torch_writer) or write(path) (any other); then fsync. Returns the file's manifest entry."""
    if getattr(write, "takes_file", False):
        with open(path, "wb") as f:
            out = _Hashing(f)
            write(out)
            f.flush()
            os.fsync(f.fileno())
        entry = dict(size=out.size, crc32=out.crc)
    else:
        write(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        entry = dict(size=os.path.getsize(path), crc32=manifest.crc32_of(path))
    if inject:  # faults: the disk fills after this file (the first of the checkpoint) is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return entry


class _Hashing:
    """A file that keeps the CRC-32 and size of what is written through it (the manifest's entry, without reading
    the file again)."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def torch_writer(obj):
    """A Pending file's write for torch.save(obj): into the file, hashed on the way."""
    def write(f):
        torch.save(obj, f)

    write.takes_file = True
    return write


def host_copy(obj, pin: bool | None = None):
    """A copy of `obj` (a state_dict: nested dicts, lists and tuples of tensors and plain records) that shares nothing
    with it: every tensor's storage copied once to host memory (pinned when CUDA is there), views and shared tensors
    kept as views of the copy (so torch.save writes what it would have written for the original)."""
    if pin is None:
        pin = torch.cuda.is_available()
    memo: dict = {}
    out = _copy(obj, memo, pin)
    if pin and any(isinstance(k, tuple) and k[1].type == "cuda" for k in memo):
        torch.cuda.synchronize()  # the non-blocking copies have landed before training changes the originals
    return out


def _copy(obj, memo: dict, pin: bool):
    if isinstance(obj, torch.Tensor):
        return _copy_tensor(obj, memo, pin)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same kind of dict (OrderedDict, defaultdict's factory)
        for k, v in obj.items():
            out[k] = _copy(v, memo, pin)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_copy(v, memo, pin) for v in obj]
        if hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        return type(obj)(items)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    try:
        return copy.deepcopy(obj)  # a record (a loss scaler, an enum, a fragment address) that training may change
    except Exception:
        return obj


def _copy_tensor(t: torch.Tensor, memo: dict, pin: bool) -> torch.Tensor:
    if id(t) in memo:  # one tensor in two places (tied weights): one copy in both
        return memo[id(t)][1]
    out = _copy_storage_view(t, memo, pin)
    memo[id(t)] = (t, out)  # (t kept alive: its id is not reused while the memo lives)
    return out


def _copy_storage_view(t: torch.Tensor, memo: dict, pin: bool) -> torch.Tensor:
    storage = t.untyped_storage()
    n = storage.nbytes()
    key = (storage.data_ptr(), storage.device)
    held = memo.get(key) if n else None
    if held is None:
        dst = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        src = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        dst.copy_(src, non_blocking=pin)
        held = dst.untyped_storage()
        if n:
            memo[key] = held
    out = torch.empty(0, dtype=t.dtype).set_(held, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    if t.requires_grad and t.is_leaf:
        out.requires_grad_(True)
    return out


def in_flight(ce) -> Pending | None:
    return getattr(ce, "megatrain_pending", None)


def start(ce, pending: Pending) -> None:
    """Hand `pending`'s files to a writer thread (daemon: a run that fails exits without waiting for a save it will
    not commit)."""
    assert in_flight(ce) is None, "a save is already in flight"
    pending.thread = threading.Thread(target=pending.run, name=f"megatrain-save-{pending.tag}", daemon=True)
    ce.megatrain_pending = pending
    pending.thread.start()


def poll(engine) -> None:
    """At a step boundary: commit the save in flight once every rank's writer is done (one tiny all-reduce while a
    save is in flight; nothing otherwise)."""
    pending = in_flight(engine.checkpoint_engine)
    if pending is None:
        return
    done = not pending.thread.is_alive()
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(done)], dtype=torch.int32, device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        done = bool(flag.item())
    if done:
        _commit(engine.checkpoint_engine, pending)


def wait(engine, before: str) -> None:
    """Wait for the save in flight (if any) and commit it (RunStopped on every rank if its write failed); rank 0
    says how long it waited when a writer was still busy. `before`: what waits (the log line's end). Collective."""
    ce = getattr(engine, "checkpoint_engine", None)
    pending = in_flight(ce)
    if pending is None:
        return
    t0 = time.perf_counter()
    busy = pending.thread.is_alive()
    pending.thread.join()
    if dist.is_initialized() and dist.get_world_size() > 1:  # any rank's writer busy: the wait is the slowest's
        flag = torch.tensor([int(busy)], dtype=torch.int32, device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        busy = bool(flag.item())
    if busy and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"waited {time.perf_counter() - t0:.2f} s for checkpoint {pending.tag} to finish writing in the "
              f"background before {before}", flush=True)
    _commit(ce, pending)


def _commit(ce, pending: Pending) -> None:
    pending.thread.join()
    ce.megatrain_pending = None
    pending.commit(pending.ckpt_dir, pending.tag, pending.state, pending.error, pending.keep_last, pending.best,
           hashes=pending.hashes)
