"""train/generate.py: batched KV-cache generation against the recompute sampler (train/sample.py), the filters
against NumPy, EOS stop, seeds, and bad input (too-long prompt, empty prompt, non-UTF-8 bytes)."""

import jax
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train import generate, sample, tokenizer

# Lengths 3, 16 and empty: every call below prefills [B, 16] with B in {1, 3} (one compile per batch size).
PROMPTS = [np.arange(3) + 40, np.arange(16) + 97, np.asarray([], np.int32)]


@pytest.fixture(scope="module")
def model():
  """2 layers, d 32: a 16-token sliding window (its ring wraps within 40 positions), then a global layer;
  test_passkey_eval.py's model (one set of compiled decode steps when both files run in one process)."""
  config = ModelConfig(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, max_seq_len=320,
                       attention_pattern=("local", "global"),
                       attention=SparseAttentionConfig(block_size=16, window=16))
  return DecoderLM(config, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------- the filters
def _reference_kept(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
  """The kept ids by the definitions: top-k by rank (ties: lower id), then the smallest prefix of the rest in
  decreasing probability whose mass reaches top_p (float64)."""
  scaled = logits.astype(np.float64) / temperature
  order = sorted(range(scaled.size), key=lambda i: (-scaled[i], i))
  kept = order[:top_k] if top_k else order
  if top_p < 1:
    probs = np.exp(scaled[kept] - scaled[kept].max())
    probs /= probs.sum()
    total, nucleus = 0.0, []
    for token, prob in zip(kept, probs):
      nucleus.append(token)
      total += prob
      if total >= top_p:
        break
    kept = nucleus
  return set(kept)


FIXED_LOGITS = np.asarray([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all tied: ids decide
                           [3.0, 1.0, 2.0, 2.0, -1.0, 0.5],  # a tie inside the top 3
                           [1.0, 1.0, 1.0, 5.0, 4.0, -2.0],
                           [-3.0, 2.5, 0.0, 2.5, 2.4, 1.0]], np.float32)


_FILTER = jax.jit(generate.filter_logits)  # one compile for every setting below (they are traced scalars)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.5), (1.0, 3, 1.0), (0.7, 4, 0.8),
                                                       (2.0, 0, 0.3), (1.0, 1, 0.9), (1.0, 6, 1.0)])
def test_filters_keep_the_reference_set(temperature, top_k, top_p):
  filtered = np.asarray(_FILTER(FIXED_LOGITS, temperature, top_k, top_p))
  assert not np.isnan(filtered).any()
  for row, logits in enumerate(FIXED_LOGITS):
    kept = set(np.flatnonzero(np.isfinite(filtered[row])).tolist())
    assert kept == _reference_kept(logits, temperature, top_k, top_p), (row, kept)
    kept_ids = sorted(kept)
    np.testing.assert_allclose(filtered[row, kept_ids], logits[kept_ids] / temperature, rtol=1e-6)


def test_next_tokens_greedy_is_argmax_and_draws_stay_in_the_filtered_set(model):
  # [3, V] like the generation tests' batches (one compile): FIXED_LOGITS' last rows, then ids >= 6 far below
  logits = np.full((3, model.config.vocab_size), -30.0, np.float32)
  logits[:, :6] = FIXED_LOGITS[1:]
  rows = np.arange(3, dtype=np.int32)
  args = lambda step, temperature, top_k, top_p, limit=6: (  # noqa: E731
      logits, np.uint32(3), rows, np.int32(step), np.float32(temperature), np.int32(top_k), np.float32(top_p),
      np.int32(limit))
  np.testing.assert_array_equal(np.asarray(generate.next_tokens(*args(0, 0.0, 0, 1.0))), [0, 3, 1])
  np.testing.assert_array_equal(np.asarray(generate.next_tokens(*args(0, 0.0, 0, 1.0, limit=3))), [0, 0, 1])
  for step in range(20):
    drawn = np.asarray(generate.next_tokens(*args(step, 1.5, 2, 1.0)))
    for row, token in enumerate(drawn):
      assert int(token) in _reference_kept(FIXED_LOGITS[row + 1], 1.5, 2, 1.0)


