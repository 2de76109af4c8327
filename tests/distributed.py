"""Run a function in several gloo processes, with a hard timeout and cleanup (tests' tier 3)."""
import multiprocessing as mp
import os
import traceback

from megatrain.training.dist_env import free_port


def _entry(fn, rank, world, port, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import faulthandler

    import torch.distributed as dist

    from megatrain.training.dist_env import end_distributed

    faulthandler.enable()  # a rank killed by a signal (SIGABRT, SIGSEGV) says where each of its threads was
    try:
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
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, errors), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f} s (hung collective?)")
        if not errors.empty():
            raise AssertionError(errors.get())
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        assert not bad, f"ranks exited non-zero: {bad}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
