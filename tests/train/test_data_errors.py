"""train/data.py errors not covered by test_data.py: short splits, foreign iterator states, scattered batch rows."""

import jax
import numpy as np
import pytest

from sparseformer.train import data
from sparseformer.train.corpus import Corpus
from sparseformer.train.data_config import DataConfig


def _corpus(num_tokens: int, sha: str = "a" * 64) -> Corpus:
  tokens = np.arange(num_tokens, dtype=np.uint16) % 256
  return Corpus(train_tokens=tokens, val_tokens=tokens[:0], metadata={"content_sha256": sha})


def _config(**changes) -> DataConfig:
  return DataConfig(**{"path": "unused.npy", "seq_len": 7, "batch_size": 2, "num_val_batches": 0} | changes)


def test_a_training_split_shorter_than_one_window_is_rejected():
  with pytest.raises(ValueError, match=r"training split holds 7 tokens, fewer than data.seq_len \+ 1 = 8; "
                                       r"lower data.seq_len"):
    data.TrainBatches(_corpus(7), _config())
  data.TrainBatches(_corpus(8), _config())  # exactly one window is enough


def test_set_state_names_the_field_of_another_data_order():
  state = data.TrainBatches(_corpus(100), _config()).get_state()
  with pytest.raises(ValueError, match=r"checkpoint has seq_len=7 but this run has 9; restore data.seq_len"):
    data.TrainBatches(_corpus(100), _config(seq_len=9)).set_state(state)
  with pytest.raises(ValueError, match=r"checkpoint has corpus_sha256='a+' but this run has 'b+'; restore "
                                       r"the training corpus contents"):
    data.TrainBatches(_corpus(100, sha="b" * 64), _config()).set_state(state)
  for bad in (-1, "3", 2.0):
    with pytest.raises(ValueError, match=rf"next_example={bad!r}; expected an int >= 0"):
      data.TrainBatches(_corpus(100), _config()).set_state(state | {"next_example": bad})


class _ScatteredSharding:
  """Duck-typed sharding whose local devices hold rows 0-1 and 4-5 of the batch (not process-major)."""

  def addressable_devices_indices_map(self, shape):
    return {0: (slice(0, 2), slice(None)), 1: (slice(4, 6), slice(None))}


def test_local_batch_shard_rejects_rows_that_are_not_one_block():
  with pytest.raises(ValueError, match=r"hold batch rows \[0, 1, 4, 5\]\.\.\. of data.batch_size=8, not one "
                                       r"contiguous block"):
    data.local_batch_shard(_ScatteredSharding(), _config(batch_size=8))
  mesh = jax.make_mesh((1,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert data.local_batch_shard(sharding, _config(batch_size=8)) == (0, 1)
