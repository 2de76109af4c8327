"""The shared test helpers themselves: a check that cannot fail proves nothing."""
import math

import pytest

from training_utils import assert_close_curves


def test_close_curves_pass():
    want = {1: 2.5, 2: 2.25, 3: 2.0}
    assert_close_curves(want, {1: 2.5, 2: 2.25 * (1 + 1e-7), 3: 2.0, 4: 9.0}, rtol=1e-6)  # extra steps in b: ignored
    assert_close_curves(want, {2: 2.25, 3: 2.0}, rtol=1e-6, steps=[2, 3])


def test_close_curves_fail_on_a_difference():
    with pytest.raises(AssertionError):
        assert_close_curves({1: 2.5, 2: 2.25}, {1: 2.5, 2: 2.3}, rtol=1e-6)


@pytest.mark.parametrize("a, b, steps", [
    ({}, {}, None),  # two runs that logged nothing
    ({}, {1: 2.5}, None),  # the reference logged nothing
    ({1: 2.5}, {1: 2.5}, []),  # no step asked for
])
def test_close_curves_fail_on_nothing_to_compare(a, b, steps):
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_close_curves(a, b, rtol=1e-6, steps=steps)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_close_curves_fail_on_a_non_finite_loss(bad):
    with pytest.raises(AssertionError, match="not finite"):  # on both sides: NaN == NaN must not count as a match
        assert_close_curves({1: 2.5, 2: bad}, {1: 2.5, 2: bad}, rtol=1e-6)
    with pytest.raises(AssertionError, match="not finite"):
        assert_close_curves({1: 2.5, 2: 2.25}, {1: 2.5, 2: bad}, rtol=1e-6)


def test_close_curves_fail_on_a_missing_step():
    with pytest.raises(AssertionError, match=r"steps \[2\] missing"):
        assert_close_curves({1: 2.5, 2: 2.25}, {1: 2.5}, rtol=1e-6)


# --- the no-pickle guard's checker ------------------------------------------------------------------------------

EVASIONS = {  # each unpickles freely; the checker must see every one
    "plain torch.load": "import torch\ntorch.load(p)",
    "weights_only off": "import torch\ntorch.load(p, weights_only=False)",
    "weights_only from a variable": "import torch\ntorch.load(p, weights_only=trusted)",
    "from torch import load": "from torch import load\nload(p)",
    "from torch import load as L": "from torch import load as L\nstate = L(p, map_location='cpu')",
    "import torch as t": "import torch as t\nt.load(p)",
    "torch.serialization.load": "import torch.serialization as ser\nser.load(p)",
    "getattr(torch, 'load')": "import torch\ngetattr(torch, 'load')(p)",
    "torch.load as a value": "import torch\nread = torch.load\nread(p, weights_only=True)",
    "torch.load inside a function": "def f(p):\n    import torch as tt\n    return tt.load(\n        p,\n    )",
    "pickle.load": "import pickle\npickle.load(f)",
    "pickle.loads": "import pickle\npickle.loads(b)",
    "import pickle as pk": "import pickle as pk\npk.loads(b)",
    "from pickle import loads as l": "from pickle import loads as l\nl(b)",
    "pickle.Unpickler": "from pickle import Unpickler\nUnpickler(f).load()",
    "_pickle": "import _pickle\n_pickle.loads(b)",
    "numpy allow_pickle": "import numpy as np\nnp.load(p, allow_pickle=True)",
}
SAFE = {  # read with weights_only=True, or not unpickling at all
    "torch.load weights_only": "import torch\ntorch.load(p, weights_only=True)",
    "alias, weights_only": "from torch import load as L\nL(p, map_location='meta', weights_only=True)",
    "pickle.dumps": "import pickle\nb = pickle.dumps(x)",
    "json.load": "import json\njson.load(f)",
    "a local load": "def load(p):\n    return p\nload(p)",
    "a comment and a string": "# torch.load(p)\ntext = 'pickle.loads(b)'",
}


@pytest.mark.parametrize("name", EVASIONS)
def test_pickle_guard_catches(name):
    from pickle_guard import unpickling_calls

    assert unpickling_calls(EVASIONS[name], "x.py"), EVASIONS[name]


@pytest.mark.parametrize("name", SAFE)
def test_pickle_guard_passes(name):
    from pickle_guard import unpickling_calls

    assert unpickling_calls(SAFE[name], "x.py") == [], SAFE[name]
