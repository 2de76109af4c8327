"""Tier 1: Slurm node lists -> DeepSpeed hostfiles."""
import subprocess
import sys

import pytest

from megatrain.launch.hostfile import NodeListError, expand_nodelist, hostfile_text


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("node[008-011]", ["node008", "node009", "node010", "node011"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("a,b, c", ["a", "b", "c"]),
])
def test_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu]1", "gpu[3-1]", "gpu[a-b]", ""])
def test_bad_lists(bad):
    with pytest.raises(NodeListError):
        expand_nodelist(bad)


def test_hostfile_cli(tmp_path):
    assert hostfile_text(["a", "b"], 4) == "a slots=4\nb slots=4\n"
    out = tmp_path / "hostfile"
    env = {"SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_GPUS_ON_NODE": "8", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "megatrain", "hostfile", "--output", str(out)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "gpu1 slots=8\ngpu2 slots=8\n"
    r = subprocess.run([sys.executable, "-m", "megatrain", "hostfile"], env={"PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no node list" in r.stderr and len(r.stderr.strip().splitlines()) == 1
