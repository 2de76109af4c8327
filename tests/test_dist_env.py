"""Tier 1: rank discovery from whichever launcher started the process."""
import pytest

from megatrain.training.dist_env import _first_slurm_host, discover


def test_deepspeed_or_torchrun_env():
    info = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (3, 8, 1, "10.0.0.1", 6000)
    assert info.launcher == "deepspeed/torchrun"


def test_slurm_srun_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[003-006,010]",
           "SLURM_JOB_ID": "4242"}
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (5, 8, 1, "slurm")
    assert info.master_addr == "gpu003" and info.master_port == 29500 + 4242 % 1000


def test_single_process_picks_a_free_port():
    info = discover({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single") and info.master_port > 0


def test_slurm_nodelists():
    assert _first_slurm_host("node[003-005,009],gpu1") == "node003"
    assert _first_slurm_host("gpu1,gpu2") == "gpu1"
    assert _first_slurm_host("a-[1-2]") == "a-1"
    assert _first_slurm_host("single") == "single"


def _shm_buffers_are_unlinked_and_still_work(rank, world, path_out):
    import os

    import torch

    os.environ["LOCAL_SIZE"] = str(world)  # as the deepspeed launcher sets it on one node
    from deepspeed import comm
    from megatrain.training.dist_env import discover, init_distributed, shm_buffer_path

    init_distributed()
    path_out.put(shm_buffer_path(discover()))
    t = torch.full((1000,), float(rank + 1))
    comm.inference_all_reduce(t)  # DeepSpeed's shared-memory all-reduce: its mappings outlive the names
    assert torch.equal(t, torch.full((1000,), float(sum(range(1, world + 1))))), t[:4]


@pytest.mark.slow
def test_deepspeeds_cpu_shared_memory_leaves_nothing_in_dev_shm():
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank and never removes it; megatrain unlinks the
    names once every rank has mapped them, and the shared-memory all-reduce still works."""
    import multiprocessing as mp
    import os

    from distributed import run_distributed

    paths = mp.get_context("spawn").Queue()
    run_distributed(_shm_buffers_are_unlinked_and_still_work, 2, paths, timeout=300)
    for _ in range(2):
        path = paths.get(timeout=5)
        assert "deepspeed_allreduce_buffer" in path
        assert not os.path.exists(path), path


def test_a_young_build_lock_is_waited_for_and_an_old_one_removed(tmp_path, capsys):
    """torch's build `lock`: a live loader outside megatrain's guard holds it briefly (not removed under it); one
    older than a live holder keeps it is a killed build's (removed)."""
    import os
    import threading
    import time

    from megatrain.training.dist_env import _remove_stale_build_lock

    lock = tmp_path / "lock"
    lock.touch()
    holder = threading.Timer(0.6, lock.unlink)  # the live loader's build ends, and it removes its lock itself
    holder.start()
    t0 = time.monotonic()
    _remove_stale_build_lock(str(lock), held_at_most_s=60)
    holder.join()
    assert time.monotonic() - t0 >= 0.5 and "removed" not in capsys.readouterr().out

    lock.touch()
    os.utime(lock, (time.time() - 120, time.time() - 120))
    _remove_stale_build_lock(str(lock), held_at_most_s=60)
    assert not lock.exists() and "left by a build that was killed" in capsys.readouterr().out


def _one_rank_raises_while_the_other_waits(rank, world):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank 1 fails before the collective")
    dist.barrier()  # rank 0 would wait here until the timeout


def test_the_harness_stops_at_a_ranks_failure_not_the_timeout():
    import time

    from distributed import run_distributed

    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 fails before the collective"):
        run_distributed(_one_rank_raises_while_the_other_waits, 2, timeout=120)
    assert time.monotonic() - t0 < 60  # (stopped at rank 1's error, not at the 120 s timeout)
