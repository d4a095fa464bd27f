"""Tests of train/tasks/passkey.py against passkey retrieval (Mohtashami & Jaggi 2023)."""

import re

import numpy as np
import pytest

from sparseformer.train import tokenizer
from sparseformer.train.tasks import batches, passkey
from sparseformer.train.tasks.config import PasskeyConfig

SEQ_LEN = 400


def test_examples_follow_the_definition(seed):
  config = PasskeyConfig(num_digits=5, min_depth=0.2, max_depth=0.8, min_length=320)
  batch = batches.examples("passkey", config, SEQ_LEN, seed, "train", np.arange(40))
  depths = []
  for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
    length = int(np.sum(inputs != tokenizer.PAD_ID))
    assert 320 <= length <= SEQ_LEN and (inputs[length:] == tokenizer.PAD_ID).all()
    text = tokenizer.decode(np.concatenate([inputs[:length], targets[length - 1:length]]))
    assert text.startswith(passkey.PROMPT.decode())
    found = re.search(r" The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", text)
    assert found and found.group(1) == found.group(2) and len(found.group(1)) == 5
    answer = found.group(1)
    assert text.endswith(passkey.QUESTION.decode() + answer)
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(length - 5, length))
    assert tokenizer.decode(targets[mask > 0]) == answer
    filler = len(text) - passkey.fixed_length(5)
    depths.append((found.start() - len(passkey.PROMPT)) / filler)
  assert 0.2 - 0.01 <= min(depths) and max(depths) <= 0.8 + 0.01 and max(depths) - min(depths) > 0.3


def test_an_eval_mix_fixes_the_depth_and_length():
  config = PasskeyConfig(eval_mixes=("start:0.0:300", "end:1.0:300"))
  mixes = {mix.name: mix for mix in config.mixes(SEQ_LEN)}
  assert mixes[""].seq_len == SEQ_LEN and mixes["start"].seq_len == 300
  for name, where in (("start", len(passkey.PROMPT)), ("end", None)):
    batch = batches.examples("passkey", mixes[name].task, 300, 0, "validation", np.arange(4))
    text = tokenizer.decode(batch["inputs"][0])
    assert len(text) == 300
    position = text.index(" The pass key is")
    if where is not None:
      assert position == where
    else:
      assert text[position:].count(" What is the pass key?") == 1 and "grass" not in text[position:]


@pytest.mark.parametrize("changes, match", [
    (dict(min_depth=0.9, max_depth=0.1), "0 <= min_depth <= max_depth <= 1"),
    (dict(min_length=10), "needs at least"),
    (dict(eval_mixes=("deep:2.0:300",)), r"eval_mixes\[deep\] depth=2.0"),
    (dict(eval_mixes=("short:0.5:50",)), r"eval_mixes\[short\] seq_len=50"),
])
def test_settings_that_cannot_make_an_example_are_rejected(changes, match):
  with pytest.raises(ValueError, match=match):
    PasskeyConfig(**changes).validate(SEQ_LEN)
  with pytest.raises(ValueError, match="needs at least"):
    PasskeyConfig().validate(100)
