"""Byte-level tokenizer: ids 0..255 are the bytes themselves, then three special ids.

No vocabulary file, no merges: any byte string round-trips exactly, and one token of
text is one byte, so a model's loss in nats per token divided by ln 2 is bits per byte
(count only targets that are bytes, `is_byte(targets)`, when specials appear).
"""

import numpy as np

NUM_BYTES = 256  # ids 0..255 are raw bytes
PAD_ID = 256  # padding; never produced by the data pipeline, reserved for callers
BOS_ID = 257  # beginning of a sequence (e.g. a sampling prompt)
EOS_ID = 258  # end of a document; the corpus puts one after every document
VOCAB_SIZE = 259  # smallest vocabulary that covers the ids above

SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}


def encode(text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
  """Token ids of `text`: int32 [n] (n = UTF-8 byte count, plus one per added special).

  A `str` is encoded as UTF-8; `bytes` are taken as they are.
  """
  if isinstance(text, str):
    text = text.encode("utf-8")
  elif not isinstance(text, (bytes, bytearray, memoryview)):
    raise TypeError(f"encode expects str or bytes, got {type(text).__name__}.")
  ids = np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)
  prefix = [BOS_ID] if add_bos else []
  suffix = [EOS_ID] if add_eos else []
  if prefix or suffix:
    ids = np.concatenate([np.asarray(prefix, np.int32), ids, np.asarray(suffix, np.int32)])
  return ids


def decode_bytes(ids) -> bytes:
  """The bytes named by `ids` (any integer array-like, any shape, read in C order).

  Special ids are skipped. Ids outside [0, VOCAB_SIZE) raise ValueError: they are not
  tokens of this vocabulary (mask a padded vocabulary's extra logits before sampling).
  """
  ids = np.asarray(ids)
  if ids.size == 0:
    return b""
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"decode expects integer token ids, got dtype {ids.dtype}.")
  ids = ids.reshape(-1).astype(np.int64)
  bad = (ids < 0) | (ids >= VOCAB_SIZE)
  if bad.any():
    raise ValueError(f"Token id {int(ids[bad][0])} is outside the byte vocabulary [0, {VOCAB_SIZE}).")
  return ids[ids < NUM_BYTES].astype(np.uint8).tobytes()


def decode(ids) -> str:
  """Text of `ids`: bytes decoded as UTF-8 with errors="replace"; special ids skipped."""
  return decode_bytes(ids).decode("utf-8", errors="replace")


def is_byte(ids) -> np.ndarray:
  """Boolean mask of the same shape: True where an id is a byte (not a special)."""
  return np.asarray(ids) < NUM_BYTES
