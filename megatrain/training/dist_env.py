"""Where this process sits in the job, whichever launcher started it, and torch.distributed setup.

Launchers set different variables: the DeepSpeed launcher and torchrun set RANK/WORLD_SIZE/LOCAL_RANK
(+ MASTER_ADDR/PORT); `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; a plain `python` sets none.
`discover()` reads whichever is there and fills in the standard variables so DeepSpeed finds them.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import fcntl
import gc
import os
import socket
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatrain.hostinfo import cpu_cores
from megatrain.launch.hostfile import expand_nodelist


@dataclass
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # deepspeed/torchrun | slurm | single
    ranks_on_node: int = 1  # ranks of the job on this machine (known once the process group is up)


def log0(*args) -> None:
    """Print on rank 0 only (or in a process with no process group)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """'node[003-005,009],gpu1' -> 'node003' (the first host of a Slurm node list)."""
    return expand_nodelist(nodelist)[0]


def discover(env: dict | None = None) -> RankInfo:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "deepspeed/torchrun"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", 0))
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = int(env.get("MASTER_PORT", 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    else:
        launcher = "single"
        rank, world, local = 0, 1, 0
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0) or free_port())
    return RankInfo(rank, world, local, addr, port, launcher)


def export(info: RankInfo) -> None:
    """Write the standard variables that torch.distributed and DeepSpeed read."""
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))


def init_distributed(timeout_minutes: float = 10.0) -> RankInfo:
    """Discover the rank, pick the accelerator's backend (nccl on GPU, gloo on CPU) and initialise; a collective
    that waits longer than timeout_minutes fails instead of hanging (a lost rank)."""
    info = discover()
    export(info)
    # DeepSpeed calls torch.distributed functions that torch 2.13 marks deprecated, once per call.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Denormal floats run ~100x slower through the CPU's vector units: a LoRA fine-tune of SmolLM2 went from 3 s
        # to minutes a step once some of its gradients got that small. Flush them to zero, as GPUs do.
        torch.set_flush_denormal(True)
    import deepspeed  # NOTE: here, once DS_ACCELERATOR is set: DeepSpeed picks its accelerator when imported
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cuda":
        torch.cuda.set_device(info.local_rank)
    elif info.world_size > 1:
        load_comm_op()  # NOTE: before deepspeed.init_distributed, which loads it unguarded
    if not faulthandler.is_enabled():  # a rank dying of a signal (SIGSEGV, SIGABRT) prints where its threads were
        faulthandler.enable()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    restarted = elastic_store(info, timeout)
    if restarted is not None:  # (DeepSpeed takes over a process group that exists)
        torch.distributed.init_process_group(acc.communication_backend_name(), store=restarted, rank=info.rank,
                                             world_size=info.world_size, timeout=timeout)
    with comm_op_skipped(acc.device_name() == "cpu" and info.world_size == 1):
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False, timeout=timeout)
    if acc.device_name() == "cpu":
        unlink_shm_buffer(info)
    info.ranks_on_node = count_ranks_on_node()
    return info


def elastic_store(info: "RankInfo", timeout: datetime.timedelta):
    """Under torchrun's elastic agent (its store shared with the ranks): that store, its keys under a prefix of this
    restart's own. NOTE: the agent's store outlives a restart, and gloo reads each peer's address from it; without a
    prefix a restarted rank can read the dead generation's address (connection refused, then a timeout of
    parallel.timeout_minutes). None otherwise: the process group is made as usual."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or info.world_size == 1:
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                                       is_master=False, timeout=timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch.distributed.PrefixStore(f"megatrain/restart{restart}/", store)


@contextlib.contextmanager
def comm_op_skipped(skip: bool):
    """Keep DeepSpeed from building or loading its CPU shared-memory collectives op while `skip` is true.

    A one-process run has no peer to reduce with, yet DeepSpeed's torch backend builds that C++ op whenever its
    builder is marked compatible (about a minute of compiling on the first run on a machine). The op is looked up in
    `deepspeed.ops.__compatible_ops__` only while the backend is created, so it is marked unavailable for that
    moment and restored after: a later multi-rank start in another process builds it as before."""
    import deepspeed.ops

    if not skip:
        yield
        return
    table = deepspeed.ops.__compatible_ops__
    saved = dict(table)
    for name in [n for n in table if "shm_comm" in n]:
        table[name] = False
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def end_distributed() -> None:
    """End torch.distributed in a rank whose work succeeded, before the interpreter's own teardown: every rank waits
    for the others (no collective of theirs left half-done), then the process groups go, gloo's threads with them.

    NOTE: left to the teardown, a gloo worker thread can outlive the interpreter and die taking the GIL to free a
    tensor; the rank then exits with SIGABRT ("terminate called without an active exception") after finishing
    everything, and its launcher calls the whole job failed. Not for a rank that failed: its peers may never reach
    the barrier (that path keeps the teardown as it was)."""
    if not dist.is_initialized():
        return
    gc.collect()  # engines and their pending work from earlier runs in this process, freed while the groups exist
    dist.barrier()
    dist.destroy_process_group()


def shm_buffer_path(info: RankInfo) -> str:
    """The /dev/shm file DeepSpeed's CPU collectives map for this rank (csrc/cpu/comm/shm.cpp names it)."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{info.master_addr}_{info.master_port}_{info.rank}"


