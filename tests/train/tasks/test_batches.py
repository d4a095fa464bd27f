"""Tests of train/tasks/batches.py: the training stream's process slicing and resume state, validation mixes."""

import dataclasses
import json

import numpy as np
import pytest

from sparseformer.train import data
from sparseformer.train.data_config import DataConfig
from sparseformer.train.tasks import batches
from sparseformer.train.tasks.config import MQARConfig

CONFIG = DataConfig(source="task", task="mqar", seq_len=32, batch_size=8, num_val_batches=2,
                    mqar=MQARConfig(num_kv_pairs=4, vocab_size=64, eval_mixes=("long:8:64",)))


def test_processes_build_their_rows_of_the_same_global_batches(seed):
  config = dataclasses.replace(CONFIG, seed=seed)
  whole = data.make_train_batches(config, None, 0, 1)
  halves = [data.make_train_batches(config, None, p, 2) for p in range(2)]
  for _ in range(3):
    want = next(whole)
    got = [next(h) for h in halves]
    for name in ("inputs", "targets", "loss_mask"):
      np.testing.assert_array_equal(np.concatenate([g[name] for g in got]), want[name])
  # Global example g of the stream is example g of the train split, whatever the batching.
  direct = batches.examples("mqar", config.task_config.mixes(32)[0].task, 32, seed, "train", np.arange(24, 32))
  np.testing.assert_array_equal(next(whole)["inputs"], direct["inputs"])


def test_resume_from_state_continues_the_stream():
  straight = batches.TaskBatches(CONFIG, 0, 1)
  [next(straight) for _ in range(2)]
  state = straight.get_state()
  assert state["next_example"] == 16 and straight.examples_seen == 16
  resumed = batches.TaskBatches(CONFIG, 0, 1)
  resumed.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
  np.testing.assert_array_equal(next(resumed)["inputs"], next(straight)["inputs"])
  # A bigger batch after resuming continues from the next unseen example.
  bigger = batches.TaskBatches(dataclasses.replace(CONFIG, batch_size=16), 0, 1)
  bigger.set_state(state)
  np.testing.assert_array_equal(next(bigger)["inputs"][:8], next(_at(CONFIG, 16))["inputs"])


def _at(config, next_example):
  iterator = batches.TaskBatches(config, 0, 1)
  iterator.set_state({**iterator.get_state(), "next_example": next_example})
  return iterator


@pytest.mark.parametrize("changes, match", [
    (dict(seed=1), "seed=0 but this run has 1; restore data.seed"),
    (dict(mqar=MQARConfig(num_kv_pairs=5, vocab_size=64)), r"restore data.mqar.\*"),
])
def test_a_state_from_another_stream_is_refused(changes, match):
  state = batches.TaskBatches(CONFIG, 0, 1).get_state()
  with pytest.raises(ValueError, match=match):
    batches.TaskBatches(dataclasses.replace(CONFIG, **changes), 0, 1).set_state(state)
  with pytest.raises(ValueError, match="not written by TaskBatches"):
    batches.TaskBatches(CONFIG, 0, 1).set_state({"format": "sparseformer.data.TrainBatches/1", "next_example": 0})


def test_validation_sets_hold_every_mix_from_the_validation_split():
  sets = data.validation_sets(CONFIG, None, 0, 1)
  assert list(sets) == ["", "long"]
  assert [b["inputs"].shape for b in sets[""]] == [(8, 32)] * 2
  assert [b["inputs"].shape for b in sets["long"]] == [(8, 64)] * 2
  assert all(b["loss_mask"].sum() == 8 * 8 for b in sets["long"])  # 8 queries per example
  halves = [data.validation_sets(CONFIG, None, p, 2)["long"][1]["inputs"] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), sets["long"][1]["inputs"])
  train = next(data.make_train_batches(CONFIG, None, 0, 1))["inputs"]
  assert not {r.tobytes() for r in train} & {r.tobytes() for b in sets[""] for r in b["inputs"]}


def test_language_model_batches_carry_an_all_ones_mask():
  windows = np.arange(2 * 9).reshape(2, 9)
  batch = data._windows_to_batch(windows)  # pylint: disable=protected-access
  assert batch["loss_mask"].dtype == np.float32 and batch["loss_mask"].shape == (2, 8)
  assert (batch["loss_mask"] == 1).all()
  np.testing.assert_array_equal(batch["targets"], windows[:, 1:])
