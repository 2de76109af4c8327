"""Run a function in several gloo processes, with a hard timeout and cleanup (tests' tier 3)."""
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from multiprocessing import connection as mp_connection
from multiprocessing import reduction

from megatrain.training.dist_env import free_port

# What every rank imports before its first line runs. A fork server (one per pytest process) imports these once, and
# each rank is forked from it: a rank starts in well under a second, where a spawned one spends seconds importing
# them again (the slow tier starts hundreds of ranks). megatrain itself is not preloaded: each rank imports it
# afresh, so its start-up clock (megatrain.STARTED) is the rank's own.
PRELOADED = ["torch", "torch._dynamo", "deepspeed", "transformers", "numpy"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOADED)
    return ctx


class _Inherited:
    """The test's stdout and stderr, as file descriptors sent to the rank: a forked rank's own are the fork server's,
    so its output would miss the test's capture (pytest's report, capfd)."""

    def __reduce__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        return _adopt_outputs, (reduction.DupFd(1), reduction.DupFd(2))


def _adopt_outputs(out, err):
    for fd, sent in ((1, out), (2, err)):
        got = sent.detach()
        os.dup2(got, fd)
        os.close(got)


def _entry(fn, rank, world, port, args, errors, environ, _outputs):
    # NOTE: a forked rank inherits the fork server's environment and outputs, fixed when the server started; the
    # test's own (with whatever it set since) replace them, as a spawned process would have inherited them.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import faulthandler

    import torch.distributed as dist

    from megatrain.training.dist_env import end_distributed, load_comm_op

    faulthandler.enable()  # a rank killed by a signal (SIGABRT, SIGSEGV) says where each of its threads was
    try:
        if world > 1:  # NOTE: as megatrain's init_distributed: under its guard, before a test's own
            load_comm_op()  # deepspeed.init_distributed would load it unguarded (racing another test's start)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        if dist.is_initialized():  # no barrier: the other ranks may never reach it
            dist.destroy_process_group()
        raise
    end_distributed()  # as the entrypoints do: every rank done, then the groups end before the interpreter does


def run_distributed(fn, world: int, *args, timeout: float = 180.0) -> None:
    """Run fn(rank, world, *args) in `world` processes; raise with the first rank's traceback on failure."""
    ctx = _context()
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, errors, dict(os.environ), _Inherited()),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + timeout
        # A rank that fails leaves the others waiting in a collective it never joins: stop at the first failure.
        while (any(p.is_alive() for p in procs) and errors.empty() and time.monotonic() < deadline
               and all(p.exitcode in (None, 0) for p in procs)):
            mp_connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.5)
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if bad or not errors.empty():
            try:  # (a rank queues its traceback before it exits: give the queue's feeder a moment)
                raise AssertionError(errors.get(timeout=5))
            except queue.Empty:
                raise AssertionError(f"ranks exited non-zero: {bad}") from None
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f} s (hung collective?)")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
