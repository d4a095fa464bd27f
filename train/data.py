"""Deterministic, resumable batches of token windows, sharded over processes.

Usage (the trainer's input stage):

  corpus = data.load_corpus(config.data)              # seconds; cached tokenization
  index, count = data.local_batch_shard(batch_sharding, config.data)
  train_iter = data.TrainBatches(corpus, config.data, index, count)
  train_iter.set_state(restored_state)                # when resuming
  batch = data.to_global_batch(next(train_iter), batch_sharding)
  checkpoint["data"] = train_iter.get_state()         # a small JSON dict
  val = [data.to_global_batch(b, batch_sharding) for b in data.validation_batches(corpus, ...)]

Order. The training stream is cut into non-overlapping windows of `seq_len + 1` tokens
(inputs = window[:-1], targets = window[1:]). Every epoch draws a fresh offset in
[0, seq_len] for where the first window starts and a fresh permutation of the windows,
both from (seed, epoch) alone via NumPy's SeedSequence + PCG64 raw stream and an argsort
(stable across NumPy versions, unlike Generator.permutation). The infinite sequence of
examples is then cut into global batches of `batch_size`; a batch may straddle an epoch
boundary. Example `g` of the stream is window `perm_e[g % W]` of epoch `e = g // W`.

Processes. Global batch rows [p * B / P, (p + 1) * B / P) belong to process p, which
builds only those rows; `to_global_batch` assembles them into one jax.Array.

State. `get_state()` is {"next_example": g, ...}: the position in the example stream plus
what the order depends on, checked by `set_state`. The batch size is not part of it, so a
resumed run may change `batch_size` (or the process count) and still continue from the
next unseen example.

Tasks. `data.source="task"` generates examples instead (train/tasks/): `make_train_batches`,
`validation_sets` and `load_source` dispatch on the source, so the trainer reads every source alike.
Every batch carries `loss_mask` (float32 [B, T]): all ones for text, the labelled positions of a task.

Index arithmetic instead of grain: one gather per batch, a per-epoch random offset (which
grain's window sources do not give), and state that is one integer. Same contract as a
grain `MapDataset.shuffle(seed).repeat().batch()` iterator, with identical resume.
"""

from typing import Any

import jax
import numpy as np

from sparseformer.train.corpus import Corpus, load_corpus  # noqa: F401  (re-exported API)
from sparseformer.train.data_config import DataConfig  # noqa: F401  (re-exported API)

STATE_FORMAT = "sparseformer.data.TrainBatches/1"
_EPOCH_CACHE_SIZE = 4  # a batch spans at most a few epochs unless epochs are tiny


