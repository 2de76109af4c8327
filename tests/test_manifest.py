"""Checkpoint manifests (checkpoint/manifest.py): every file of a step folder with its size and CRC-32, written last;
a changed byte, a cut-short file or a lost one is found before a resume reads anything."""
import json
import os

import pytest

from megatrain.checkpoint.manifest import MANIFEST_FILE, check, write_manifest


def _folder(tmp_path):
    d = tmp_path / "step00000002"
    (d / "sub").mkdir(parents=True)
    (d / "a.pt").write_bytes(os.urandom(10_000))
    (d / "sub" / "b.safetensors").write_bytes(os.urandom(3_000))
    (d / "megatrain.json").write_text("{}")
    return d


def test_the_manifest_lists_every_file_with_its_size_and_crc(tmp_path):
    d = _folder(tmp_path)
    assert write_manifest(str(d)) is None
    files = json.loads((d / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == ["a.pt", "megatrain.json", os.path.join("sub", "b.safetensors")]
    assert files["a.pt"]["size"] == 10_000
    assert all(check(str(d), mode) is None for mode in ("full", "size", "none"))


def _flip(path, at: int = 100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_found_by_full_and_not_by_size(tmp_path):
    d = _folder(tmp_path)
    write_manifest(str(d))
    _flip(d / "sub" / "b.safetensors")
    problem = check(str(d), "full")
    assert "b.safetensors: its CRC-32 differs from the manifest's" in problem
    assert check(str(d), "size") is None and check(str(d), "none") is None


def test_a_truncated_or_missing_file_is_found_by_size(tmp_path):
    d = _folder(tmp_path)
    write_manifest(str(d))
    with open(d / "a.pt", "r+b") as f:
        f.truncate(9_000)
    assert "a.pt: 9,000 bytes, the manifest records 10,000" in check(str(d), "size")
    os.remove(d / "a.pt")
    assert "a.pt: missing" in check(str(d), "size")


def test_a_checkpoint_without_a_manifest_verifies_as_it_is(tmp_path):
    assert check(str(_folder(tmp_path)), "full") is None


@pytest.mark.slow
def test_resume_refuses_a_changed_rank_file_naming_it_and_the_previous_checkpoint(tmp_path):
    """A tiny pretraining run saves at steps 2 and 4; one byte flipped in each kind of rank file of step 4 (model
    states, ZeRO optimizer states, RNG) makes the rerun refuse in one line naming the file and step 2 (and `convert
    consolidate` and a checkpoint.init run, for the model file); with checkpoint.verify=size a cut-short file is
    refused too."""
    import shutil

    from test_reliability import cli, error_line, pretrain
    from training_utils import make_byte_dataset

    data = make_byte_dataset(tmp_path)
    ck = tmp_path / "ck"
    # (ZeRO-3: one rank's ZeRO-1/2 runs as ZeRO-0, whose optimizer state is inside the model states file)
    over = {"train.max_steps": 4, "train.eval_interval": 0, "checkpoint.interval": 2, "parallel.zero_stage": 3}
    assert pretrain(data, str(ck), **over).returncode == 0
    good = tmp_path / "good"
    shutil.copytree(ck / "step00000004", good)
    kinds = {"model": "zero_pp_rank_0_mp_rank_00_model_states.pt", "optimizer": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "rng": "rng_rank0.pt"}
    more = {**over, "train.max_steps": 6}
    for kind, name in kinds.items():
        assert (ck / "step00000004" / name).is_file(), sorted(os.listdir(ck / "step00000004"))
        _flip(ck / "step00000004" / name, at=os.path.getsize(ck / "step00000004" / name) // 2)
        line = error_line(pretrain(data, str(ck), **more))
        assert f"step00000004/{name}: its CRC-32 differs" in line and "latest at step00000002" in line, (kind, line)
        if kind == "model":  # every reader verifies the same way: convert, and checkpoint.init
            out = tmp_path / "consolidated"
            line = error_line(cli("convert", "consolidate", str(ck), "--output", str(out)))
            assert f"step00000004/{name}: its CRC-32 differs" in line and "step00000002" in line, line
            assert not out.exists()
            line = error_line(pretrain(data, str(tmp_path / "from-init"), **{**more, "checkpoint.init": str(ck)}))
            assert f"step00000004/{name}: its CRC-32 differs" in line and "step00000002" in line, line
        shutil.rmtree(ck / "step00000004")
        shutil.copytree(good, ck / "step00000004")
    with open(ck / "step00000004" / kinds["optimizer"], "r+b") as f:
        f.truncate(1000)
    line = error_line(pretrain(data, str(ck), **{**more, "checkpoint.verify": "size"}))
    assert "bytes, the manifest records" in line, line
