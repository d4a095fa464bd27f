"""The recompute sampler: every new token re-runs the whole window it sees (O(T^2) per sequence).

Kept ONLY as the slow, obvious reference that tests/train/test_generate.py holds train/generate.py (the KV-cache
path that `sparseformer sample`, the trainer's end-of-run sample and the passkey eval use) equal to, and as the
baseline of benchmarks/decode.py. Do not call it from the package.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.train import tokenizer


@functools.lru_cache(maxsize=8)
def _next_token_fn(graphdef, temperature: float, top_k: int):
  """The jitted one-token step, cached per (model structure, settings): repeated samples do not recompile."""

  @jax.jit
  def next_token(state, buffer, length, key):
    logits, _ = nnx.merge(graphdef, state, copy=True)(buffer)
    logits = logits[0, length - 1].astype(jnp.float32)
    if temperature == 0:
      return jnp.argmax(logits)
    logits = logits / temperature
    if top_k:
      kth_largest = jax.lax.top_k(logits, top_k)[0][-1]
      logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    return jax.random.categorical(key, logits)

  return next_token


def sample_tokens(model: nnx.Module, prompt_ids: np.ndarray, *, num_tokens: int, window: int,
                  temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> np.ndarray:
  """Extends `prompt_ids` by `num_tokens` sampled ids.

  The model sees at most the last `window` tokens, left-aligned in a fixed [1, window] buffer so that one
  compiled step serves every length. temperature == 0 is greedy; top_k == 0 samples from the full vocabulary.
  """
  if temperature < 0 or top_k < 0:
    raise ValueError(f"temperature ({temperature}) and top_k ({top_k}) must be >= 0.")
  model.eval()  # deterministic: no router jitter
  graphdef, state = nnx.split(model)
  next_token = _next_token_fn(graphdef, float(temperature), int(top_k))
  ids = list(np.asarray(prompt_ids, np.int32)) or [tokenizer.EOS_ID]  # an empty prompt starts a new document
  key = jax.random.key(seed)
  for _ in range(num_tokens):
    visible = ids[-window:]
    buffer = np.full((1, window), tokenizer.PAD_ID, np.int32)
    buffer[0, :len(visible)] = visible
    key, subkey = jax.random.split(key)
    ids.append(int(next_token(state, buffer, len(visible), subkey)))
  return np.asarray(ids, np.int32)
