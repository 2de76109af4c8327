"""Real clusters on one machine, for the `multinode` and `slurm` tests (root + apt needed).

- `ssh_nodes()`: sshd listening on 127.0.0.1 and 127.0.0.2 (two "nodes" for pdsh + ssh), plus a third
  node, 127.0.0.3, whose sshd runs in its own mount namespace with the venv hidden (a node that lacks
  the venv); 127.0.0.4 answers nothing (an unreachable node).
- `slurm_cluster()`: munge + slurmctld + two slurmd "nodes" n1, n2, each in its own network namespace
  on a bridge (10.199.1.0/24), so the two ranks of a job really talk across a network.

Nothing is written to /etc: daemons read configs from a temp dir, ssh client settings go in through
one `Include` line in ~/.ssh/config, and every daemon, namespace, bridge and ~/.ssh change is undone
on exit, also when the test fails.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from megatrain.training.dist_env import free_port

APT_PACKAGES = {"ssh": ["openssh-server", "openssh-client", "pdsh"],
                "slurm": ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2"]}
NEEDED_BINARIES = {"ssh": ["sshd", "ssh", "ssh-keygen", "pdsh"],
                   "slurm": ["slurmctld", "slurmd", "sbatch", "munged", "mungekey", "ip", "nsenter"]}


def sh(cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=check, text=True, capture_output=True, **kw)


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def ensure_packages(kind: str) -> None:
    """Install the Debian packages a cluster of this kind needs (skip the test where that can't be done)."""
    if all(which(b) for b in NEEDED_BINARIES[kind]):
        return
    if os.geteuid() != 0 or not which("apt-get"):
        pytest.skip(f"{kind} cluster tests need root and apt-get to install {' '.join(APT_PACKAGES[kind])}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run("apt-get update -qq", shell=True, check=True, env=env, capture_output=True)
    r = subprocess.run(f"apt-get install -y -qq --no-install-recommends {' '.join(APT_PACKAGES[kind])}", shell=True,
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"apt-get install failed: {r.stderr[-2000:]}")


RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MEGATRAIN_VENV": sys.prefix}


def launch(cmd: list[str], cwd, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group, output captured; on timeout kill it and every rank it started."""
    env = {**os.environ, **RANK_ENV, **(env or {})}
    env["PATH"] = f"{sys.prefix}/bin:{env['PATH']}"
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"{cmd[:4]} ran past {timeout} s:\n{out[-4000:]}") from None
    finally:
        # Ranks started over ssh are not in our process group: anything still naming this test's dir goes.
        subprocess.run(["pkill", "-9", "-f", str(cwd)], capture_output=True)
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def single_node_run(cwd, args: list[str]) -> None:
    """The reference: `deepspeed --num_gpus 2 --module megatrain.pretrain ARGS` on this one machine."""
    r = launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                str(free_port()), "--module", "megatrain.pretrain", "--config", "tiny", *args], cwd)
    assert r.returncode == 0, r.stdout[-4000:]


def kill_pidfile(path: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(open(path).read().split()[0])
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, what: str, context=lambda: "", interval: float = 0.1):
    """predicate()'s first true value; after `timeout` s, TimeoutError naming `what`, with context() for the log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{context()}")


@contextlib.contextmanager
def ssh_client_config(block: str):
    """Put `block` in front of ~/.ssh/config through an Include line; restore the file (or its absence) after."""
    ssh_dir = os.path.expanduser("~/.ssh")
    made_dir = not os.path.isdir(ssh_dir)
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    cfg = os.path.join(ssh_dir, "config")
    before = open(cfg).read() if os.path.exists(cfg) else None
    included = tempfile.NamedTemporaryFile("w", prefix="megatrain-ssh-", suffix=".conf", delete=False)
    included.write(block)
    included.close()
    with open(cfg, "w") as f:
        f.write(f"Include {included.name}\n" + (before or ""))
    try:
        yield
    finally:
        os.unlink(included.name)
        if before is None:
            os.unlink(cfg)
        else:
            with open(cfg, "w") as f:
                f.write(before)
        if made_dir:
            shutil.rmtree(ssh_dir, ignore_errors=True)


@dataclass
class SshNodes:
    nodes: list[str]  # reachable, with the venv: pass these to a hostfile
    no_venv: str      # reachable, venv hidden
    unreachable: str  # nothing listens
    port: int
    logs: list[str] = field(default_factory=list)


def _sshd_config(d: str, name: str, addrs: list[str], port: int) -> str:
    path = os.path.join(d, f"{name}.conf")
    with open(path, "w") as f:
        f.write("".join(f"ListenAddress {a}:{port}\n" for a in addrs))
        f.write(f"HostKey {d}/host_key\nPidFile {d}/{name}.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nMaxStartups 100\n")
    return path


@contextlib.contextmanager
def ssh_nodes(venv: str = sys.prefix):
    """sshd on 127.0.0.1 + 127.0.0.2 (the venv visible) and 127.0.0.3 (the venv hidden), one port."""
    if os.path.realpath(venv) == os.path.realpath(sys.base_prefix):
        pytest.skip("the multinode tests hide the venv from one node: run them from a venv")
    ensure_packages("ssh")
    d = tempfile.mkdtemp(prefix="megatrain-sshd-")
    port = free_port()
    sh(f"ssh-keygen -q -t ed25519 -N '' -f {d}/host_key && ssh-keygen -q -t ed25519 -N '' -f {d}/id_ed25519 "
       f"&& cp {d}/id_ed25519.pub {d}/authorized_keys")
    os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir (the image's policy-rc.d never made it)
    sshd = which("sshd")
    nodes = SshNodes(["127.0.0.1", "127.0.0.2"], "127.0.0.3", "127.0.0.4", port,
                     [f"{d}/main.log", f"{d}/novenv.log"])
    client = (f"Host 127.0.0.1 127.0.0.2 127.0.0.3 127.0.0.4\n  Port {port}\n  IdentityFile {d}/id_ed25519\n"
              "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
              "  ConnectTimeout 5\n")
    try:
        sh(f"{sshd} -f {_sshd_config(d, 'main', nodes.nodes, port)} -E {d}/main.log")
        # The node without the venv: same machine, but its sshd sees an empty directory where the venv is.
        sh(f"unshare --mount --propagation private sh -c 'mount -t tmpfs none {venv} && exec {sshd} "
           f"-f {_sshd_config(d, 'novenv', [nodes.no_venv], port)} -E {d}/novenv.log'")
        with ssh_client_config(client):
            for host in nodes.nodes + [nodes.no_venv]:
                wait_for(lambda: sh(f"ssh {host} true", check=False).returncode == 0, 20, f"sshd on {host}")
            yield nodes
    finally:
        kill_pidfile(f"{d}/main.pid")
        kill_pidfile(f"{d}/novenv.pid")
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class SlurmCluster:
    conf: str            # slurm.conf, found by the client commands through SLURM_CONF
    nodes: dict          # name -> address
    gloo_ifname: str     # the node-side interface name (the same in every namespace)
    dir: str

    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=self.conf, GLOO_SOCKET_IFNAME=self.gloo_ifname)

    def run(self, cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, shell=True, check=check, text=True, capture_output=True, env=self.env())

    def nodes_idle(self) -> bool:
        """Every node idle: no job on it, none completing."""
        states = self.run("sinfo -h -N -o %T", check=False).stdout.split()
        return len(states) == len(self.nodes) and all(s == "idle" for s in states)

    def logs(self, lines: int = 15) -> str:
        """The tail of every daemon log, for a failure message."""
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                tail = open(os.path.join(self.dir, name), errors="replace").read().splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(out)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run(f"scontrol show job {job_id} -o", check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


NET = "10.199.1"  # the test network: the bridge is .1, node i is .1i


def _slurm_conf(d: str, nodes: dict, munge_socket: str) -> str:
    lines = [
        "ClusterName=megatrain-test", f"SlurmctldHost={socket.gethostname()}({NET}.1)", f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        f"AuthInfo=socket={munge_socket}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none", "MpiDefault=none", "ReturnToService=2", "JobRequeue=1", "KillWait=20",
        "MinJobAge=600", "SlurmdTimeout=60", "InactiveLimit=0", "SchedulerParameters=sched_interval=2",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n", f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd-%n.pid", f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
        *(f"NodeName={n} NodeAddr={a} CPUs=2 RealMemory=4000 State=UNKNOWN" for n, a in nodes.items()),
        f"PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2",
    ]
    path = os.path.join(d, "slurm.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def slurm_cluster(n_nodes: int = 2):
    """munged + slurmctld on a bridge, one slurmd per network namespace (node n1 at 10.199.1.11, ...)."""
    ensure_packages("slurm")
    d = tempfile.mkdtemp(prefix="megatrain-slurm-")
    os.chmod(d, 0o755)
    tag = f"mt{os.getpid() % 10000}"
    bridge, nodes = f"{tag}br", {f"n{i}": f"{NET}.{10 + i}" for i in range(1, n_nodes + 1)}
    munge_dir = os.path.join(d, "munge")
    os.makedirs(munge_dir, mode=0o755)
    for sub in ["state", *(f"spool/{n}" for n in nodes)]:
        os.makedirs(os.path.join(d, sub))
    try:
        sh(f"ip link add {bridge} type bridge && ip addr add {NET}.1/24 dev {bridge} && ip link set {bridge} up")
        for n, addr in nodes.items():
            ns = f"{tag}-{n}"
            sh(f"ip netns add {ns} && ip link add {ns}h type veth peer name eth0 netns {ns} && "
               f"ip link set {ns}h master {bridge} up && ip -n {ns} addr add {addr}/24 dev eth0 && "
               f"ip -n {ns} link set eth0 up && ip -n {ns} link set lo up")
        socket_path = f"{munge_dir}/munge.socket"
        sh(f"mungekey --create --keyfile={d}/munge.key && chmod 600 {d}/munge.key && munged --force "
           f"--key-file={d}/munge.key --socket={socket_path} --pid-file={d}/munged.pid --log-file={d}/munged.log "
           f"--seed-file={d}/munge.seed")
        conf = _slurm_conf(d, nodes, socket_path)
        env = f"SLURM_CONF={conf}"
        sh(f"{env} slurmctld -f {conf} -i")
        for n in nodes:
            sh(f"{env} nsenter --net=/run/netns/{tag}-{n} slurmd -f {conf} -N {n}")
        cluster = SlurmCluster(conf, nodes, "eth0", d)
        wait_for(cluster.nodes_idle, 60, "slurm nodes idle",
                 lambda: f"sinfo: {cluster.run('sinfo', check=False).stdout}\n{cluster.logs()}")
        yield cluster
    finally:
        for pidfile in [f"{d}/slurmd-{n}.pid" for n in nodes] + [f"{d}/slurmctld.pid", f"{d}/munged.pid"]:
            kill_pidfile(pidfile)
        for n in nodes:  # a job step still running in a namespace goes with it
            pids = sh(f"ip netns pids {tag}-{n}", check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
            sh(f"ip netns del {tag}-{n}", check=False)
        sh(f"ip link del {bridge}", check=False)
        shutil.rmtree(d, ignore_errors=True)
