"""Metric sinks (metrics.jsonl, TensorBoard) and the measured peak used for MFU."""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_matmul_peak(dtype: str = "float32", sizes: tuple[int, ...] | None = None, repeats: int = 5) -> float:
  """FLOP/s of the fastest jitted square matmul (best of `repeats` at each size) on the default device.

  The MFU denominator on CPU: what the machine really reaches (it tracks core count and SIMD width). Taking
  the best over sizes and repeats makes it an upper estimate on a noisy machine, so MFU errs low. On GPU/TPU
  pass `train.peak_flops` with the datasheet figure instead, or accept this measured lower bound.
  """
  sizes = sizes or ((1024, 2048) if jax.default_backend() == "cpu" else (8192,))
  matmul = jax.jit(lambda x, y: x @ y)
  best_flops = 0.0
  for size in sizes:
    a = jnp.ones((size, size), jnp.dtype(dtype))
    matmul(a, a).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, a).block_until_ready()
      best_flops = max(best_flops, 2.0 * size**3 / (time.perf_counter() - start))
  return best_flops


def _to_python(value):
  array = np.asarray(value)
  if array.ndim == 0:
    return array.item()
  return array.tolist()


class MetricsWriter:
  """Appends one JSON line per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

  Only process 0 writes. Vector metrics (e.g. per-expert load) go to JSONL as lists and to TensorBoard as
  one scalar per index plus a histogram.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, *, prefix: str = "") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({prefix + name: _to_python(value) for name, value in metrics.items()})
    with open(self.path, "a", encoding="utf-8") as file:
      file.write(json.dumps(record) + "\n")
    if self._tensorboard is not None:
      for name, value in record.items():
        if name in ("step", "time"):
          continue
        if isinstance(value, list):
          for index, item in enumerate(np.ravel(value)):
            self._tensorboard.add_scalar(f"{name}/{index}", float(item), step)
          self._tensorboard.add_histogram(name, np.asarray(value), step)
        elif isinstance(value, (int, float, bool)):
          self._tensorboard.add_scalar(name, float(value), step)
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of a run's metrics.jsonl (an empty list if there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as file:
    return [json.loads(line) for line in file if line.strip()]
