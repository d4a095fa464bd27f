"""Batches of task examples: a resumable training stream and the fixed validation set of every evaluation mix.

Example `g` of a split is a pure function of (data.seed, data.task, split, g) (train/tasks/rng.py): the
training stream is examples 0, 1, 2, ... of the "train" split, never repeating, cut into global batches of
data.batch_size; process p builds rows [p B / P, (p + 1) B / P) of each (train/data.py `_process_slice`). The
state is one integer, the next example, as for data.TrainBatches. Validation batch b of a mix holds examples
[b B, (b + 1) B) of the "validation" split, generated with that mix's settings.
"""

import dataclasses
from typing import Any

import numpy as np

from sparseformer.train import data as data_lib
from sparseformer.train.data_config import DataConfig
from sparseformer.train.tasks import copy, listops, mqar, passkey, rng
from sparseformer.train.tasks.config import Mix

STATE_FORMAT = "sparseformer.tasks.TaskBatches/1"
MAX_ROUNDS = 64  # a split's share is >= 10 %: a legitimate example is missed after 64 rounds with p < 1e-29
GENERATORS = {"mqar": mqar.generate, "listops": listops.generate, "passkey": passkey.generate,
              "copy": copy.generate}


def examples(task: str, task_config, seq_len: int, seed: int, split: str, indices) -> dict[str, np.ndarray]:
  """int32 inputs / targets and float32 loss_mask [n, seq_len] of examples `indices` of `split`.

  Example g is the first of its draws (attempt 0, 1, ...) whose content hashes into the split's buckets, so
  the splits never share an example (rng.in_split); the attempts are part of the pure function of g. Each
  round tries `per_round` attempts of every pending example at once (about 1 / the split's share).
  """
  indices = np.asarray(indices, np.int64)
  base = rng.base_key(seed, task, split)
  per_round = -(-rng.NUM_BUCKETS // len(rng.SPLIT_BUCKETS[split]))
  pending = np.arange(indices.size)
  batch, first_attempt = None, 0
  while pending.size:
    if first_attempt >= MAX_ROUNDS * per_round:
      raise ValueError(f"data.task={task!r}: no {split} example found in {first_attempt} draws; the settings "
                       f"({task_config}) allow too few distinct examples to split them into train / validation "
                       "/ test. Enlarge the task (more pairs, tokens, a larger vocabulary or seq_len).")
    attempts = np.arange(first_attempt, first_attempt + per_round)
    draws = rng.Draws(rng.example_keys(base, np.repeat(indices[pending], per_round),
                                       np.tile(attempts, pending.size)))
    drawn, content = GENERATORS[task](task_config, seq_len, draws)
    accepted = rng.in_split(content, split).reshape(pending.size, per_round)
    found = accepted.any(axis=1)
    chosen = np.arange(pending.size) * per_round + np.argmax(accepted, axis=1)  # the first accepted attempt
    if batch is None:
      batch = {name: np.empty((indices.size, seq_len), value.dtype) for name, value in drawn.items()}
    for name, value in drawn.items():
      batch[name][pending[found]] = value[chosen[found]]
    pending, first_attempt = pending[~found], first_attempt + per_round
  return batch


class TaskBatches:
  """Infinite iterator over this process's rows of the training batches of `config.task`.

  Yields dict(inputs=int32, targets=int32, loss_mask=float32), each [batch_size // process_count, seq_len];
  same interface and one-integer state contract as data.TrainBatches.
  """

  def __init__(self, config: DataConfig, process_index: int | None = None, process_count: int | None = None):
    self._config = config
    self._task_config = mixes(config)[0].task  # the training settings (eval mixes do not change the stream)
    self._row_start, self._local_rows = data_lib._process_slice(config, process_index, process_count)  # pylint: disable=protected-access
    self._next_example = 0

  def __iter__(self) -> "TaskBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    first = self._next_example + self._row_start
    batch = examples(self._config.task, self._task_config, self._config.seq_len, self._config.seed, "train",
                     np.arange(first, first + self._local_rows))
    self._next_example += self._config.batch_size
    return batch

  @property
  def examples_seen(self) -> int:
    """Training examples consumed so far (summed over processes); the stream never repeats one."""
    return self._next_example

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; identical on every process."""
    return {"format": STATE_FORMAT, "next_example": int(self._next_example), "seed": self._config.seed,
            "seq_len": self._config.seq_len, "task": self._config.task,
            "task_config": dataclasses.asdict(self._task_config)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from get_state). Raises ValueError when it belongs to another example stream."""
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"Data iterator state has format {state.get('format')!r}, expected {STATE_FORMAT!r}; it "
                       "was not written by TaskBatches.get_state() (was this run trained on another data.source?).")
    current = self.get_state()
    for key, field in (("seed", "data.seed"), ("seq_len", "data.seq_len"), ("task", "data.task"),
                       ("task_config", f"data.{self._config.task}.*")):
      stored = state.get(key)
      if key == "task_config" and isinstance(stored, dict):
        stored = {name: tuple(v) if isinstance(v, list) else v for name, v in stored.items()}
      if stored != current[key]:
        raise ValueError(f"Cannot resume the data order: the checkpoint has {key}={state.get(key)!r} but this "
                         f"run has {current[key]!r}; restore {field} to the checkpoint's value, or start a "
                         "fresh run in a new workdir.")
    next_example = state["next_example"]
    if not isinstance(next_example, int) or next_example < 0:
      raise ValueError(f"Data iterator state has next_example={next_example!r}; expected an int >= 0.")
    self._next_example = next_example


def mixes(config: DataConfig) -> list[Mix]:
  """The evaluation mixes: the validation mix (name "", the training settings) first, then data.<task>.eval_mixes."""
  return config.task_config.mixes(config.seq_len)


def validation_sets(config: DataConfig, process_index: int | None = None, process_count: int | None = None
                    ) -> dict[str, list[dict[str, np.ndarray]]]:
  """{mix name: this process's rows of num_val_batches validation batches}, the validation mix under ""."""
  row_start, local_rows = data_lib._process_slice(config, process_index, process_count)  # pylint: disable=protected-access
  sets = {}
  for mix in mixes(config):
    sets[mix.name] = [
        examples(config.task, mix.task, mix.seq_len, config.seed, "validation",
                 np.arange(b * config.batch_size + row_start, b * config.batch_size + row_start + local_rows))
        for b in range(config.num_val_batches)]
  return sets


def describe(config: DataConfig) -> str:
  """One line for the training log."""
  fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config.task_config).items() if v != ())
  names = [mix.name for mix in mixes(config)[1:]]
  return f"task {config.task} ({fields}), seq_len {config.seq_len}" + (
      f", eval mixes: validation + {', '.join(names)}" if names else "")
