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
