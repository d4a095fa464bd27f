"""Tests of layers/attention/routed/selection.py: per-token block selections -> traced layout -> backends."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.layers.attention import layouts
from sparseformer.layers.attention.routed import selection

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from grad_check import assert_close, values_and_grads  # noqa: E402


def _selection_mask(block_index, seq_kv, block_kv, token_mask=None):
  """Reference token mask bool [B, Hl, T, S]: t sees key s iff one of its slots lists s's block (and the slot's
  key mask allows s) and s <= t."""
  batch, heads, seq, slots = block_index.shape
  mask = np.zeros((batch, heads, seq, seq_kv), bool)
  for b, h, t, slot in np.ndindex(batch, heads, seq, slots):
    block = block_index[b, h, t, slot]
    if block < 0:
      continue
    keys = np.arange(block * block_kv, min((block + 1) * block_kv, seq_kv))
    allowed = np.ones(len(keys), bool) if token_mask is None else token_mask[b, h, t, slot, :len(keys)]
    mask[b, h, t, keys[allowed]] = True
  return mask & np.tril(np.ones((seq, seq_kv), bool))


def _dense(q, k, v, mask):
  """Dense masked softmax attention in f32, mask [B, Hl, T, S] with Hl in (1, KVH, H); empty rows -> 0."""
  heads, kv_heads = q.shape[2], k.shape[2]
  mask = jnp.repeat(jnp.asarray(mask), heads // mask.shape[1], axis=1)
  k, v = (jnp.repeat(x.astype(jnp.float32), heads // kv_heads, axis=2) for x in (k, v))
  scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k, precision="highest") / np.sqrt(q.shape[-1])
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, -1, keepdims=True)
  probs = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
  probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("bhts,bshd->bthd", probs, v, precision="highest")


def _inputs(seed, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, seq, h, dim)), dtype) for h in (heads, kv_heads, kv_heads)], rng


def _random_selection(rng, batch, heads, seq, slots, num_blocks):
  """Distinct blocks per token (or -1), as the routers produce them."""
  picks = np.argsort(rng.random((batch, heads, seq, num_blocks)), axis=-1)[..., :slots]
  return np.where(rng.random(picks.shape) < 0.2, -1, picks).astype(np.int32)


@pytest.mark.parametrize("backend,rows", [("reference", "H"), ("xla", "H"), ("xla", "KVH"), ("xla", "1"),
                                          ("pallas", "KVH")])
def test_attend_selected_equals_the_dense_selection_mask(seed, backend, rows):
  batch, seq, heads, kv_heads, dim, block_q, block_kv, slots = 2, 37, 4, 2, 16, 8, 8, 3  # odd T, GQA
  (q, k, v), rng = _inputs(seed, batch, seq, heads, kv_heads, dim)
  num_rows = {"H": heads, "KVH": kv_heads, "1": 1}[rows]
  block_index = _random_selection(rng, batch, num_rows, seq, slots, -(-seq // block_kv))
  mask = _selection_mask(block_index, seq, block_kv)
  fn = lambda q, k, v: selection.attend_selected(q, k, v, jnp.asarray(block_index), block_q=block_q,
                                                 block_kv=block_kv, backend=backend)
  got = jax.jit(lambda q, k, v: values_and_grads(fn, q, k, v))(q, k, v)
  want = values_and_grads(lambda q, k, v: _dense(q, k, v, mask), q, k, v)
  assert_close(got, want, 2e-5, 1e-5)


def test_attend_selected_with_a_per_slot_key_mask(seed):
  batch, seq, heads, kv_heads, dim, block_q, block_kv, slots = 1, 29, 2, 1, 8, 4, 8, 2
  (q, k, v), rng = _inputs(seed, batch, seq, heads, kv_heads, dim)
  block_index = _random_selection(rng, batch, heads, seq, slots, -(-seq // block_kv))
  token_mask = rng.random((*block_index.shape, block_kv)) < 0.6
  mask = _selection_mask(block_index, seq, block_kv, token_mask)
  fn = lambda q, k, v: selection.attend_selected(q, k, v, jnp.asarray(block_index), block_q=block_q,
                                                 block_kv=block_kv, backend="xla", token_mask=jnp.asarray(token_mask))
  got = jax.jit(lambda q, k, v: values_and_grads(fn, q, k, v))(q, k, v)
  assert_close(got, values_and_grads(lambda q, k, v: _dense(q, k, v, mask), q, k, v), 2e-5, 1e-5)


def test_attend_selected_in_bfloat16():
  batch, seq, heads, kv_heads, dim, block_q, block_kv, slots = 1, 40, 4, 2, 16, 8, 8, 2
  (q, k, v), rng = _inputs(3, batch, seq, heads, kv_heads, dim, jnp.bfloat16)
  block_index = _random_selection(rng, batch, heads, seq, slots, 5)
  mask = _selection_mask(block_index, seq, block_kv)
  fn = lambda q, k, v: selection.attend_selected(q, k, v, jnp.asarray(block_index), block_q=block_q,
                                                 block_kv=block_kv, backend="xla")
  got = jax.jit(lambda q, k, v: values_and_grads(fn, q, k, v))(q, k, v)
  want = values_and_grads(lambda q, k, v: _dense(q, k, v, mask), *(x.astype(jnp.float32) for x in (q, k, v)))
  assert_close(got, want, 2e-2, 2e-2)


def test_selected_layout_lists_the_union_once_ascending_with_the_contract_padding(seed):
  rng = np.random.default_rng(seed)
  heads, seq, slots, block_q, block_kv = 3, 30, 2, 4, 4
  num_blocks = -(-seq // block_kv)
  block_index = _random_selection(rng, 1, heads, seq, slots, num_blocks)[0]
  block_index[0, :block_q] = -1  # one query block that selects nothing
  lists = jax.jit(lambda b: (lambda lay: (lay.kv_index, lay.kv_count, lay.kv_mask_id))(selection.selected_layout(
      b, seq_kv=seq, block_q=block_q, block_kv=block_kv)))(jnp.asarray(block_index))
  kv_index, kv_count, kv_mask_id = (np.asarray(x) for x in lists)
  rows = np.minimum(np.arange(-(-seq // block_q) * block_q), seq - 1).reshape(-1, block_q)
  for h, i in np.ndindex(kv_count.shape):
    chosen = block_index[h, rows[i]]
    union = sorted(set(chosen[chosen >= 0].tolist()))
    count = kv_count[h, i]
    assert kv_index[h, i, :count].tolist() == union  # ascending, no block twice
    padding = kv_index[h, i, count:]
    assert (padding == (union[-1] if union else 0)).all()
    assert (kv_mask_id[h, i, count:] == (kv_mask_id[h, i, count - 1] if count else layouts.FULL)).all()
  assert kv_count[0, 0] == 0


def test_traced_selection_equals_the_same_selection_as_a_host_layout(seed):
  """The traced layout's token mask equals a host BlockLayout built from the same selection with
  layouts.from_block_table, and both give the same attention."""
  rng = np.random.default_rng(seed)
  heads, seq, slots, block_q, block_kv = 2, 27, 2, 4, 8
  block_index = _random_selection(rng, 1, heads, seq, slots, -(-seq // block_kv))
  traced = lambda b: selection.selected_layout(b, seq_kv=seq, block_q=block_q, block_kv=block_kv)
  want = _selection_mask(block_index, seq, block_kv)[0]  # [H, T, S]
  nq, nk = -(-seq // block_q), -(-seq // block_kv)
  padded = np.zeros((heads, nq * block_q, nk * block_kv), bool)
  padded[:, :seq, :seq] = want
  padded[:, seq:] = padded[:, seq - 1:seq]  # padded rows copy the last real row (contract)
  tiles = padded.reshape(heads, nq, block_q, nk, block_kv).transpose(0, 1, 3, 2, 4)
  table = np.arange(heads * nq * nk).reshape(heads, nq, nk)
  host = layouts.from_block_table(table, tiles.reshape(-1, block_q, block_kv), seq_q=seq, seq_kv=seq,
                                  block_q=block_q, block_kv=block_kv)
  from sparseformer.layers.attention import backends, layout_view
  (q, k, v), _ = _inputs(seed, 1, seq, heads, heads, 8)
  traced_mask, got = jax.jit(lambda b, q, k, v: (layout_view.token_mask(traced(b)),
                                                 backends.attend(q, k, v, traced(b), backend="xla")))(
      jnp.asarray(block_index[0]), q, k, v)
  np.testing.assert_array_equal(np.asarray(traced_mask), host.to_token_mask())
  np.testing.assert_array_equal(host.to_token_mask(), want)
  want_out = jax.jit(lambda q, k, v: backends.attend(q, k, v, host, backend="xla"))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want_out), atol=1e-6)


def test_attend_selected_rejects_mismatched_shapes():
  (q, k, v), _ = _inputs(0, 1, 8, 4, 2, 8)
  with pytest.raises(ValueError, match="block_index must be"):
    selection.attend_selected(q, k, v, jnp.zeros((1, 4, 9, 1), jnp.int32), block_q=4, block_kv=4)
  with pytest.raises(ValueError, match="head rows"):
    selection.attend_selected(q, k, v, jnp.zeros((1, 3, 8, 1), jnp.int32), block_q=4, block_kv=4)
  with pytest.raises(ValueError, match="token_mask must be"):
    selection.attend_selected(q, k, v, jnp.zeros((1, 4, 8, 1), jnp.int32), block_q=4, block_kv=4,
                              token_mask=jnp.ones((1, 4, 8, 1, 2), bool))
