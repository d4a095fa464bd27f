"""Tests of train/tasks/listops.py against ListOps as LRA defines it (Nangia & Bowman 2018; Tay et al. 2021)."""

import numpy as np
import pytest

from sparseformer.train.tasks import batches, listops
from sparseformer.train.tasks.config import ListOpsConfig

CONFIG = ListOpsConfig(max_depth=4, max_args=5, min_length=10, max_length=60)
NAMES = {listops.MIN: "MIN", listops.MAX: "MAX", listops.MED: "MED", listops.SUM_MOD: "SM"}


def _evaluate(tokens: list[int]) -> tuple[int, int, int]:
  """(value, depth, widest argument list) by an independent stack parse, with NumPy's median as LRA uses it."""
  stack, depth, widest = [], 0, 0
  for token in tokens:
    if token in NAMES:
      stack.append([token])
      depth = max(depth, len(stack))
    elif token == listops.END:
      operator, *arguments = stack.pop()
      widest = max(widest, len(arguments))
      value = {"MIN": min, "MAX": max, "MED": lambda a: int(np.median(a)),
               "SM": lambda a: int(np.sum(a) % 10)}[NAMES[operator]](arguments)
      if not stack:
        return value, depth, widest
      stack[-1].append(value)
    else:
      assert 0 <= token <= 9
      stack[-1].append(token)
  raise AssertionError("unbalanced expression")


def test_examples_follow_the_definition(seed):
  batch = batches.examples("listops", CONFIG, 64, seed, "train", np.arange(60))
  operators_seen = set()
  for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
    length = int(np.sum(inputs != listops.PAD))
    assert CONFIG.min_length <= length <= CONFIG.max_length
    assert (inputs[length:] == listops.PAD).all() and inputs[length - 1] == listops.END
    value, depth, widest = _evaluate(list(inputs[:length]))
    assert depth < CONFIG.max_depth and 2 <= widest <= CONFIG.max_args  # nodes at max_depth are digits
    np.testing.assert_array_equal(np.flatnonzero(mask), [length - 1])
    assert targets[length - 1] == value and 0 <= value <= 9
    operators_seen |= set(inputs[:length]) & set(NAMES)
  assert operators_seen == set(NAMES)
  labels = batch["targets"][batch["loss_mask"] > 0]
  assert len(set(labels)) >= 5  # a 10-way label, not a constant


def test_median_truncates_like_lra():
  assert listops.apply(listops.MED, [1, 4]) == int(np.median([1, 4])) == 2
  assert listops.apply(listops.MED, [9, 0, 4]) == 4
  assert listops.apply(listops.SUM_MOD, [9, 8, 7]) == 4


def test_examples_are_deterministic_and_splits_disjoint(seed):
  first = batches.examples("listops", CONFIG, 64, seed, "train", np.arange(20))
  again = batches.examples("listops", CONFIG, 64, seed, "train", np.arange(10, 20))
  np.testing.assert_array_equal(again["inputs"], first["inputs"][10:])
  val = batches.examples("listops", CONFIG, 64, seed, "validation", np.arange(20))
  assert not {r.tobytes() for r in first["inputs"]} & {r.tobytes() for r in val["inputs"]}


@pytest.mark.parametrize("changes, match", [
    (dict(max_length=100), "data.listops.max_length=100 exceeds data.seq_len=64"),
    (dict(min_length=70), "min_length=70 exceeds data.listops.max_length=60"),
    (dict(max_depth=2, max_args=3, min_length=6), "no tree of max_depth=2 and max_args=3 is that long"),
    (dict(max_args=1), "max_args=1 must be >= 2"),
])
def test_settings_that_cannot_make_an_example_are_rejected(changes, match):
  with pytest.raises(ValueError, match=match):
    ListOpsConfig(**{**vars(CONFIG), **changes}).validate(64)
