"""logging.profile_step: one step profiled, its split logged, the run's numbers unchanged."""
import json
import os

import pytest

from distributed import run_distributed
from training_utils import losses, make_byte_dataset, run_configs, small_sets


def test_a_profiled_step_writes_its_table_trace_and_split_and_trains_as_unprofiled(tmp_path):
    data = make_byte_dataset(tmp_path)
    plain, profiled = str(tmp_path / "plain"), str(tmp_path / "profiled")
    short = {"train.max_steps": 3, "train.eval_interval": 0, "checkpoint.interval": 0}
    run_distributed(run_configs, 1, [small_sets(data, plain, **short),
                                     small_sets(data, profiled, **short, **{"logging.profile_step": 2})], timeout=300)
    assert losses(profiled) == losses(plain)  # bit for bit: the profiler only watches
    folder = os.path.join(profiled, "profile")
    assert sorted(os.listdir(folder)) == ["step2-rank0.trace.json", "step2-rank0.txt"]
    table = open(os.path.join(folder, "step2-rank0.txt")).read()
    assert "mkldnn::_linear_pointwise" in table or "aten::mm" in table  # (the linear layers' products, by backend)
    assert json.load(open(os.path.join(folder, "step2-rank0.trace.json")))["traceEvents"]
    rows = [json.loads(x) for x in open(os.path.join(profiled, "metrics.jsonl"))]
    (split,) = [r for r in rows if r.get("kind") == "profile"]
    assert split["step"] == 2 and split["timed"] == "cpu"
    assert 0 < split["matmul"] < 1 and split["attention"] >= 0
    assert split["matmul"] + split["attention"] + split["rest"] == pytest.approx(1.0)
    assert 0 < sum(split["top_rest"].values()) <= split["rest"] + 1e-9 and len(split["top_rest"]) == 5
    assert not os.path.exists(os.path.join(plain, "profile"))
