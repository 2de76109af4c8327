"""Tier 1: Slurm node lists -> DeepSpeed hostfiles, and reading hostfiles back."""
import subprocess
import sys

import pytest

from megatrain.launch.hostfile import HostfileError, expand_nodelist, hostfile_text, parse_hostfile


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
    with pytest.raises(HostfileError):
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


def test_hostfile_parsing(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text("# two nodes\nnode1 slots=8\n\n  node2   slots=4  \n")
    assert parse_hostfile(str(f)) == {"node1": 8, "node2": 4}


@pytest.mark.parametrize("text,needle", [
    ("node1 slots=8\nnode2\n", "line 2: 'node2' is not `HOST slots=N`"),
    ("node1 slots=0\n", "line 1"),
    ("node1 slots=8\nnode1 slots=8\n", "line 2: host node1 is listed twice"),
    ("# nothing\n\n", "names no host"),
])
def test_bad_hostfiles_say_which_line(tmp_path, text, needle):
    f = tmp_path / "hostfile"
    f.write_text(text)
    with pytest.raises(HostfileError, match=needle.replace("(", r"\(").replace("*", r"\*")):
        parse_hostfile(str(f))