def _process_slice(config: DataConfig, process_index: int | None,
                   process_count: int | None) -> tuple[int, int]:
  """(first local row, local rows) of this process in a global batch, validated."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if config.batch_size % process_count:
    raise ValueError(f"data.batch_size={config.batch_size} must be divisible by the number of "
                     f"processes (data shards) {process_count}; set data.batch_size to a multiple "
                     f"of {process_count}.")
  local_rows = config.batch_size // process_count
  return process_index * local_rows, local_rows


def _windows_to_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
  """int32 inputs/targets [rows, seq_len] from token windows [rows, seq_len + 1], and an all-ones float32
  loss_mask (language modelling predicts every token)."""
  windows = windows.astype(np.int32)
  return {"inputs": np.ascontiguousarray(windows[:, :-1]),
          "targets": np.ascontiguousarray(windows[:, 1:]),
          "loss_mask": np.ones((windows.shape[0], windows.shape[1] - 1), np.float32)}


class TrainBatches:
  """Infinite iterator over this process's rows of the training batches.

  Yields dict(inputs=int32[B_local, seq_len], targets=int32[B_local, seq_len],
  loss_mask=float32 ones [B_local, seq_len]) with B_local = batch_size // process_count and
  targets[:, t] == inputs[:, t + 1] within the window's next token. Deterministic given (corpus, seq_len, seed); see module docstring.
  """

  def __init__(self, corpus: Corpus, config: DataConfig, process_index: int | None = None,
               process_count: int | None = None):
    self._tokens = corpus.train_tokens
    self._config = config
    self._row_start, self._local_rows = _process_slice(config, process_index, process_count)
    window = config.window_len
    num_tokens = int(self._tokens.size)
    if num_tokens < window:
      raise ValueError(f"The training split holds {num_tokens} tokens, fewer than data.seq_len + 1 "
                       f"= {window}; lower data.seq_len or use a larger corpus.")
    # Leave room for an offset of up to seq_len tokens; tiny corpora get one window, offset < slack.
    self.windows_per_epoch = max(1, (num_tokens - window + 1) // window)
    self._max_offset = min(window - 1, num_tokens - self.windows_per_epoch * window)
    self._corpus_id = corpus.metadata.get("content_sha256")
    self._epochs: dict[int, tuple[int, np.ndarray]] = {}
    self._next_example = 0

  # -- order

  def epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
    """(token offset of window 0, int64 permutation [windows_per_epoch]) of `epoch`."""
    if epoch not in self._epochs:
      if len(self._epochs) >= _EPOCH_CACHE_SIZE:
        self._epochs.pop(min(self._epochs))
      bits = np.random.PCG64(np.random.SeedSequence([self._config.seed, epoch]))
      raw = bits.random_raw(self.windows_per_epoch + 1)
      offset = int(raw[0] % np.uint64(self._max_offset + 1))
      self._epochs[epoch] = (offset, np.argsort(raw[1:], kind="stable"))
    return self._epochs[epoch]

  def window_starts(self, examples: np.ndarray) -> np.ndarray:
    """Token index where each global example (int64 [n]) begins in the training stream."""
    examples = np.asarray(examples, dtype=np.int64)
    epochs, positions = np.divmod(examples, self.windows_per_epoch)
    starts = np.empty_like(examples)
    for epoch in np.unique(epochs):
      offset, permutation = self.epoch_order(int(epoch))
      here = epochs == epoch
      starts[here] = offset + permutation[positions[here]] * self._config.window_len
    return starts

  # -- iteration

  def __iter__(self) -> "TrainBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    first = self._next_example + self._row_start
    examples = np.arange(first, first + self._local_rows, dtype=np.int64)
    starts = self.window_starts(examples)
    windows = self._tokens[starts[:, None] + np.arange(self._config.window_len)]
    self._next_example += self._config.batch_size
    return _windows_to_batch(windows)

  @property
  def epoch(self) -> float:
    """Epochs consumed so far (fractional), e.g. for logging."""
    return self._next_example / self.windows_per_epoch

  # -- checkpointing

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; identical on every process."""
    return {
        "format": STATE_FORMAT,
        "next_example": int(self._next_example),
        "seed": self._config.seed,
        "seq_len": self._config.seq_len,
        "train_tokens": int(self._tokens.size),
        "corpus_sha256": self._corpus_id,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from get_state). Raises ValueError when the data order it
    belongs to differs from this iterator's (other seed, seq_len or corpus)."""
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"Data iterator state has format {state.get('format')!r}, expected "
                       f"{STATE_FORMAT!r}; it was not written by TrainBatches.get_state().")
    current = self.get_state()
    for key, field in (("seed", "data.seed"), ("seq_len", "data.seq_len"),
                       ("train_tokens", "the training corpus (data.source / data.path / "
                                        "data.val_fraction)"),
                       ("corpus_sha256", "the training corpus contents")):
      if state.get(key) != current[key]:
        raise ValueError(f"Cannot resume the data order: the checkpoint has {key}={state.get(key)!r} "
                         f"but this run has {current[key]!r}; restore {field} to the checkpoint's "
                         f"value, or start a fresh run in a new workdir.")
    next_example = state["next_example"]
    if not isinstance(next_example, int) or next_example < 0:
      raise ValueError(f"Data iterator state has next_example={next_example!r}; expected an int >= 0.")
    self._next_example = next_example


