"""Helpers shared by the data tests (test_corpus.py, test_data.py); importable through pytest's `pythonpath`."""

import numpy as np

from sparseformer.train import tokenizer
from sparseformer.train.data_config import DataConfig


def make_config(tmp_path, **overrides) -> DataConfig:
  """A DataConfig whose cache lives under tmp_path."""
  overrides.setdefault("cache_dir", str(tmp_path / "cache"))
  return DataConfig(**overrides)


def write_tokens(tmp_path, tokens, name="tokens.npy") -> str:
  """Writes tokens as .npy, or as raw .bin for any other name; returns the path."""
  path = str(tmp_path / name)
  if name.endswith(".npy"):
    np.save(path, tokens)
  else:
    np.asarray(tokens).tofile(path)
  return path


def random_tokens(num_tokens, seed=0, dtype=np.uint16):
  return np.random.default_rng(seed).integers(0, tokenizer.VOCAB_SIZE, num_tokens).astype(dtype)
