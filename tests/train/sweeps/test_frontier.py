"""train/sweeps/frontier.py: the Pareto set on hand-made points and against a sort-based reference."""

import math

import numpy as np
import pytest

from sparseformer.train.sweeps import frontier


def test_pareto_front_on_hand_made_points():
  xs = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5]
  ys = [5.0, 3.0, 3.0, 4.0, 1.0, 1.0, math.nan, math.nan]
  # (2, 3) twice: neither beats the other; (3, 4) is beaten by the cheaper (2, 3); (5, 1) ties (4, 1) at a
  # higher cost; NaN points are never on it and beat nothing
  assert frontier.pareto_front(xs, ys, "min") == [True, True, True, False, True, False, False, False]
  assert frontier.pareto_front(xs, ys, "max") == [True, False, False, False, False, False, False, False]
  assert frontier.pareto_front([1.0, 1.0], [2.0, 1.0], "min") == [False, True]  # equal cost: the better one


def _reference(xs, ys, mode):
  """On the front: strictly better than every cheaper point, and the best of those at the same cost."""
  sign = 1.0 if mode == "min" else -1.0
  front = []
  for x, y in zip(xs, ys):
    cheaper = [sign * other for other_x, other in zip(xs, ys) if other_x < x]
    same = [sign * other for other_x, other in zip(xs, ys) if other_x == x]
    front.append(sign * y < min(cheaper, default=math.inf) and sign * y == min(same))
  return front


@pytest.mark.parametrize("mode", ["min", "max"])
def test_pareto_front_matches_the_sort_based_reference(mode):
  rng = np.random.default_rng(1)
  for _ in range(30):
    count = int(rng.integers(1, 12))
    xs = [float(value) for value in rng.integers(1, 6, count)]  # small ranges: many ties
    ys = [float(value) for value in rng.integers(1, 6, count)]
    assert frontier.pareto_front(xs, ys, mode) == _reference(xs, ys, mode), (xs, ys)


def test_load_function_names_the_problem():
  assert frontier.load_function("math:hypot", "--frontier-x") is math.hypot
  with pytest.raises(ValueError, match=r"--frontier-x='math:tau': math has no function 'tau'"):
    frontier.load_function("math:tau", "--frontier-x")  # a float, not callable
  with pytest.raises(ValueError, match=r"cannot import 'no_such_package_15\.x'"):
    frontier.load_function("no_such_package_15.x:f", "--frontier-x")


def test_the_sparse_lm_flops_function_has_the_signature():
  """sparseformer.experiments.sparse_lm:attention_flops_per_token, as the report calls it: (variant, overrides)."""
  function = frontier.load_function("sparseformer.experiments.sparse_lm:attention_flops_per_token", "--frontier-x")
  sets = ["train.learning_rate=0.003", "train.seed=0", "data.seed=0"]
  dense, local = function("global", ["model.attention_pattern=('global',)"] + sets), function("local", sets)
  assert 0 < local < dense
