"""Selective copying: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv:2312.00752), §3.1 and Figure 2 (after the copying task of Arjovsky et al. 2016, with the tokens at random
positions so that a time-invariant model cannot solve it). A small sanity task.

An example of T tokens with M data tokens over a vocabulary of V ids: the first L = T - M positions are noise
(id 0) except M random positions (distinct, in increasing order) that hold data tokens from [1, V - 1); the last
M positions hold the marker V - 1. At the j-th marker the target is the j-th data token (loss mask 1); every
other position has target 0 and mask 0.
"""

import numpy as np

from sparseformer.train.tasks.config import CopyConfig
from sparseformer.train.tasks.rng import Draws


def generate(config: CopyConfig, seq_len: int, draws: Draws) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(batch of int32 inputs / targets and float32 loss_mask [n, seq_len], int64 content [n, 2M]) of n examples."""
  n, count, vocab = draws.keys.shape[0], config.num_tokens, config.vocab_size
  body = seq_len - count
  positions = np.sort(draws.distinct(body, count), axis=1)
  tokens = draws.integers(1, vocab - 1, count)
  inputs = np.zeros((n, seq_len), np.int32)
  np.put_along_axis(inputs, positions, tokens.astype(np.int32), axis=1)
  inputs[:, body:] = vocab - 1
  targets = np.zeros((n, seq_len), np.int32)
  targets[:, body:] = tokens
  loss_mask = np.zeros((n, seq_len), np.float32)
  loss_mask[:, body:] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}, np.concatenate([tokens, positions], axis=1)
