"""train/sweeps/train_metrics.py: per-run statistics against NumPy, pattern matching, list metrics skipped."""

import math
import types

import numpy as np
import pytest

from sparseformer.train.sweeps import report_options, train_metrics


@pytest.mark.parametrize("count", [1, 9, 10, 11, 30, 31])
def test_run_statistics_against_numpy(count):
  values = np.random.default_rng(count).normal(size=count)
  last = int(np.ceil(count / 10))  # the last 10 % of the logged points, at least one (30 -> 3, not 4)
  got = train_metrics.run_statistics(list(values))
  expected = {"mean": values.mean(), "last_10pct_mean": values[-last:].mean(), "final": values[-1], "max": values.max()}
  assert got.keys() == expected.keys()
  np.testing.assert_allclose([got[key] for key in expected], list(expected.values()), rtol=1e-12)


def test_run_statistics_nan_and_empty():
  assert all(math.isnan(value) for value in train_metrics.run_statistics([]).values())
  got = train_metrics.run_statistics([1.0, math.nan, 2.0])
  assert math.isnan(got["mean"]) and math.isnan(got["max"]) and got["final"] == 2.0  # NaN is never hidden


def _runs(*record_lists):
  return [types.SimpleNamespace(records=records) for records in record_lists]


def test_match_keeps_numbers_skips_lists_and_rejects_a_pattern_matching_nothing():
  runs = _runs([{"step": 1, "train/layer1/moe/max_violation": 0.5, "train/layer1/moe/expert_load": [0.5, 0.5]}],
               [{"step": 1, "train/layer3/moe/max_violation": 0.2, "train/loss": 3.0}])
  metrics, skipped = train_metrics.match(("train/layer*/moe/*", "train/loss", "train/layer1/moe/max_violation"),
                                         runs, "--train-metrics")
  assert metrics == ["train/layer1/moe/max_violation", "train/layer3/moe/max_violation", "train/loss"]
  assert skipped == [("train/layer1/moe/expert_load", "logged as list, not a number")]
  assert train_metrics.match(("train/layer1/moe/expert_load",), runs, "--train-metrics") == (
      [], [("train/layer1/moe/expert_load", "logged as list, not a number")])  # a note, not a crash
  where = report_options.sweep_key("train_metrics")
  with pytest.raises(ValueError, match=r"SWEEP\['report'\]\['train_metrics'\]: 'train/moe/\*' matches no metric "
                     r".* or pass --train-metrics to `sweep report`"):
    train_metrics.match(("train/moe/*",), runs, where)
  assert train_metrics.match(("train/moe/*",), _runs([], []), where) == ([], [])  # nothing logged yet
