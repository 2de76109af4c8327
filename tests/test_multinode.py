"""`megatrain launch` for real: DeepSpeed's pdsh + ssh launcher across two "nodes" (127.0.0.1, 127.0.0.2).

Marked `multinode`: needs root and apt (the fixture installs openssh-server and pdsh), ~1.5 minutes.
"""
import socket
from pathlib import Path

import pytest

from megatrain.launch.hostfile import hostfile_text
from megatrain.training.dist_env import free_port

from cluster import launch, single_node_run, ssh_nodes
from training_utils import assert_close_curves, losses, make_byte_dataset, set_args, small_sets

pytestmark = pytest.mark.multinode
LAUNCHERS = Path(__file__).resolve().parent.parent / "launchers"


@pytest.fixture(scope="module")
def nodes():
    with ssh_nodes() as n:
        yield n


def sets_for(tmp_path, data, name):
    return set_args(small_sets(data, str(tmp_path / name), **{"train.max_steps": 6}))


def test_two_node_hostfile_launch_equals_single_node(nodes, tmp_path):
    data = make_byte_dataset(tmp_path)
    single_node_run(tmp_path, sets_for(tmp_path, data, "single"))
    (tmp_path / "hostfile").write_text(hostfile_text(nodes.nodes, 1))
    multi = launch([str(LAUNCHERS / "hostfile_launch.sh"), "hostfile", "pretrain", "--config", "tiny",
                    *sets_for(tmp_path, data, "multi")], tmp_path, env={"MASTER_PORT": str(free_port())})
    assert multi.returncode == 0, multi.stdout[-4000:]
    assert "preflight: 2 host(s) ready" in multi.stdout
    # pdsh prefixes each line with the host it came from: both nodes ran a rank of the one job.
    for host in nodes.nodes:
        assert f"{host}: " in multi.stdout and "nnodes=2" in multi.stdout, multi.stdout[-4000:]
    env_file = (tmp_path / ".deepspeed_env").read_text().splitlines()
    assert "DS_ACCELERATOR=cpu" in env_file and "OMP_NUM_THREADS=1" in env_file
    assert all(line and not line.startswith("#") for line in env_file)

    want, got = losses(str(tmp_path / "single")), losses(str(tmp_path / "multi"))
    print(f"\n2 nodes vs 1 node: losses {[round(got[s], 4) for s in sorted(got)]}, "
          f"max |difference| {max(abs(got[s] - want[s]) for s in want):.2e}")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert_close_curves(want, got, rtol=1e-6)
    assert_close_curves(losses(str(tmp_path / "single"), "eval"), losses(str(tmp_path / "multi"), "eval"), rtol=1e-6)


def test_preflight_names_each_bad_host_in_one_line(nodes, tmp_path):
    data = make_byte_dataset(tmp_path)
    hosts = [nodes.nodes[0], nodes.no_venv, nodes.unreachable]
    (tmp_path / "hostfile").write_text(hostfile_text(hosts, 1))
    with socket.socket() as busy:  # the master port, taken on the first host
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = launch([str(LAUNCHERS / "hostfile_launch.sh"), "hostfile", "pretrain", "--config", "tiny",
                    *sets_for(tmp_path, data, "ckpt"), "--set", f"data.path={tmp_path}/nowhere"], tmp_path, timeout=120,
                   env={"MASTER_PORT": str(port)})
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 1, r.stdout
    assert len(lines) == 5, r.stdout
    assert all(line.startswith("preflight: ") for line in lines), r.stdout
    by_host = {h: [line for line in lines if line.startswith(f"preflight: {h}: ")] for h in hosts}
    assert any("no venv at" in line for line in by_host[nodes.no_venv]), r.stdout
    assert any("not reachable over ssh" in line for line in by_host[nodes.unreachable]), r.stdout
    first = " ".join(by_host[nodes.nodes[0]])
    assert f"master port {port} is taken" in first and f"{tmp_path}/nowhere.bin not found" in first, r.stdout
    assert not (tmp_path / ".deepspeed_env").exists()  # nothing launched, nothing written