def validation_batches(corpus: Corpus, config: DataConfig, process_index: int | None = None,
                       process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """The fixed validation set: this process's rows of up to `num_val_batches` batches.

  Batch b holds validation windows [b * B, (b + 1) * B) taken back to back from the start
  of the split (no offset, no shuffle); only full batches are used, so every process
  returns the same number of batches of shape [B_local, seq_len] (same dict as training).
  """
  row_start, local_rows = _process_slice(config, process_index, process_count)
  window = config.window_len
  num_batches = min(config.num_val_batches,
                    int(corpus.val_tokens.size) // (window * config.batch_size))
  if num_batches == 0:
    return []
  windows = np.asarray(corpus.val_tokens[:num_batches * config.batch_size * window])
  windows = windows.reshape(num_batches, config.batch_size, window)
  return [_windows_to_batch(batch[row_start:row_start + local_rows]) for batch in windows]


# -- dispatch over sources (text corpora and tasks)

def load_source(config: DataConfig) -> Corpus | None:
  """The tokenized corpus of a text source, or None for a task (which generates its examples)."""
  return None if config.resolved_source == "task" else load_corpus(config)


def make_train_batches(config: DataConfig, corpus: Corpus | None, process_index: int | None = None,
                       process_count: int | None = None):
  """The training iterator of `config`'s source: TrainBatches over `corpus`, or tasks.TaskBatches."""
  if config.resolved_source == "task":
    from sparseformer.train.tasks import batches as task_batches  # pylint: disable=import-outside-toplevel  (cycle)

    return task_batches.TaskBatches(config, process_index, process_count)
  return TrainBatches(corpus, config, process_index, process_count)


def validation_sets(config: DataConfig, corpus: Corpus | None, process_index: int | None = None,
                    process_count: int | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
  """{mix name: this process's rows of each validation batch}: "" is the validation set (logged eval/*);
  a task adds one entry per extra evaluation mix (eval/<mix>/*)."""
  if config.resolved_source == "task":
    from sparseformer.train.tasks import batches as task_batches  # pylint: disable=import-outside-toplevel  (cycle)

    return task_batches.validation_sets(config, process_index, process_count)
  return {"": validation_batches(corpus, config, process_index, process_count)}


def local_batch_shard(sharding: jax.sharding.Sharding, config: DataConfig) -> tuple[int, int]:
  """(process_index, process_count) to give TrainBatches so that each process builds the
  rows its devices hold under `sharding` of a [batch_size, seq_len] batch.

  With the batch sharded over processes this is (jax.process_index(), jax.process_count());
  where processes hold replicas (e.g. a mesh axis over hosts that the batch is not split
  on) several processes get the same shard. Raises ValueError when this process's rows are
  not one contiguous, evenly sized block (a mesh whose devices are not process-major).
  """
  batch_size = config.batch_size
  index_map = sharding.addressable_devices_indices_map((batch_size, config.seq_len))
  rows: set[int] = set()
  for index in index_map.values():
    rows.update(range(*index[0].indices(batch_size)))
  first, count = min(rows), len(rows)
  if sorted(rows) != list(range(first, first + count)) or batch_size % count or first % count:
    raise ValueError(f"This process's devices hold batch rows {sorted(rows)[:8]}... of "
                     f"data.batch_size={batch_size}, not one contiguous block; build the mesh "
                     f"with devices in process order (jax.make_mesh does) or change data.batch_size.")
  return first // count, batch_size // count


def to_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                    global_batch_size: int | None = None) -> dict[str, jax.Array]:
  """Turns this process's rows (from TrainBatches / validation_batches) into global arrays
  of shape [global_batch_size, seq_len] with `sharding` (inferred size when None)."""
  arrays = {}
  for name, local in batch.items():
    shape = None if global_batch_size is None else (global_batch_size,) + local.shape[1:]
    arrays[name] = jax.make_array_from_process_local_data(sharding, local, shape)
  return arrays
