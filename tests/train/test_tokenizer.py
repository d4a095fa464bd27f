"""Tests for train/tokenizer.py: exact byte round-trips and the special ids."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparseformer.train import tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_text_round_trip(text):
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.size == len(text.encode("utf-8"))
  assert tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_bytes_round_trip(data):
  ids = tokenizer.encode(data)
  assert ((ids >= 0) & (ids < tokenizer.NUM_BYTES)).all()
  np.testing.assert_array_equal(ids, np.frombuffer(data, np.uint8))
  assert tokenizer.decode_bytes(ids) == data


@settings(max_examples=100, deadline=None)
@given(st.binary(), st.lists(st.integers(0, 10), max_size=5))
def test_specials_are_skipped_wherever_they_are(data, positions):
  ids = list(tokenizer.encode(data))
  for position in positions:
    special = [tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID][position % 3]
    ids.insert(min(position, len(ids)), special)
  assert tokenizer.decode_bytes(np.array(ids, np.int64)) == data


def test_bos_eos_and_constants():
  ids = tokenizer.encode("hé", add_bos=True, add_eos=True)
  assert ids.tolist() == [tokenizer.BOS_ID, 104, 195, 169, tokenizer.EOS_ID]
  assert ids.dtype == np.int32
  assert tokenizer.decode(ids) == "hé"
  assert tokenizer.VOCAB_SIZE == 259
  assert (tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID) == (256, 257, 258)
  np.testing.assert_array_equal(tokenizer.is_byte(ids), [False, True, True, True, False])


def test_invalid_utf8_is_replaced_not_raised():
  assert tokenizer.decode(np.array([0x66, 0xFF, 0x6F])) == "f\ufffdo"
  assert tokenizer.decode(np.zeros((0,), np.int32)) == ""


def test_two_dimensional_ids_read_in_row_order():
  ids = tokenizer.encode("abcdef").reshape(2, 3)
  assert tokenizer.decode(ids) == "abcdef"


@pytest.mark.parametrize("bad", [-1, tokenizer.VOCAB_SIZE, 1000])
def test_ids_outside_vocabulary_raise(bad):
  with pytest.raises(ValueError, match=f"Token id {bad} is outside"):
    tokenizer.decode([65, bad])


def test_rejects_non_text():
  with pytest.raises(TypeError, match="str or bytes"):
    tokenizer.encode(123)
  with pytest.raises(ValueError, match="integer token ids"):
    tokenizer.decode(np.array([1.0, 2.0]))
