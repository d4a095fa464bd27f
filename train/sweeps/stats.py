"""Statistics of a sweep report: Student-t intervals over seeds and the learning-rate choice.

No SciPy: the t quantile inverts the t CDF, written with the regularized incomplete beta function
(continued fraction of Numerical Recipes, Press et al. 2007, section 6.4; Lentz's method).
"""

import dataclasses
import functools
import math

import numpy as np


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
  """I_x(a, b) for 0 <= x <= 1 and a, b > 0, to ~1e-14 (continued fraction, NR eq. 6.4.5)."""
  if not 0.0 <= x <= 1.0:
    raise ValueError(f"regularized_incomplete_beta: x={x} must lie in [0, 1].")
  if x in (0.0, 1.0):
    return x
  log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
  if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point: use the symmetry
    return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
  tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  fraction = d
  for m in range(1, 500):
    for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + numerator * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + numerator / c
      c = c if abs(c) > tiny else tiny
      fraction *= c * d
    if abs(c * d - 1.0) < 1e-15:
      break
  return math.exp(log_front) * fraction / a


def student_t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with `df` degrees of freedom (df = inf: the standard normal)."""
  if df <= 0:
    raise ValueError(f"student_t_cdf: df={df} must be positive.")
  if math.isinf(df):
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))
  upper_tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
  return 1.0 - upper_tail if t >= 0 else upper_tail


@functools.lru_cache(maxsize=256)
def t_quantile(probability: float, df: float) -> float:
  """The t with student_t_cdf(t, df) = probability (e.g. t_quantile(0.975, 2) = 4.303), by bisection."""
  if not 0.0 < probability < 1.0:
    raise ValueError(f"t_quantile: probability={probability} must lie strictly between 0 and 1.")
  if probability < 0.5:
    return -t_quantile(1.0 - probability, df)
  low, high = 0.0, 1.0
  while student_t_cdf(high, df) < probability:
    low, high = high, 2.0 * high
  for _ in range(200):
    middle = 0.5 * (low + high)
    if middle in (low, high):
      break
    low, high = (middle, high) if student_t_cdf(middle, df) < probability else (low, middle)
  return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean, sample standard deviation (ddof = 1) and two-sided t-interval of the mean over n values.

  std and the interval are NaN for n = 1 (no spread to estimate); everything is NaN for n = 0.
  """

  n: int
  mean: float
  std: float
  ci_low: float
  ci_high: float


def summarize(values, confidence: float = 0.95) -> Summary:
  """Summary of `values` over seeds; NaN entries (a metric a run did not log) are left out."""
  array = np.asarray(values, np.float64).ravel()
  array = array[~np.isnan(array)]
  n = int(array.size)
  if n == 0:
    return Summary(0, math.nan, math.nan, math.nan, math.nan)
  mean = float(array.mean())
  if n == 1:
    return Summary(1, mean, math.nan, math.nan, math.nan)
  std = float(array.std(ddof=1))
  half_width = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
  return Summary(n, mean, std, mean - half_width, mean + half_width)


@dataclasses.dataclass(frozen=True)
class LearningRateChoice:
  """The learning rate whose seed-mean of the selection metric is best, among those tried at one point.

  seed_means maps every tried learning rate to its mean (NaN where no finished run logged the metric);
  at_edge is True when more than one rate was tried and the chosen one is the smallest or the largest,
  so the optimum may lie outside the grid. learning_rate is None when no rate has a finite mean.
  """

  learning_rate: float | None
  at_edge: bool
  seed_means: dict


def choose_learning_rate(values_by_rate: dict, mode: str) -> LearningRateChoice:
  """values_by_rate: {learning rate: [selection metric of each finished seed]}, every tried rate a key.

  mode 'max' or 'min'. Ties go to the smaller learning rate (argmax / argmin over ascending rates).
  """
  if mode not in ("max", "min"):
    raise ValueError(f"select_mode={mode!r} must be 'max' or 'min'.")
  rates = sorted(values_by_rate)
  means = {}
  for rate in rates:
    values = np.asarray(values_by_rate[rate], np.float64).ravel()
    values = values[~np.isnan(values)]
    means[rate] = float(values.mean()) if values.size else math.nan
  finite = [rate for rate in rates if not math.isnan(means[rate])]
  if not finite:
    return LearningRateChoice(None, False, means)
  scores = np.array([means[rate] for rate in finite])
  chosen = finite[int(np.argmax(scores) if mode == "max" else np.argmin(scores))]
  at_edge = len(rates) > 1 and chosen in (rates[0], rates[-1])
  return LearningRateChoice(chosen, at_edge, means)


def metric_direction(name: str) -> str | None:
  """'max' for accuracies, 'min' for losses, bits per byte and perplexities, None where "best" has no meaning."""
  leaf = name.rsplit("/", 1)[-1]
  if "accuracy" in leaf:
    return "max"
  if "loss" in leaf or leaf in ("bits_per_byte", "perplexity"):
    return "min"
  return None


def seed_curves(series: list) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values [n_seeds, n_steps]) of the steps every one of `series` ((steps, values) arrays in step
  order, one per seed) logged; series with no point are left out. ([], [0, 0]) when none has a point."""
  curves = [(np.asarray(steps), np.asarray(values, np.float64)) for steps, values in series if len(steps)]
  if not curves:
    return np.zeros(0, np.int64), np.zeros((0, 0), np.float64)
  common = curves[0][0]
  for steps, _ in curves[1:]:
    common = np.intersect1d(common, steps)
  return common, np.stack([values[np.searchsorted(steps, common)] for steps, values in curves])
