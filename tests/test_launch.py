"""Tier 1: `megatrain launch` pieces that need no ssh: .deepspeed_env, the command, the preflight's paths.

The preflight over ssh and the launch itself run for real in tests/test_multinode.py (marker multinode).
"""
import os
import subprocess
import sys

import pytest

from megatrain.launch.multinode import LaunchError, collect_env, deepspeed_command, entrypoint_paths, write_deepspeed_env


def test_forwarded_variables():
    environ = {"DS_ACCELERATOR": "cpu", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth1", "WANDB_MODE": "offline",
               "OMP_NUM_THREADS": "4", "PATH": "/usr/bin", "HOME": "/root", "WANDB_NOTES": 'say "hi"'}
    got, notices = collect_env(environ, ["HF_HOME=/shared/hf", "EXTRA=a b"])
    assert got == {"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0",
                   "OMP_NUM_THREADS": "4", "WANDB_MODE": "offline", "HF_HOME": "/shared/hf", "EXTRA": "a b"}
    assert len(notices) == 1 and "WANDB_NOTES" in notices[0]  # a quote would break DeepSpeed's remote shell line
    for bad in ["NOEQUALS", "1X=2", "X=$(rm -rf /)"]:
        with pytest.raises(LaunchError):
            collect_env({}, [bad])


def test_deepspeed_env_file_merges_and_drops_lines_deepspeed_cannot_parse(tmp_path):
    path = tmp_path / ".deepspeed_env"
    path.write_text("# mine\nNCCL_DEBUG=INFO\n\nOMP_NUM_THREADS=8\n")
    notices = write_deepspeed_env(str(path), {"OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"})
    lines = path.read_text().splitlines()
    assert lines == ["NCCL_DEBUG=INFO", "OMP_NUM_THREADS=2", "DS_ACCELERATOR=cpu"]
    assert notices == [f"dropped 2 blank/comment line(s) from {path} (DeepSpeed cannot parse them)"]
    assert os.stat(path).st_mode & 0o777 == 0o600
    for line in lines:  # DeepSpeed's runner reads each line as `key, val = line.split('=', maxsplit=1)`
        key, val = line.split("=", maxsplit=1)
        assert key and val


@pytest.mark.parametrize("tokenizer,path", [("byte", None), ("sp:/shared/tok.model", "/shared/tok.model"),
                                             ("hf:/shared/hf-tok", "/shared/hf-tok"), ("/shared/tok", "/shared/tok")])
def test_preflight_checks_the_files_the_run_reads(tokenizer, path):
    """The data files and the tokenizer the entrypoint's --config/--set name (the tokenizer's path without its
    `kind:` prefix), and the checkpoint dir."""
    paths, ckpt = entrypoint_paths("pretrain", ["--config", "tiny", "--set", "data.path=/shared/corpus",
                                                "--set", f"data.tokenizer={tokenizer}", "--set", "checkpoint.dir=/ck"])
    assert paths == ["/shared/corpus.bin", "/shared/corpus.idx"] + ([path] if path else []) and ckpt == "/ck"


def test_preflight_checks_what_a_finetune_run_reads():
    paths, ckpt = entrypoint_paths("finetune", ["--config", "finetune-classify", "--set", "finetune.init=/shared/lm",
                                                "--set", "finetune.train_file=/shared/t.jsonl",
                                                "--set", "finetune.valid_file=/shared/v.jsonl"])
    assert paths == ["/shared/lm", "/shared/t.jsonl", "/shared/v.jsonl"] and ckpt == "runs/finetune-classify"


def test_deepspeed_command():
    cmd = deepspeed_command("/h", "/venv", "node1", 29600, 2222, "pretrain", ["--config", "tiny", "--set", "a.b=1"])
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    joined = " ".join(cmd)
    for part in ["--hostfile /h", "--venv_script /venv/bin/activate", "--master_addr node1", "--master_port 29600",
                 "--ssh_port 2222", "--module megatrain.pretrain --config tiny --set a.b=1"]:
        assert part in joined


def megatrain(*args, cwd):
    return subprocess.run([sys.executable, "-m", "megatrain.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_errors_are_one_line_and_dry_run_writes_nothing(tmp_path):
    r = megatrain("launch", "--hostfile", "missing", "pretrain", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "hostfile missing: No such file or directory" in r.stderr

    (tmp_path / "hostfile").write_text("node1 slots=2\nnode2 slots=2\n")
    r = megatrain("launch", "--hostfile", "hostfile", "--skip-preflight", "--dry-run", "--env", "WANDB_MODE=offline",
                  "pretrain", "--config", "tiny", "--set", "train.max_steps=5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ".deepspeed_env: WANDB_MODE=offline" in r.stdout
    assert r.stdout.strip().splitlines()[-1].endswith("--master_addr node1 --master_port 29500 --module "
                                                      "megatrain.pretrain --config tiny --set train.max_steps=5")
    assert not (tmp_path / ".deepspeed_env").exists()

    if not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "megatrain", "finetune.py")):
        r = megatrain("launch", "--hostfile", "hostfile", "finetune", cwd=tmp_path)
        assert r.returncode == 1 and "has no megatrain.finetune entrypoint" in r.stderr


def test_entry_script_runs_a_module_like_dash_m():
    """DeepSpeed's slurm launcher runs `srun python SCRIPT`: megatrain/launch/entry.py stands in for -m."""
    import megatrain.launch.entry as entry

    r = subprocess.run([sys.executable, entry.__file__, "pretrain", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--config" in r.stdout and "--set" in r.stdout
