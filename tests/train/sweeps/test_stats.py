"""train/sweeps/stats.py against closed forms, published t tables and NumPy."""

import math

import numpy as np
import pytest

from sparseformer.train.sweeps import stats

# Two-sided 95 % (and one 99 %) critical values from published t tables.
T_TABLE = [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 29, 2.045),
           (0.995, 3, 5.841), (0.95, 10, 1.812)]


@pytest.mark.parametrize("probability,df,expected", T_TABLE)
def test_t_quantile_matches_tables(probability, df, expected):
  assert abs(stats.t_quantile(probability, df) - expected) < 5e-4


def test_t_quantile_matches_closed_forms():
  for probability in (0.6, 0.9, 0.975, 0.999):
    cauchy = math.tan(math.pi * (probability - 0.5))  # df = 1
    two = (2 * probability - 1) / math.sqrt(2 * probability * (1 - probability))  # df = 2
    assert abs(stats.t_quantile(probability, 1) - cauchy) < 1e-9 * max(1.0, cauchy)
    assert abs(stats.t_quantile(probability, 2) - two) < 1e-9 * max(1.0, two)
    assert abs(stats.t_quantile(1 - probability, 2) + two) < 1e-9 * max(1.0, two)
  assert abs(stats.t_quantile(0.975, math.inf) - 1.959963984540054) < 1e-9
  assert abs(stats.t_quantile(0.975, 1e7) - 1.959963984540054) < 1e-5


def test_t_cdf_matches_closed_forms_and_incomplete_beta():
  for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
    assert abs(stats.student_t_cdf(t, 1) - (0.5 + math.atan(t) / math.pi)) < 1e-12
    assert abs(stats.student_t_cdf(t, 2) - (0.5 + t / (2 * math.sqrt(2 + t * t)))) < 1e-12
  # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b.
  for x in (0.1, 0.5, 0.93):
    assert abs(stats.regularized_incomplete_beta(x, 2.5, 1.0) - x**2.5) < 1e-12
    assert abs(stats.regularized_incomplete_beta(x, 1.0, 3.5) - (1 - (1 - x) ** 3.5)) < 1e-12
  # Far above the mean, where only the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) converges.
  assert abs(stats.regularized_incomplete_beta(0.995, 1.0, 30.0) - (1 - 0.005**30)) < 1e-12


def test_summarize_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  values = rng.normal(0.5, 0.2, size=5)
  summary = stats.summarize(list(values) + [math.nan])  # NaN = a metric one run did not log
  assert summary.n == 5
  half = 2.7764451051977987 * values.std(ddof=1) / math.sqrt(5)
  np.testing.assert_allclose([summary.mean, summary.std, summary.ci_low, summary.ci_high],
                             [values.mean(), values.std(ddof=1), values.mean() - half, values.mean() + half],
                             rtol=1e-9)


def test_summarize_of_one_and_none_has_no_spread():
  one = stats.summarize([0.25])
  assert one.n == 1 and one.mean == 0.25
  assert all(math.isnan(value) for value in (one.std, one.ci_low, one.ci_high))
  empty = stats.summarize([math.nan])
  assert empty.n == 0 and math.isnan(empty.mean)


def test_choose_learning_rate_is_argmax_of_seed_means(seed):
  rng = np.random.default_rng(seed)
  rates = [1e-3, 3e-3, 1e-2, 3e-2]
  values = {rate: list(rng.uniform(size=3)) for rate in rates}
  values[3e-2][1] = math.nan  # a seed that did not finish
  means = np.array([np.nanmean(values[rate]) for rate in rates])
  for mode, pick in (("max", np.argmax), ("min", np.argmin)):
    choice = stats.choose_learning_rate(values, mode)
    assert choice.learning_rate == rates[int(pick(means))]
    assert choice.at_edge == (int(pick(means)) in (0, len(rates) - 1))
    np.testing.assert_allclose([choice.seed_means[rate] for rate in rates], means, rtol=1e-12)


def test_choose_learning_rate_edge_flag():
  inside = stats.choose_learning_rate({1e-3: [0.1, 0.2], 3e-3: [0.8, 0.9], 1e-2: [0.3]}, "max")
  assert inside.learning_rate == 3e-3 and not inside.at_edge
  top = stats.choose_learning_rate({1e-3: [0.1], 3e-3: [0.2], 1e-2: [0.9]}, "max")
  assert top.learning_rate == 1e-2 and top.at_edge
  bottom = stats.choose_learning_rate({1e-3: [0.1], 3e-3: [0.2], 1e-2: [0.9]}, "min")
  assert bottom.learning_rate == 1e-3 and bottom.at_edge
  assert not stats.choose_learning_rate({1e-3: [0.5]}, "max").at_edge  # one rate: nothing to bracket
  # A rate whose runs all failed cannot be chosen but still counts as tried.
  failed_top = stats.choose_learning_rate({1e-3: [0.1], 3e-3: [0.5], 1e-2: [math.nan]}, "max")
  assert failed_top.learning_rate == 3e-3 and not failed_top.at_edge
  assert stats.choose_learning_rate({1e-3: [math.nan]}, "max").learning_rate is None
  with pytest.raises(ValueError, match="select_mode"):
    stats.choose_learning_rate({1e-3: [0.1]}, "maximum")


def test_metric_direction():
  assert stats.metric_direction("eval/example_accuracy") == "max"
  assert stats.metric_direction("eval/mqar_long/token_accuracy") == "max"
  assert stats.metric_direction("eval/loss") == "min"
  assert stats.metric_direction("eval/bits_per_byte") == "min"
  assert stats.metric_direction("train/tokens_per_second") is None


def test_seed_curves_keep_the_steps_every_seed_logged():
  first = (np.array([10, 20, 30, 40]), np.array([4.0, 3.0, 2.0, 1.0]))
  second = (np.array([10, 30, 40, 50]), np.array([5.0, 3.5, 2.5, 0.5]))
  steps, values = stats.seed_curves([first, second, (np.zeros(0, np.int64), np.zeros(0))])
  np.testing.assert_array_equal(steps, [10, 30, 40])
  np.testing.assert_array_equal(values, [[4.0, 2.0, 1.0], [5.0, 3.5, 2.5]])
  steps, values = stats.seed_curves([])
  assert steps.size == 0 and values.shape == (0, 0)
