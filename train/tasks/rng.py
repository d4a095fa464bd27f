"""Counter-based randomness for task examples: each example is a pure function of (seed, task, split, index).

Example `index` of a split gets a 64-bit key, a hash of (seed, task, split, index, attempt); its random numbers
are the SplitMix64 stream (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators") that
starts at that key. Everything is uint64 arithmetic in NumPy, vectorised over examples: the same bits on every
process, machine and NumPy version, with no generator object per example (what makes batches cheap).

Splits are disjoint by construction: an example belongs to the split named by a hash of its content
(`content_bucket`), and a generator redraws (attempt + 1) until the content lands in its own split's buckets.
Equal content always hashes alike, so no example can appear in two splits, however small the example space.
"""

import numpy as np

SPLITS = {"train": 0, "validation": 1, "test": 2}
NUM_BUCKETS = 10
SPLIT_BUCKETS = {"test": (0,), "validation": (1,), "train": tuple(range(2, NUM_BUCKETS))}  # 10 / 10 / 80 %
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK53 = np.float64(2.0 ** -53)


def _mix(z: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijection of uint64 that scrambles every bit (arrays wrap silently mod 2^64)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def base_key(seed: int, task: str, split: str) -> np.uint64:
  """One uint64 per (seed, task, split), from NumPy's SeedSequence (stable across versions)."""
  task_id = int.from_bytes(task.encode(), "little")
  return np.random.SeedSequence([seed, task_id, SPLITS[split]]).generate_state(1, np.uint64)[0]


def example_keys(base: np.uint64, indices: np.ndarray, attempt: np.ndarray | int = 0) -> np.ndarray:
  """uint64 [n] stream keys of examples `indices` (int64 [n]) at redraw `attempt` (int or [n])."""
  indices = np.atleast_1d(np.asarray(indices, np.int64)).astype(np.uint64)
  attempt = np.broadcast_to(np.asarray(attempt, np.int64).astype(np.uint64), indices.shape)
  return _mix(_mix(_mix(indices * _GOLDEN) ^ base) + _mix(attempt + np.uint64(1)))


class Draws:
  """Random numbers of n examples: each call consumes the next `count` values of every example's stream."""

  def __init__(self, keys: np.ndarray):
    self.keys = np.asarray(keys, np.uint64)
    self._used = 0

  def bits(self, count: int) -> np.ndarray:
    """uint64 [n, count]."""
    steps = np.arange(self._used + 1, self._used + count + 1, dtype=np.uint64)
    self._used += count
    return _mix(self.keys[:, None] + steps[None, :] * _GOLDEN)

  def uniform(self, count: int) -> np.ndarray:
    """float64 [n, count] in [0, 1), 53 random bits each."""
    return (self.bits(count) >> np.uint64(11)).astype(np.float64) * _MASK53

  def integers(self, low, high, count: int) -> np.ndarray:
    """int64 [n, count] uniform in [low, high) (low / high: scalars or [n] arrays; bias below 2^-40)."""
    low = np.asarray(low, np.int64).reshape(-1, 1) if np.ndim(low) else np.int64(low)
    high = np.asarray(high, np.int64).reshape(-1, 1) if np.ndim(high) else np.int64(high)
    return low + np.floor(self.uniform(count) * (high - low)).astype(np.int64)

  def distinct(self, population: int, count: int) -> np.ndarray:
    """int64 [n, count]: `count` distinct values of [0, population) in uniformly random order.

    Floyd's algorithm (Bentley & Floyd 1987) gives a uniform subset in `count` vectorised rounds; a random
    argsort then gives it a uniform order.
    """
    n = self.keys.shape[0]
    bounds = np.arange(population - count, population, dtype=np.int64)
    picks = np.floor(self.uniform(count) * (bounds + 1)).astype(np.int64)  # pick i uniform in [0, bounds[i]]
    chosen = np.empty((n, count), np.int64)
    for i in range(count):
      taken = (chosen[:, :i] == picks[:, i:i + 1]).any(axis=1)
      chosen[:, i] = np.where(taken, bounds[i], picks[:, i])
    return np.take_along_axis(chosen, np.argsort(self.uniform(count), axis=1, kind="stable"), axis=1)

  def weighted_distinct(self, weights: np.ndarray, count: int) -> np.ndarray:
    """int64 [n, count]: successive sampling without replacement with probabilities ~ `weights` ([m] > 0),
    in the order drawn (as np.random.choice(m, count, replace=False, p=weights / weights.sum())), by the
    Gumbel-top-k trick (Kool, van Hoof & Welling 2019)."""
    gumbel = -np.log(-np.log(np.maximum(self.uniform(weights.shape[0]), 1e-300)))
    scores = np.log(weights)[None, :] + gumbel
    return np.argsort(-scores, axis=1, kind="stable")[:, :count]


def content_bucket(content: np.ndarray) -> np.ndarray:
  """int64 [n] bucket in [0, NUM_BUCKETS) of each row of int64 content [n, C] (a hash of the whole row)."""
  content = np.asarray(content, np.int64).astype(np.uint64)
  salts = _mix(np.arange(1, content.shape[1] + 1, dtype=np.uint64) * _GOLDEN)  # the column enters the hash
  hashed = _mix(np.sum(_mix(content ^ salts[None, :]), axis=1, dtype=np.uint64))
  return (hashed % np.uint64(NUM_BUCKETS)).astype(np.int64)


def in_split(content: np.ndarray, split: str) -> np.ndarray:
  """bool [n]: whether each example's content belongs to `split`."""
  return np.isin(content_bucket(content), SPLIT_BUCKETS[split])
