"""launchers/slurm/pretrain.sbatch for real, on a two-node Slurm cluster made on this machine.

Each of the three launch modes runs a job that is signalled (USR1, as `#SBATCH --signal=USR1@120` sends
it) mid-run: megatrain saves and exits 0, the script requeues the job, and the rerun resumes at the step
after the checkpoint and completes. The losses of the two runs together equal an uninterrupted 2-process
single-node run's. Marked `slurm`: needs root and apt (the fixture installs slurm and munge), ~3 minutes.
"""
import json
import subprocess
import time
from pathlib import Path

import pytest

from cluster import RANK_ENV, single_node_run, slurm_cluster, wait_for
from training_utils import assert_close_curves, losses, make_byte_dataset, set_args, small_sets

pytestmark = pytest.mark.slurm
SBATCH = Path(__file__).resolve().parent.parent / "launchers" / "slurm" / "pretrain.sbatch"
STEPS = 150
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def run_args(data: str, ckpt: str) -> list[str]:
    """`--set` arguments after `--config tiny`: STEPS steps, no periodic checkpoint (only the stop saves)."""
    return set_args(small_sets(data, ckpt, **{"train.max_steps": STEPS, "train.eval_interval": 50,
                                              "checkpoint.interval": 0}))


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster(n_nodes=2) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(dataset, per-step train losses, eval losses) of the uninterrupted single-node 2-process run."""
    tmp = tmp_path_factory.mktemp("reference")
    data = make_byte_dataset(tmp)
    single_node_run(tmp, run_args(data, str(tmp / "ckpt")))
    return data, losses(str(tmp / "ckpt")), losses(str(tmp / "ckpt"), "eval")


def requeued(job: dict) -> bool:
    return job.get("Restarts") == "1" and job.get("JobState") == "PENDING"


def finished(job: dict) -> dict | None:
    return job if job.get("JobState") in DONE else None


@pytest.mark.parametrize("mode", ["srun", "deepspeed-slurm", "deepspeed-nossh"])
def test_job_signalled_mid_run_checkpoints_requeues_and_resumes(cluster, reference, tmp_path, mode):
    data, want, want_eval = reference
    ckpt, log = tmp_path / "ckpt", tmp_path / "job.out"
    env = {**cluster.env(), **RANK_ENV, "MEGATRAIN_LAUNCHERS": str(SBATCH.parent.parent), "MEGATRAIN_LAUNCH_MODE": mode}
    # The script asks for 8 GPUs and 8 tasks a node: this cluster's nodes have 2 CPUs and no GPU.
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--time=10", f"--output={log}", str(SBATCH), "--config", "tiny",
                          *run_args(data, str(ckpt))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    context = lambda: (f"job: {cluster.job(job)}\n" + (log.read_text()[-3000:] if log.exists() else "(no job output)")  # noqa: E731
                       + "\n" + cluster.logs())
    try:
        metrics = ckpt / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 180, "3 steps logged", context)
        cluster.run(f"scancel --signal=USR1 {job}")  # what --signal=USR1@120 does 2 minutes before the limit
        # Slurm holds a requeued job ~2 minutes, time for the first run to be torn down on every node (the job
        # keeps its id; a node still completing it fails the rerun at once). Wait for exactly that, then release it.
        wait_for(lambda: requeued(cluster.job(job)) and cluster.nodes_idle(), 120, "job requeued, nodes idle", context)
        # NOTE: slurmd revoked the first run's credential at a whole-second time and refuses a batch launch whose
        # credential was made in that same second or before ("Job N already killed, do not launch batch job").
        time.sleep(2)
        cluster.run(f"scontrol update JobId={job} StartTime=now", check=False)
        state = wait_for(lambda: "(restart 1)" in log.read_text() and finished(cluster.job(job)), 240, "rerun done",
                           context)
    finally:
        cluster.run(f"scancel {job}", check=False)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", context()

    text = log.read_text()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    stops = [r for r in rows if r.get("kind") == "stop"]
    assert len(stops) == 1 and stops[0]["reason"] == "SIGUSR1", rows[-3:]
    stopped_at = stops[0]["step"]
    assert 3 <= stopped_at < STEPS
    assert f"stopping at step {stopped_at}: SIGUSR1; checkpoint saved" in text
    assert "requeueing job" in text and "(restart 1)" in text
    assert f"resumed from {ckpt}/step{stopped_at:08d} at step {stopped_at}" in text, context()
    first_run = [r["step"] for r in rows[: rows.index(stops[0])] if "loss" in r]
    second_run = [r["step"] for r in rows[rows.index(stops[0]) + 1:] if "loss" in r]
    assert first_run == list(range(1, stopped_at + 1))
    assert second_run == list(range(stopped_at + 1, STEPS + 1))  # the step after the checkpoint, then on to the end

    got = losses(str(ckpt))
    print(f"\n{mode}: stopped at step {stopped_at}, resumed at step {second_run[0]}, loss {got[1]:.4f} -> "
          f"{got[STEPS]:.4f}, max |loss - single node| {max(abs(got[s] - want[s]) for s in want):.2e}")
    assert got[STEPS] < got[1] - 1.0  # the loss falls
    assert_close_curves(want, got, rtol=1e-6)
    assert_close_curves(want_eval, losses(str(ckpt), "eval"), rtol=1e-6)


def test_finetune_sbatch_runs_to_the_end_and_equals_one_rank(cluster, reference, tmp_path):
    """launchers/slurm/finetune.sbatch (srun mode, 2 nodes): a LoRA classifier from a pretrained checkpoint, with
    evaluations and DIR/best, whose losses equal the same fine-tune on one rank."""
    from distributed import run_distributed
    from test_finetune import finetune_runs, ft_sets, sentiment, write
    from training_utils import run_configs

    data = reference[0]
    lm = str(tmp_path / "lm")
    run_distributed(run_configs, 1, [small_sets(data, lm, **{"train.max_steps": 3, "checkpoint.interval": 0,
                                                             "train.eval_interval": 0})], timeout=300)
    train = write(tmp_path / "train.jsonl", sentiment(48, 0))
    lora = {"finetune.lora_rank": 4, "train.max_steps": 6, "train.eval_interval": 3}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_distributed(finetune_runs, 1, [("finetune-classify", ft_sets(lm, one, train, train, **lora))], timeout=300)
    log = tmp_path / "job.out"
    env = {**cluster.env(), **RANK_ENV, "MEGATRAIN_LAUNCHERS": str(SBATCH.parent.parent), "MEGATRAIN_LAUNCH_MODE": "srun"}
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--time=10", f"--output={log}", str(SBATCH.parent / "finetune.sbatch"),
                          "--config", "finetune-classify", *set_args(ft_sets(lm, two, train, train, **lora))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    context = lambda: log.read_text()[-3000:] if log.exists() else "(no job output)"  # noqa: E731
    try:
        state = wait_for(lambda: finished(cluster.job(job)), 240, "fine-tune job done", context)
    finally:
        cluster.run(f"scancel {job}", check=False)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", context()
    assert "world 2 = tp 1 x pp 1 x dp 2" in log.read_text() and (Path(two) / "best").exists()
    assert_close_curves(losses(one), losses(two), rtol=1e-5)
    assert_close_curves(losses(one, "eval"), losses(two, "eval"), rtol=1e-5)


def test_a_rank_killed_under_srun_ends_the_job_in_seconds_and_a_resubmit_resumes(cluster, reference, tmp_path):
    """kill -9 of one rank (the second node's) of a 2-node srun job: the job ends FAILED within a minute, not at
    DeepSpeed's 30-minute collective timeout; a job resubmitted on the one node left resumes from the last complete
    checkpoint, resharded for its one rank (checkpoint.elastic)."""
    import os
    import pathlib
    import signal

    data, _, _ = reference
    ckpt, log = tmp_path / "ckpt", tmp_path / "job.out"
    env = {**cluster.env(), **RANK_ENV, "MEGATRAIN_LAUNCHERS": str(SBATCH.parent.parent), "MEGATRAIN_LAUNCH_MODE": "srun"}
    args = set_args(small_sets(data, str(ckpt), **{"train.max_steps": 100000, "train.eval_interval": 0,
                                                   "checkpoint.interval": 10, "parallel.timeout_minutes": 2}))

    def submit(output, nodes=2):
        sub = subprocess.run(["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", "--gpus-per-node=0",
                              "--cpus-per-task=1", "--time=10", "--no-requeue", f"--output={output}", str(SBATCH),
                              "--config", "tiny", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60)
        assert sub.returncode == 0, sub.stderr
        return sub.stdout.strip().split(";")[0]

    def rank_pid(rank: int) -> int | None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"megatrain.pretrain" in cmd and f"SLURM_PROCID={rank}".encode() in environ and \
                    f"SLURM_JOB_ID={job}".encode() in environ:
                return int(pid)
        return None

    job = submit(log)
    context = lambda: (f"job: {cluster.job(job)}\n" + (log.read_text()[-3000:] if log.exists() else "(no job output)")  # noqa: E731
                       + "\n" + cluster.logs())
    try:
        wait_for(lambda: (ckpt / "latest").exists(), 180, "a checkpoint saved", context)
        pid = wait_for(lambda: rank_pid(1), 30, "rank 1's process", context)
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        state = wait_for(lambda: finished(cluster.job(job)), 120, "the job ended", context)
        took = time.time() - t0
    finally:
        cluster.run(f"scancel {job}", check=False)
    print(f"\nsrun: rank 1 killed, job {state['JobState']} {took:.1f} s later")
    assert state["JobState"] == "FAILED" and took < 60, context()
    assert "task 1: Killed" in log.read_text(), context()  # srun saw the rank die (and ended the others)
    step = int((ckpt / "latest").read_text()[4:])
    args = set_args(small_sets(data, str(ckpt), **{"train.max_steps": step + 2, "train.eval_interval": 0,
                                                   "checkpoint.interval": 10}))
    log2 = tmp_path / "rerun.out"
    job = submit(log2, nodes=1)
    try:
        state = wait_for(lambda: finished(cluster.job(job)), 240, "the resubmitted job ended", context)
    finally:
        cluster.run(f"scancel {job}", check=False)
    text = log2.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    resharded = f"step{step:08d}-tp1-pp1-dp1-zero0"  # (one data-parallel rank's ZeRO-1 runs as ZeRO-0)
    assert f"into {ckpt}/{resharded}" in text and f"resumed from {ckpt}/{resharded} at step {step}" in text, text[-3000:]
    assert step + 2 in losses(str(ckpt))
