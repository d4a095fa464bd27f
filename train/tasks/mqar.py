"""Multi-query associative recall (MQAR): Arora, Eyuboglu, Timalsina et al. 2023, "Zoology: Measuring and
Improving Recall in Efficient Language Models" (arXiv:2312.04927), §3.1 and Appendix E.

An example of T tokens with N pairs over a vocabulary of V ids:

  positions 0 .. 2N-1   k_1 v_1 k_2 v_2 ... k_N v_N    keys distinct, from [1, V/2); values distinct, from [V/2, V)
  positions 2N .. T-1   filler, with every key once more as a query at position 2N + 2 g_i

The query slots g_i are N distinct draws from [0, (T - 2N) / 2) with p(g) ~ (g + 1)^(power_a - 1) (successive
sampling without replacement, as Zoology's generator does): with power_a = 0.01 most queries come soon after the
pairs, a few far away, like the power-law gaps between repeated bigrams in text. Key i goes to slot g_i, so the
queries ask for the keys in a random order. The target at a query position is its key's value (loss mask 1);
every other position has target 0 and mask 0. Filler is uniform over the vocabulary (Zoology's
random_non_queries=True) or id 0.
"""

import numpy as np

from sparseformer.train.tasks.config import MQARConfig
from sparseformer.train.tasks.rng import Draws


def query_gap_weights(config: MQARConfig, seq_len: int) -> np.ndarray:
  """float64 [(seq_len - 2N) // 2]: the unnormalised power-law weight of each query slot."""
  slots = np.arange(1, (seq_len - 2 * config.num_kv_pairs) // 2 + 1, dtype=np.float64)
  return config.power_a * slots ** (config.power_a - 1.0)


def generate(config: MQARConfig, seq_len: int, draws: Draws) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(batch of int32 inputs / targets and float32 loss_mask [n, seq_len], int64 content [n, 3N]) of n examples."""
  n, pairs, vocab = draws.keys.shape[0], config.num_kv_pairs, config.vocab_size
  half = vocab // 2
  keys = 1 + draws.distinct(half - 1, pairs)
  values = half + draws.distinct(vocab - half, pairs)
  gaps = draws.weighted_distinct(query_gap_weights(config, seq_len), pairs)
  if config.random_non_queries:
    inputs = draws.integers(0, vocab, seq_len)
  else:
    inputs = np.zeros((n, seq_len), np.int64)
  inputs[:, 0:2 * pairs:2] = keys
  inputs[:, 1:2 * pairs:2] = values
  query_positions = 2 * pairs + 2 * gaps
  np.put_along_axis(inputs, query_positions, keys, axis=1)
  targets = np.zeros((n, seq_len), np.int32)
  np.put_along_axis(targets, query_positions, values.astype(np.int32), axis=1)
  loss_mask = np.zeros((n, seq_len), np.float32)
  np.put_along_axis(loss_mask, query_positions, np.float32(1.0), axis=1)
  batch = {"inputs": inputs.astype(np.int32), "targets": targets, "loss_mask": loss_mask}
  return batch, np.concatenate([keys, values, gaps], axis=1)
