"""`megatrain plot`: the curves come from the right rows (a resumed run's later rows win), the PNG is written."""
import json
import struct
import subprocess
import sys

import pytest

from megatrain.config import ConfigError
from megatrain.plot import plot


def write_run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_curves_of_two_runs_one_resumed(tmp_path):
    a = write_run(tmp_path / "a", [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 11)]
                  + [{"step": 5, "kind": "eval", "val_loss": 4.0}, {"step": 10, "kind": "eval", "val_loss": 3.5}])
    # b stopped after step 6 (checkpoint at 4), resumed from 4: steps 5 and 6 are logged again, the later rows win
    rows = [{"step": s, "loss": 6.0, "lr": 1e-3} for s in range(1, 7)] + [{"step": 6, "kind": "stop", "reason": "SIGUSR1"}]
    rows += [{"step": s, "loss": 6.0 - s / 5, "lr": 1e-3} for s in range(5, 9)]
    b = write_run(tmp_path / "b", rows)
    out = tmp_path / "curves.png"
    drawn = plot([a, b], output=str(out))
    assert list(drawn) == ["loss", "val_loss", "lr", "tokens_per_s"]
    assert drawn["loss"][b]["steps"] == list(range(1, 9))
    assert drawn["loss"][b]["values"] == [6.0] * 4 + [6.0 - s / 5 for s in range(5, 9)]  # one seamless curve
    assert drawn["val_loss"][a] == {"steps": [5, 10], "values": [4.0, 3.5]} and b not in drawn["val_loss"]
    assert len(drawn["loss"][a]["smoothed"]) == 10 and drawn["loss"][a]["smoothed"][0] == 4.9
    assert b not in drawn["tokens_per_s"]
    w, h = png_size(out)
    assert w >= 1000 and h >= 800 and out.stat().st_size > 20_000
    drawn = plot([a], ["val_loss"], str(tmp_path / "one.png"))
    assert list(drawn) == ["val_loss"] and png_size(tmp_path / "one.png")[0] >= 600


def test_a_dpo_runs_training_rewards_get_panels_of_their_own(tmp_path):
    keys = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
    a = write_run(tmp_path / "a", [{"step": s, "loss": 0.7 - s / 100, "lr": 1e-3, "reward_accuracy": s / 10,
                                    "reward_margin": s / 5, "chosen_reward": s / 10, "rejected_reward": -s / 10}
                                   for s in range(1, 11)] + [{"step": 10, "kind": "eval", "val_loss": 0.6}])
    drawn = plot([a], output=str(tmp_path / "dpo.png"))
    assert list(drawn) == ["loss", "val_loss", "lr", *keys]
    for key in keys:  # per-batch figures: raw and smoothed, like the loss
        assert drawn[key][a]["values"][-1] == {"reward_accuracy": 1.0, "reward_margin": 2.0, "chosen_reward": 1.0,
                                               "rejected_reward": -1.0}[key]
        assert len(drawn[key][a]["smoothed"]) == 10


def test_bad_input(tmp_path):
    a = write_run(tmp_path / "a", [{"step": 1, "loss": 1.0}])
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        plot([str(tmp_path)], output=str(tmp_path / "x.png"))
    with pytest.raises(ConfigError, match="'val_acc': not in these runs' metrics.jsonl; known: loss"):
        plot([a], ["val_acc"], str(tmp_path / "x.png"))
    r = subprocess.run([sys.executable, "-m", "megatrain.cli", "plot", a, "--metric", "bogus"], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr.strip().startswith("megatrain plot: error: --metric 'bogus'")
    assert not (tmp_path / "x.png").exists()