def unlink_shm_buffer(info: RankInfo) -> None:
    """DeepSpeed's CPU accelerator gives each rank of a one-node job a 69 MB shared-memory file that every rank maps,
    and never removes it: each run left 69 MB per rank of RAM behind in /dev/shm (tmpfs), for good. Once every rank
    has mapped every file (the barrier: DeepSpeed maps them all inside init_distributed), the names can go; the
    mappings live until the processes end, so nothing is left behind even by a rank that is killed."""
    if int(os.environ.get("LOCAL_SIZE", 0)) != info.world_size:  # DeepSpeed's own test: not all ranks on one node,
        return  # no shared memory (and every rank takes the same branch: the barrier below is everyone's or no one's)
    dist.barrier()
    try:
        os.unlink(shm_buffer_path(info))
    except FileNotFoundError:  # the op was not built: no file
        pass


def count_ranks_on_node() -> int:
    """How many ranks of the job run on this machine (by host name; a collective)."""
    if dist.get_world_size() == 1:
        return 1
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())


def share_cpu_cores(ranks_on_node: int) -> str:
    """On CPU, give each rank its share of the node's cores as torch threads (torch's default, every core for every
    rank, oversubscribes them when ranks share a node), unless OMP_NUM_THREADS says otherwise (the user's, or
    torchrun's 1 per rank). Returns the line that says what was chosen."""
    cores = cpu_cores()
    if "OMP_NUM_THREADS" in os.environ:
        why = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    elif ranks_on_node == 1:
        why = "torch's default; set OMP_NUM_THREADS to choose"
    else:
        torch.set_num_threads(max(1, cores // ranks_on_node))
        why = "its share of the cores; set OMP_NUM_THREADS to choose"
    return (f"CPU threads: {torch.get_num_threads()} per rank ({why}); {ranks_on_node} rank(s) of the job share this "
            f"node's {cores} cores")


def prebuild_ops() -> None:
    """Build (or load from cache) the C++ ops DeepSpeed JIT-compiles at start on this accelerator, once,
    so that several ranks starting together never race on the same build."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    t0 = time.perf_counter()
    name = load_comm_op()
    print(f"DeepSpeed op {name} ready ({time.perf_counter() - t0:.1f} s)" if name else
          "no DeepSpeed op to prebuild on this accelerator")


def load_comm_op() -> str | None:
    """Load (building once if needed) the C++ op DeepSpeed's CPU accelerator JIT-compiles for its collectives.

    torch's JIT build guards its folder with a `lock` file that the builder deletes when done; a process killed while
    holding it (kill -9 during start-up) leaves it behind, and every later run then waits for it forever. Here every
    megatrain process loads the op while holding an flock on the folder (dropped by the kernel however the process
    dies). A `lock` file found under that flock belongs to nobody alive, unless a process that loads the op without
    megatrain (a script calling deepspeed.init_distributed itself) holds it: such a holder keeps it a second or two
    when the op is built, a few minutes while it builds. So a `lock` is removed once it is older than that."""
    import deepspeed.ops  # NOTE: here, once DS_ACCELERATOR is set (see init_distributed)
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    folder = _get_build_directory(builder.NAME, False)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".megatrain-load.lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        built = os.path.exists(os.path.join(folder, f"{builder.NAME}.so"))
        _remove_stale_build_lock(os.path.join(folder, "lock"), LOCK_HELD_AT_MOST_S[built])
        if not built:  # the first multi-rank CPU run here
            print(f"building DeepSpeed's CPU collectives op {builder.NAME} once for this machine (about a minute; "
                  f"cached in {folder}; `python -m megatrain.training.dist_env --prebuild` does it ahead)", flush=True)
        builder.load(verbose=False)
    return builder.NAME


# How long a live process that loads DeepSpeed's op without megatrain's flock holds torch's build `lock`, at most:
# [while it builds the op, once the op is built (ninja finds nothing to do)]. An older `lock` is a killed build's.
LOCK_HELD_AT_MOST_S = {False: 300.0, True: 20.0}


def _remove_stale_build_lock(lock: str, held_at_most_s: float) -> None:
    """Wait for `lock` to go while it is young enough to be held by a live loader; remove it once it is older."""
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except FileNotFoundError:
            return
        if age > held_at_most_s:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            print(f"removed {lock}, left by a build that was killed (it would make every later start wait forever)",
                  flush=True)
            return
        time.sleep(0.2)


if __name__ == "__main__":
    import sys

    if "--prebuild" in sys.argv:
        prebuild_ops()