# ------------------------------------------------------------------------------------------ generation
def test_mixed_length_batch_equals_each_prompt_alone_and_greedy_equals_the_recompute_sampler(model):
  batched = generate.generate(model, PROMPTS, max_new_tokens=30, eos_id=None)
  again = generate.generate(model, PROMPTS, max_new_tokens=30, eos_id=None)
  for prompt, row, repeat in zip(PROMPTS, batched, again):
    np.testing.assert_array_equal(row, repeat)  # deterministic
    alone = generate.generate(model, [prompt], max_new_tokens=30, eos_id=None)[0]
    np.testing.assert_array_equal(row, alone)
    reference = sample.sample_tokens(model, prompt, num_tokens=30, window=64, temperature=0.0)  # sees all
    start = max(len(prompt), 1)  # the reference returns its prompt ([EOS] for an empty one) first
    np.testing.assert_array_equal(row, reference[start:])
  # an empty prompt is a new document: the same as starting from EOS
  np.testing.assert_array_equal(batched[2], generate.generate(model, [[tokenizer.EOS_ID]], max_new_tokens=30,
                                                              eos_id=None)[0])


def test_rows_stop_at_eos_and_the_others_go_on(model):
  free = generate.generate(model, PROMPTS, max_new_tokens=12, eos_id=None)
  eos = int(free[0][4])  # make row 0's fifth token the "end of document"
  stopped = generate.generate(model, PROMPTS, max_new_tokens=12, eos_id=eos)
  first = int(np.flatnonzero(free[0] == eos)[0])
  np.testing.assert_array_equal(stopped[0], free[0][:first + 1])  # ends with its EOS, no token after it
  for row in (1, 2):
    hits = np.flatnonzero(free[row] == eos)
    np.testing.assert_array_equal(stopped[row], free[row][:hits[0] + 1] if hits.size else free[row])


def test_a_seed_reproduces_tokens_whatever_shares_the_batch(model):
  settings = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, eos_id=None)
  first = generate.generate(model, PROMPTS, seed=7, **settings)
  np.testing.assert_array_equal(first[0], generate.generate(model, PROMPTS, seed=7, **settings)[0])
  np.testing.assert_array_equal(first[0], generate.generate(model, PROMPTS[:1], seed=7, **settings)[0])
  other = generate.generate(model, PROMPTS, seed=8, **settings)
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_too_long_prompts_and_bad_settings_fail_before_work(model):
  with pytest.raises(ValueError, match=r"Prompt 1 has 16 tokens; with --tokens \(max_new_tokens\) = 306 .* "
                                       r"max_len = 320 .* <= 15 tokens"):
    generate.generate(model, PROMPTS, max_new_tokens=306)
  with pytest.raises(ValueError, match=r"Prompt 0 has 3 tokens; .* max_len = 8 "):
    generate.prepare_prompts(PROMPTS[:1], 7, 8)
  assert generate.prepare_prompts(PROMPTS[:1], 6, 8)[0].shape == (1, 8)  # the last new token is never stored
  # (test_passkey_eval.py's length-320 cell generates into an exactly full cache)
  for bad, flag in ((dict(top_p=0.0), "--top-p"), (dict(top_k=-1), "--top-k"), (dict(temperature=-1.0),
                    "--temperature"), (dict(max_new_tokens=0), "--tokens"), (dict(seed=-1), "--seed")):
    with pytest.raises(ValueError, match=flag):
      generate.generate(model, PROMPTS, **(dict(max_new_tokens=4) | bad))


def test_text_from_non_utf8_bytes_decodes_with_replacement(model):
  prompts = [b"\xff\xfe caf\xc3", "caf\udcc3", ""]  # invalid bytes; a lone surrogate from argv; empty
  texts = generate.generate_text(model, prompts, max_new_tokens=5, temperature=1.0)
  assert texts[0].startswith("\ufffd\ufffd caf") and texts[1].startswith("caf") and len(texts) == 3
