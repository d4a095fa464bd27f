"""ListOps: Nangia & Bowman 2018, "ListOps: A Diagnostic Dataset for Latent Tree Learning" (arXiv:1804.06028),
in the Long Range Arena form (Tay et al. 2021, "Long Range Arena", arXiv:2011.04006, §3.1 and its generator).

An expression is a tree of operators over digits, written in prefix form without parentheses:
`[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]` -> 5. Operators: MIN, MAX, MED (median of the arguments,
truncated to an integer for an even count: int(np.median)), SM (sum modulo 10). As in LRA's generate_tree, a
node at depth d < max_depth is an operator with probability 0.25 (else a digit uniform in 0..9); an operator
takes a uniform number of arguments in [2, max_args]; the root is at depth 1 and nodes at max_depth are digits.
Trees whose length in tokens falls outside [min_length, max_length] are redrawn (LRA: 500 < length < 2000).

Tokens: digits 0..9 are ids 0..9, MIN MAX MED SM are 10..13, "]" is 14, PAD 15 after the expression. The label
(the value, a digit id: a 10-way choice) is the target at the expression's last token "]" (loss mask 1 there):
a causal decoder has read the whole expression at that position.

Generation is a Python recursion per example (trees are irregular), seeded from the example's key; an LRA-sized
example (500-2000 tokens) takes milliseconds, about 20x less than one CPU training step at that length.
"""

import random

import numpy as np

from sparseformer.train.tasks.config import ListOpsConfig
from sparseformer.train.tasks.rng import Draws

MIN, MAX, MED, SUM_MOD, END, PAD = 10, 11, 12, 13, 14, 15
OPERATORS = (MIN, MAX, MED, SUM_MOD)
VALUE_P = 0.25  # probability that a node above max_depth is an operator (LRA's VALUE_P)


class _TooLong(Exception):
  pass


def apply(operator: int, arguments: list[int]) -> int:
  """The value of one operator node (LRA's to_value)."""
  if operator == MIN:
    return min(arguments)
  if operator == MAX:
    return max(arguments)
  if operator == SUM_MOD:
    return sum(arguments) % 10
  ordered, middle = sorted(arguments), len(arguments) // 2
  return ordered[middle] if len(arguments) % 2 else (ordered[middle - 1] + ordered[middle]) // 2


def _tree(uniform, depth: int, config: ListOpsConfig, tokens: list[int]) -> int:
  """Appends one subtree's tokens; returns its value. Raises _TooLong past max_length (the tree is redrawn)."""
  if len(tokens) >= config.max_length:
    raise _TooLong
  if depth >= config.max_depth or uniform() > VALUE_P:
    value = int(uniform() * 10)
    tokens.append(value)
    return value
  operator = OPERATORS[int(uniform() * len(OPERATORS))]
  tokens.append(operator)
  num_arguments = 2 + int(uniform() * (config.max_args - 1))
  arguments = [_tree(uniform, depth + 1, config, tokens) for _ in range(num_arguments)]
  tokens.append(END)
  return apply(operator, arguments)


def expression(config: ListOpsConfig, key: int) -> tuple[list[int], int]:
  """(tokens, value) of one expression, a pure function of the 64-bit `key` (Python's Mersenne Twister's
  random(), whose sequence for an integer seed Python keeps stable across versions)."""
  uniform = random.Random(int(key)).random
  while True:
    tokens: list[int] = []
    try:
      value = _tree(uniform, 1, config, tokens)
    except _TooLong:
      continue
    if config.min_length <= len(tokens) <= config.max_length:
      return tokens, value


def generate(config: ListOpsConfig, seq_len: int, draws: Draws) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(batch of int32 inputs / targets and float32 loss_mask [n, seq_len], int64 content [n, seq_len]) of n examples."""
  n = draws.keys.shape[0]
  inputs = np.full((n, seq_len), PAD, np.int32)
  targets = np.zeros((n, seq_len), np.int32)
  loss_mask = np.zeros((n, seq_len), np.float32)
  content = np.full((n, seq_len), -1, np.int64)
  for row, key in enumerate(draws.keys):
    tokens, value = expression(config, int(key))
    inputs[row, :len(tokens)] = tokens
    content[row, :len(tokens)] = tokens
    targets[row, len(tokens) - 1] = value
    loss_mask[row, len(tokens) - 1] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}, content
