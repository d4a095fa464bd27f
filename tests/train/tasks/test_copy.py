"""Tests of train/tasks/copy.py against selective copying (Gu & Dao 2023, Mamba §3.1)."""

import itertools

import numpy as np
import pytest

from sparseformer.train.tasks import batches, rng
from sparseformer.train.tasks.config import CopyConfig

SEQ_LEN = 32
CONFIG = CopyConfig(num_tokens=5, vocab_size=10)


def test_examples_follow_the_definition(seed):
  batch = batches.examples("copy", CONFIG, SEQ_LEN, seed, "train", np.arange(300))
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
  body = SEQ_LEN - CONFIG.num_tokens
  marker = CONFIG.vocab_size - 1
  assert (inputs[:, body:] == marker).all() and (inputs[:, :body] != marker).all()
  np.testing.assert_array_equal(mask, np.repeat([[0.0] * body + [1.0] * CONFIG.num_tokens], 300, axis=0))
  for row in range(300):
    data_positions = np.flatnonzero(inputs[row, :body])
    assert len(data_positions) == CONFIG.num_tokens  # distinct positions, the rest noise (0)
    np.testing.assert_array_equal(targets[row, body:], inputs[row, data_positions])  # copied in order
  assert ((targets[:, body:] >= 1) & (targets[:, body:] < marker)).all()
  assert (targets[:, :body] == 0).all()
  positions = np.nonzero(inputs[:, :body])[1]
  assert positions.min() < 3 and positions.max() > body - 3  # anywhere in the body, not a fixed layout
  again = batches.examples("copy", CONFIG, SEQ_LEN, seed, "train", np.arange(299, -1, -1))
  np.testing.assert_array_equal(again["inputs"], inputs[::-1])


def test_splits_are_disjoint_over_the_whole_space(seed):
  """Disjoint means: no (data tokens, positions) pair is in two splits. The whole space of seq_len 4, 2 tokens,
  vocabulary 4 (2 x 2 token choices at the only 2 positions = 4 examples) is enumerated: each split draws
  exactly the examples whose content hashes into it (a split with none is an error)."""
  small = CopyConfig(num_tokens=2, vocab_size=4)
  every = np.array([list(t) + list(p) for t in itertools.product([1, 2], repeat=2) for p in [(0, 1)]])
  seen = {}
  for split in rng.SPLITS:
    if not rng.in_split(every, split).any():
      with pytest.raises(ValueError, match="too few distinct examples"):
        batches.examples("copy", small, 4, seed, split, np.arange(50))
      seen[split] = set()
      continue
    batch = batches.examples("copy", small, 4, seed, split, np.arange(50))
    seen[split] = {tuple(row) for row in batch["inputs"][:, :2]}
    want = {tuple(row[:2]) for row in every[rng.in_split(every, split)]}
    assert seen[split] == want
  assert sum(len(s) for s in seen.values()) == 4 and seen["train"]


@pytest.mark.parametrize("changes, match", [(dict(num_tokens=17), "data.copy.num_tokens=17 needs data.seq_len"),
                                            (dict(vocab_size=2), "data.copy.vocab_size=2 must be >= 3")])
def test_settings_that_cannot_make_an_example_are_rejected(changes, match):
  with pytest.raises(ValueError, match=match):
    CopyConfig(**changes).validate(SEQ_LEN)
