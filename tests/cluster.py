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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

APT_PACKAGES = {"ssh": ["openssh-server", "openssh-client", "pdsh"],
                "slurm": ["slurmctld", "slurmd", "slurm-client", "munge"]}
NEEDED_BINARIES = {"ssh": ["sshd", "ssh", "ssh-keygen", "pdsh"],
                   "slurm": ["slurmctld", "slurmd", "sbatch", "munged", "mungekey"]}


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


def kill_pidfile(path: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(open(path).read().split()[0])
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


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
    ensure_packages("ssh")
    from megatrain.training.dist_env import free_port

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
