"""train/sweeps/targets.py: the first step a curve reaches a target, interpolated, on hand-made curves."""

import math

import numpy as np
import pytest

from sparseformer.train.sweeps import targets

STEPS = np.array([10, 20, 30, 40])


@pytest.mark.parametrize("values,target,direction,expected", [
    ([4.0, 3.0, 2.0, 1.0], 2.5, "min", 25.0),  # halfway between steps 20 and 30
    ([4.0, 3.0, 2.0, 1.0], 2.0, "min", 30.0),  # exactly on a logged value
    ([4.0, 3.0, 2.0, 1.0], 3.6, "min", 14.0),
    ([4.0, 3.0, 2.0, 1.0], 4.5, "min", 10.0),  # already there at the first logged step: no earlier point
    ([4.0, 3.0, 2.0, 1.0], 0.5, "min", None),  # never: not reached, no number
    ([0.1, 0.3, 0.6, 0.9], 0.5, "max", 20.0 + 10.0 * 2.0 / 3.0),
    ([0.1, 0.3, 0.6, 0.9], 0.95, "max", None),
    ([3.0, 1.0, 4.0, 0.5], 2.0, "min", 15.0),  # the first crossing, not a later one
    ([math.nan, 2.0, 1.0, 0.5], 3.0, "min", 20.0),  # nothing finite to interpolate from
    ([math.nan, math.nan, math.nan, math.nan], 3.0, "min", None),
])
def test_first_reach(values, target, direction, expected):
  got = targets.first_reach(STEPS, np.array(values), target, direction)
  if expected is None:
    assert got is None
  else:
    assert got == pytest.approx(expected, rel=1e-12)


def test_first_reach_matches_numpy_interp_on_random_falling_curves():
  rng = np.random.default_rng(0)
  steps = np.arange(1, 41) * 25
  for _ in range(20):
    values = 5.0 - np.cumsum(rng.uniform(0.01, 0.2, steps.size))  # strictly falling
    target = rng.uniform(values[-1] - 0.5, values[0])
    got = targets.first_reach(steps, values, target, "min")
    if target < values[-1]:
      assert got is None
    else:
      assert got == pytest.approx(np.interp(target, values[::-1], steps[::-1]), rel=1e-12)


def test_a_value_equal_to_the_target_up_to_rounding_reaches_it():
  assert 0.1 + 0.2 > 0.3  # 0.30000000000000004
  assert targets.first_reach(np.array([80]), np.array([0.1 + 0.2]), 0.3, "min") == 80.0
  assert not targets.reaches(0.3 * (1 + 1e-9), 0.3, "min") and not targets.reaches(0.3 * (1 - 1e-9), 0.3, "max")
