"""Tests of train/tasks/mqar.py against Zoology's definition (Arora et al. 2023, §3.1 / App. E)."""

import numpy as np
import pytest

from sparseformer.train.tasks import batches, mqar, rng
from sparseformer.train.tasks.config import MQARConfig

SEQ_LEN, PAIRS, VOCAB = 64, 6, 64


def _examples(seed, split="train", n=200, config=MQARConfig(num_kv_pairs=PAIRS, vocab_size=VOCAB), seq_len=SEQ_LEN):
  return batches.examples("mqar", config, seq_len, seed, split, np.arange(n))


def test_examples_follow_the_definition(seed):
  batch = _examples(seed)
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
  assert inputs.dtype == np.int32 and targets.dtype == np.int32 and mask.dtype == np.float32
  assert inputs.shape == targets.shape == mask.shape == (200, SEQ_LEN)
  keys, values = inputs[:, 0:2 * PAIRS:2], inputs[:, 1:2 * PAIRS:2]
  assert ((keys >= 1) & (keys < VOCAB // 2)).all() and ((values >= VOCAB // 2) & (values < VOCAB)).all()
  assert all(len(set(row)) == PAIRS for row in keys), "a key repeats within an example"
  assert ((inputs >= 0) & (inputs < VOCAB)).all()
  for row in range(inputs.shape[0]):
    labelled = np.flatnonzero(mask[row])
    assert len(labelled) == PAIRS and set(np.unique(mask[row])) == {0.0, 1.0}
    # Queries: in the query region, on even offsets from 2N, each key exactly once, in some order.
    assert (labelled >= 2 * PAIRS).all() and ((labelled - 2 * PAIRS) % 2 == 0).all()
    assert sorted(inputs[row, labelled]) == sorted(keys[row])
    answer = dict(zip(keys[row], values[row]))
    np.testing.assert_array_equal(targets[row, labelled], [answer[k] for k in inputs[row, labelled]])
    assert (targets[row, mask[row] == 0] == 0).all()
  # The queries come in a random order, not the order of the pairs.
  orders = [tuple(list(keys[r]).index(k) for k in inputs[r, np.flatnonzero(mask[r])]) for r in range(50)]
  assert len(set(orders)) > 10 and orders.count(tuple(range(PAIRS))) < 5


def test_no_random_filler_leaves_zeros():
  config = MQARConfig(num_kv_pairs=PAIRS, vocab_size=VOCAB, random_non_queries=False)
  batch = _examples(0, config=config)
  filler = batch["loss_mask"] == 0
  filler[:, :2 * PAIRS] = False
  assert (batch["inputs"][filler] == 0).all()


def test_query_gaps_follow_the_power_law():
  """The first query slot drawn is distributed as p(g) ~ (g + 1)^(a - 1): compare with the exact law."""
  config = MQARConfig(num_kv_pairs=2, vocab_size=VOCAB, power_a=0.3)
  weights = mqar.query_gap_weights(config, 16)
  probabilities = weights / weights.sum()
  draws = rng.Draws(rng.example_keys(rng.base_key(0, "mqar", "train"), np.arange(40_000)))
  first = draws.weighted_distinct(weights, 2)[:, 0]
  empirical = np.bincount(first, minlength=weights.size) / first.size
  assert np.abs(empirical - probabilities).max() < 0.01, (empirical, probabilities)
  # Zoology's power_a = 0.01 puts most queries near the pairs.
  batch = _examples(0, config=MQARConfig(num_kv_pairs=4, vocab_size=VOCAB), seq_len=256, n=400)
  slots = (np.nonzero(batch["loss_mask"])[1] - 8) // 2
  assert np.mean(slots < 20) > 0.5 and slots.max() > 60


def test_examples_are_pure_functions_of_seed_split_and_index(seed):
  whole = _examples(seed, n=12)
  again = batches.examples("mqar", MQARConfig(num_kv_pairs=PAIRS, vocab_size=VOCAB), SEQ_LEN, seed, "train",
                           np.array([11, 3, 7]))
  for name in whole:
    np.testing.assert_array_equal(again[name], whole[name][[11, 3, 7]])
  other_seed = _examples(seed + 1, n=12)
  assert not np.array_equal(other_seed["inputs"], whole["inputs"])


def test_splits_are_disjoint(seed):
  small = MQARConfig(num_kv_pairs=1, vocab_size=8, random_non_queries=False)  # 3 keys x 4 values x 2 slots
  content = {}
  for split in rng.SPLITS:
    batch = batches.examples("mqar", small, 6, seed, split, np.arange(300))
    content[split] = {row.tobytes() for row in np.concatenate([batch["inputs"], batch["targets"]], 1)}
  assert content["train"] and content["validation"] and content["test"]
  assert not content["train"] & content["validation"]
  assert not content["train"] & content["test"] and not content["validation"] & content["test"]
  # The realistic size: no validation example also in the first training examples.
  train, val = _examples(seed, "train", 2000), _examples(seed, "validation", 500)
  assert not {r.tobytes() for r in train["inputs"]} & {r.tobytes() for r in val["inputs"]}


def test_a_space_too_small_for_every_split_is_an_error():
  tiny = MQARConfig(num_kv_pairs=1, vocab_size=4, random_non_queries=False)  # 1 key x 2 values x 1 slot
  missing = [split for split in rng.SPLITS if not rng.in_split(np.array([[1, 2, 0], [1, 3, 0]]), split).any()]
  assert missing
  with pytest.raises(ValueError, match="too few distinct examples"):
    batches.examples("mqar", tiny, 4, 0, missing[0], np.arange(2))


@pytest.mark.parametrize("changes, match", [
    (dict(num_kv_pairs=17), "data.mqar.num_kv_pairs=17 needs data.seq_len >= 4"),
    (dict(num_kv_pairs=4, vocab_size=8), "raise data.mqar.vocab_size to at least 10"),
    (dict(power_a=0.0), "data.mqar.power_a"),
    (dict(eval_mixes=("long:32:64",)), r"eval_mixes\[long\] num_kv_pairs=32 needs its seq_len >= 4 x num_kv_pairs = 128"),
    (dict(eval_mixes=("long-8-64",)), "is not 'NAME:num_kv_pairs:seq_len'"),
    (dict(eval_mixes=("a:4:64", "a:8:64")), "names 'a' twice"),
])
def test_settings_that_cannot_make_an_example_are_rejected(changes, match):
  with pytest.raises(ValueError, match=match):
    MQARConfig(**changes).validate(64)
