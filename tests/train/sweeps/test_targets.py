"""train/sweeps/targets.py: the first step a curve reaches a target, interpolated, on hand-made curves."""

import math
import types

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


class _Run:
  def __init__(self, seed, values, steps=(10, 20, 30)):
    self.seed, self._series = seed, (np.array(steps), np.array(values, np.float64))

  def series(self, metric):
    assert metric == "eval/accuracy"
    return self._series

  def final(self, metric):
    return float(self.series(metric)[1][-1])


def _point(variant, width, runs):
  return types.SimpleNamespace(variant=variant, point={"model.d_model": width}, runs=runs,
                               choice=types.SimpleNamespace(learning_rate=1e-3 if runs else None))


def test_steps_to_target_rising_metric_missing_reference_and_missing_runs():
  points = [_point("dense", 32, [_Run(0, [0.2, 0.4, 0.6]), _Run(1, [0.3, 0.5, 0.8])]),  # target 0.7
            _point("moe", 32, [_Run(0, [0.5, 0.7, 0.9]), _Run(1, [0.6, 0.8, 0.9])]),
            _point("late", 32, []),  # no finished run
            _point("dense", 64, []), _point("moe", 64, [_Run(0, [0.5, 0.7, 0.9])])]  # no target at d=64
  rows = targets.steps_to_target(points, "eval/accuracy", "dense", "max")
  dense, moe, late, dense_64, moe_64 = rows
  assert dense.target == pytest.approx(0.7) and dense.seed_steps[0] is None
  assert dense.seed_steps[1] == pytest.approx(20 + 10 * 0.2 / 0.3)
  assert dense.curve_steps == pytest.approx(30.0) and dense.speedup == pytest.approx(1.0)
  assert moe.seed_steps == [pytest.approx(20.0), pytest.approx(15.0)]  # 0.7 logged exactly; halfway 0.6 -> 0.8
  assert moe.summary.n == 2 and moe.summary.mean == pytest.approx(17.5)
  assert moe.curve_steps == pytest.approx(10 + 10 * (0.7 - 0.55) / (0.75 - 0.55))
  assert moe.speedup == pytest.approx(30.0 / moe.curve_steps)
  assert late.seed_steps == [] and late.curve_steps is None and late.speedup is None
  assert math.isnan(dense_64.target) and math.isnan(moe_64.target) and moe_64.seed_steps == []
  text = "\n".join(targets.markdown(rows, ["model.d_model"], "eval/accuracy", "dense", "max"))
  assert "first logged step at or above the target" in text
  assert "| late | 32 | – | 0.7 | – | no finished run | – | – |" in text
  assert "| moe | 64 | 0.001 | – | no target (dense has no finished run here) |" in text
