"""Passkey retrieval: Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (arXiv:2305.16300), §4.2 and Appendix (the prompt below is theirs).

An example is byte-level text (train/tokenizer.py ids):

  PROMPT + filler[:before] + " The pass key is 71432. Remember it. 71432 is the pass key." + filler[before:F]
         + " What is the pass key? The pass key is " + "71432"

`filler` repeats " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
and is cut to the F bytes that make the text length + 1 bytes long (inputs = text[:-1], targets = text[1:]);
`before` = floor(depth * F) with the depth uniform in [min_depth, max_depth] (0 = key right after the prompt,
1 = right before the question); the length is uniform in [min_length, seq_len] (seq_len when min_length = 0)
and shorter examples are padded with PAD. The passkey is uniform over the numbers with num_digits digits. Loss
mask 1 on the targets that are the answer's digits (after the question), 0 elsewhere.
"""

import numpy as np

from sparseformer.train import tokenizer
from sparseformer.train.tasks.config import PasskeyConfig
from sparseformer.train.tasks.rng import Draws

PROMPT = (b"There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
          b"I will quiz you about the important information there.")
FILLER = b" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = b" What is the pass key? The pass key is "


def key_sentence(passkey: str) -> bytes:
  return f" The pass key is {passkey}. Remember it. {passkey} is the pass key.".encode()


def fixed_length(num_digits: int) -> int:
  """Bytes of an example without filler: prompt, key sentence, question and answer."""
  return len(PROMPT) + len(key_sentence("0" * num_digits)) + len(QUESTION) + num_digits


def _filler(num_bytes: int) -> np.ndarray:
  repeats = -(-num_bytes // len(FILLER))
  return np.frombuffer(FILLER * repeats, np.uint8)[:num_bytes].astype(np.int32)


def generate(config: PasskeyConfig, seq_len: int, draws: Draws) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(batch of int32 inputs / targets and float32 loss_mask [n, seq_len], int64 content [n, 3]) of n examples."""
  n, digits = draws.keys.shape[0], config.num_digits
  passkeys = draws.integers(10 ** (digits - 1), 10 ** digits, 1)[:, 0]
  depths = config.min_depth + (config.max_depth - config.min_depth) * draws.uniform(1)[:, 0]
  lengths = draws.integers(config.min_length or seq_len, seq_len + 1, 1)[:, 0]
  fillers = lengths + 1 - fixed_length(digits)
  befores = np.floor(depths * fillers).astype(np.int64)
  inputs = np.full((n, seq_len), tokenizer.PAD_ID, np.int32)
  targets = np.zeros((n, seq_len), np.int32)
  loss_mask = np.zeros((n, seq_len), np.float32)
  prompt, question = tokenizer.encode(PROMPT), tokenizer.encode(QUESTION)
  for row in range(n):
    answer = str(int(passkeys[row]))
    filler = _filler(int(fillers[row]))
    text = np.concatenate([prompt, filler[:befores[row]], tokenizer.encode(key_sentence(answer)),
                           filler[befores[row]:], question, tokenizer.encode(answer)])
    length = int(lengths[row])
    inputs[row, :length] = text[:-1]
    targets[row, :length] = text[1:]
    loss_mask[row, length - digits:length] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}, np.stack([passkeys, befores, lengths], 1)
