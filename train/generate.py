"""Batched generation over the KV cache (models/decode.py): greedy, temperature, top-k, top-p, a seed, EOS stop.

`generate` prefills every prompt of a batch at once (right-padded, each row at its own length, so positions are
each prompt's own), then appends one token per row per step with `decode`. The per-token loop runs on the host
(it exits as soon as every row has stopped); the sampling itself is one jitted function, `next_tokens`.

Sampling follows the usual order of the warpers (Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration", ICLR, §3.1 for nucleus sampling): logits / temperature, then top-k, then top-p over the
distribution top-k left. Ties are broken by token id (lower id first), so the kept set is deterministic.

Randomness: the key of row r at step s is fold_in(fold_in(key(seed), r), s), so a row's tokens depend on the
seed, its index in `prompts` and its own logits, not on how many other rows share the batch.

The recompute sampler in train/sample.py is the reference this is tested against (tests/train/test_generate.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.models import decode as decode_lib
from sparseformer.train import tokenizer


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """f32 [B, V] logits -> f32 [B, V]: logits / temperature with the tokens top-k and top-p exclude at -inf.

  top_k = 0 keeps every token; otherwise the k largest (ties: lower id first). top_p >= 1 keeps every token;
  otherwise the nucleus: the smallest set, taken in decreasing probability (ties: lower id first), whose
  probability under softmax of the top-k-filtered logits sums to >= top_p (the most likely token always stays).
  `temperature` must be > 0 here (greedy is `next_tokens`' job). Scalars may be traced: one compile serves all.
  """
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  order = jnp.argsort(-logits, axis=-1, stable=True)  # decreasing; equal logits keep id order
  ranks = jnp.argsort(order, axis=-1)  # rank of each token in that order
  keep = (top_k <= 0) | (ranks < top_k)
  logits = jnp.where(keep, logits, -jnp.inf)
  sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of the tokens ranked above
  in_nucleus = (mass_before < top_p) | (jnp.arange(vocab) == 0)
  keep_sorted = (top_p >= 1.0) | in_nucleus
  keep = jnp.take_along_axis(keep_sorted, ranks, axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


@jax.jit
def next_tokens(logits: jax.Array, seed, rows: jax.Array, step, temperature, top_k, top_p,
                vocab_limit) -> jax.Array:
  """int32 [B] next ids from f32 [B, V] logits: argmax where temperature == 0, else a draw from the filtered
  distribution with row r's key fold_in(fold_in(key(seed), rows[r]), step). Ids >= vocab_limit are never chosen
  (a padded vocabulary's extra logits); argmax ties go to the lower id."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
  greedy = jnp.argmax(logits, axis=-1)
  filtered = filter_logits(logits, jnp.maximum(temperature, 1e-6), top_k, top_p)
  base = jax.random.key(seed)
  keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(base, row), step))(rows)
  sampled = jax.vmap(jax.random.categorical)(keys, filtered)
  return jnp.where(temperature == 0, greedy, sampled).astype(jnp.int32)


def check_settings(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int = 0) -> None:
  """ValueError naming the CLI flag of the first invalid sampling setting."""
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"--seed = {seed!r} must be an integer in [0, 2**32).")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"--tokens (max_new_tokens) = {max_new_tokens!r} must be a positive integer.")
  if not temperature >= 0:
    raise ValueError(f"--temperature = {temperature!r} must be >= 0 (0 = greedy).")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"--top-k = {top_k!r} must be an integer >= 0 (0 = the full vocabulary).")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"--top-p = {top_p!r} must lie in (0, 1] (1 = no nucleus filter).")


def prepare_prompts(prompts: list, max_new_tokens: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [B, T] right-padded, lengths int32 [B]) for prefill; an empty prompt becomes [EOS] (a new
  document, as train/sample.py starts it). T is the longest prompt rounded up to a power of two (>= 16, <= max_len)
  so that prompts of similar lengths share one compiled prefill.

  A prompt that cannot fit its generation into the cache is an error, not a silent truncation: a prompt of n
  tokens needs n + max_new_tokens - 1 <= max_len positions (the last new token is sampled, never stored).
  """
  if not prompts:
    raise ValueError("generate needs at least one prompt (an empty prompt is [] or b'', not an empty list).")
  rows = [np.asarray(prompt, np.int64).reshape(-1) for prompt in prompts]
  rows = [row if row.size else np.asarray([tokenizer.EOS_ID], np.int64) for row in rows]
  for index, row in enumerate(rows):
    if row.size + max_new_tokens - 1 > max_len:
      raise ValueError(
          f"Prompt {index} has {row.size} tokens; with --tokens (max_new_tokens) = {max_new_tokens} it needs "
          f"{row.size + max_new_tokens - 1} positions, but the cache holds max_len = {max_len} (the model's "
          f"max_seq_len unless set): shorten the prompt to <= {max_len - max_new_tokens + 1} tokens or lower "
          f"--tokens.")
  longest = max(row.size for row in rows)
  width = min(max_len, max(16, 1 << (longest - 1).bit_length()))
  tokens = np.zeros((len(rows), width), np.int32)
  for index, row in enumerate(rows):
    tokens[index, :row.size] = row
  return tokens, np.asarray([row.size for row in rows], np.int32)


def generate(model: nnx.Module, prompts: list, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = tokenizer.EOS_ID, max_len: int | None = None,
             vocab_limit: int | None = None) -> list[np.ndarray]:
  """The new ids of each prompt (int32 [n_i], without the prompt), n_i <= max_new_tokens.

  prompts: int arrays of token ids, any lengths (an empty one starts from EOS). temperature 0 = greedy. A row
  stops after it produces `eos_id` (kept as its last id; None = never stop early) or max_new_tokens ids; rows
  that stopped get no more tokens. max_len: cache positions (default model.config.max_seq_len); a prompt that
  does not fit with its generation raises ValueError before any work. vocab_limit: only ids below it are drawn
  (default: the model's whole vocabulary).
  """
  check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  max_len = model.config.max_seq_len if max_len is None else max_len
  tokens, lengths = prepare_prompts(prompts, max_new_tokens, max_len)
  batch = tokens.shape[0]
  vocab_limit = model.config.vocab_size if vocab_limit is None else vocab_limit
  settings = (np.float32(temperature), np.int32(top_k), np.float32(top_p), np.int32(vocab_limit))
  rows = np.arange(batch, dtype=np.int32)
  cache = decode_lib.init_cache(model, batch, max_len)
  frozen = decode_lib.snapshot(model)  # eval mode, split once for the whole loop
  logits, cache = decode_lib.prefill(frozen, tokens, lengths, cache)
  generated = [[] for _ in range(batch)]
  done = np.zeros(batch, bool)
  for step in range(max_new_tokens):
    chosen = np.asarray(next_tokens(logits, np.uint32(seed), rows, np.int32(step), *settings))
    for row in np.flatnonzero(~done):
      generated[row].append(int(chosen[row]))
      done[row] = eos_id is not None and chosen[row] == eos_id
    if done.all() or step == max_new_tokens - 1:
      break
    logits, cache = decode_lib.decode(frozen, cache, chosen)  # stopped rows decode too; their ids are dropped
  return [np.asarray(row, np.int32) for row in generated]


def prompt_ids(prompt: str | bytes) -> np.ndarray:
  """Byte ids of a prompt: a str as UTF-8 (lone surrogates from undecodable argv bytes map back to those bytes,
  os.fsencode's rule), bytes as they are."""
  if isinstance(prompt, str):
    prompt = prompt.encode("utf-8", errors="surrogateescape")
  return tokenizer.encode(prompt)


def generate_text(model: nnx.Module, prompts: list, *, max_new_tokens: int, **settings) -> list[str]:
  """Each prompt (str or bytes) followed by its generated text, decoded together as UTF-8 with replacement
  (invalid bytes become U+FFFD, never an error; special ids are dropped). Only byte ids are drawn, so a model
  with a padded vocabulary cannot produce an id the tokenizer lacks. `settings` are `generate`'s."""
  ids = [prompt_ids(prompt) for prompt in prompts]
  vocab_limit = min(model.config.vocab_size, tokenizer.VOCAB_SIZE)
  new = generate(model, ids, max_new_tokens=max_new_tokens, vocab_limit=vocab_limit, **settings)
  return [tokenizer.decode(np.concatenate([prompt, row])) for prompt, row in zip(ids, new)]
