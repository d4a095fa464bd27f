"""Tests of layers/attention/routed/kv_major.py against a dense masked attention built from the selection.

Reference: query t of head h sees key s iff s <= t and some slot of its row (hl = h // (H / Hl)) lists the
block s // block_kv (and, with token_mask, that slot keeps s); one softmax over those keys, zeros if none.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.layers.attention.routed import kv_major

BLOCK = 4


def _selection(rng, batch, rows, seq, slots, *, mode="random"):
  """Random selections without duplicates, any order: past blocks, own block (maybe), a few future ones."""
  num_blocks = -(-seq // BLOCK)
  index = np.full((batch, rows, seq, slots), -1, np.int32)
  for b, r, t in np.ndindex(batch, rows, seq):
    own = t // BLOCK
    row_mode = mode if mode != "mixed" else ("own", "none", "random")[(b + r + t) % 3]
    if row_mode == "own":
      index[b, r, t, rng.integers(slots)] = own
      continue
    if row_mode == "none":
      continue
    picks = rng.permutation(num_blocks)[:rng.integers(0, slots + 1)]
    picks = [p for p in picks if p <= own or rng.random() < 0.2]  # a few future blocks: masked defensively
    index[b, r, t, rng.permutation(slots)[:len(picks)]] = picks
  return index


def _mask(index, seq, heads, token_mask=None):
  """bool [B, H, T, T]."""
  batch, rows = index.shape[:2]
  mask = np.zeros((batch, rows, seq, seq), bool)
  for b, r, t, s in np.ndindex(*index.shape):
    c = index[b, r, t, s]
    if c >= 0:
      keys = np.arange(c * BLOCK, min((c + 1) * BLOCK, seq))
      keep = np.ones(len(keys), bool) if token_mask is None else token_mask[b, r, t, s, :len(keys)]
      mask[b, r, t, keys[keep]] = True
  mask &= np.tril(np.ones((seq, seq), bool))
  return np.repeat(mask, heads // rows, axis=1)


def _dense(q, k, v, mask):
  heads, kv_heads = q.shape[2], k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), heads // kv_heads, axis=2) for x in (k, v))
  scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k, precision="highest") / np.sqrt(q.shape[-1])
  scores = jnp.where(jnp.asarray(mask), scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1) * jnp.asarray(mask.any(-1, keepdims=True))
  return jnp.einsum("bhts,bshd->bthd", probs, v, precision="highest")


def _values_and_grads(fn, q, k, v):
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v).astype(jnp.float32), q, k, v)
  return (out, *vjp(cotangent.astype(out.dtype)))


def _assert_close(got, want, tol):
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert not np.isnan(g).any(), f"{name} has NaN"
    err = np.abs(g - w).max()
    assert err < tol, f"{name}: max error {err}"


def _inputs(rng, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
  return [jnp.asarray(rng.normal(size=(batch, seq, h, dim)), dtype) for h in (heads, kv_heads, kv_heads)]


CASES = [  # (rows, mode, token_mask): Hl = H, KVH, 1; "mixed": rows of own block only, of nothing, random
    ("heads", "random", True), ("kv", "mixed", True), ("shared", "mixed", False)]
FLASH_CASES = [(*case, 23) for case in CASES] + [("kv", "random", False, 3)]


@pytest.mark.parametrize("rows,mode,with_mask", CASES)
def test_kv_major_equals_dense_masked_reference(seed, rows, mode, with_mask):
  rng = np.random.default_rng(seed)
  batch, seq, heads, kv_heads, dim, slots = 2, 23, 4, 2, 8, 3  # odd T, GQA
  q, k, v = _inputs(rng, batch, seq, heads, kv_heads, dim)
  num_rows = {"heads": heads, "kv": kv_heads, "shared": 1}[rows]
  index = _selection(rng, batch, num_rows, seq, slots, mode=mode)
  token_mask = rng.random((*index.shape, BLOCK)) < 0.6 if with_mask else None
  mask = _mask(index, seq, heads, token_mask)
  fn = lambda q, k, v: kv_major.attend_kv_major(  # noqa: E731
      q, k, v, jnp.asarray(index), block_kv=BLOCK, tile=4,
      token_mask=None if token_mask is None else jnp.asarray(token_mask))
  got = jax.jit(lambda q, k, v: _values_and_grads(fn, q, k, v))(q, k, v)
  _assert_close(got, _values_and_grads(lambda q, k, v: _dense(q, k, v, mask), q, k, v), 2e-5)
  if mode == "mixed":  # rows that see nothing: exact zeros
    blind = ~mask.any(-1)  # [B, H, T]
    assert blind.any() and (np.asarray(got[0]).transpose(0, 2, 1, 3)[blind] == 0).all()


def test_kv_major_in_bfloat16(seed):
  rng = np.random.default_rng(seed)
  q, k, v = _inputs(rng, 1, 29, 4, 2, 16, jnp.bfloat16)
  index = _selection(rng, 1, 2, 29, 4)
  mask = _mask(index, 29, 4)
  fn = lambda q, k, v: kv_major.attend_kv_major(q, k, v, jnp.asarray(index), block_kv=BLOCK, tile=8)  # noqa: E731
  got = jax.jit(lambda q, k, v: _values_and_grads(fn, q, k, v))(q, k, v)
  want = _values_and_grads(lambda q, k, v: _dense(q, k, v, mask), *(x.astype(jnp.float32) for x in (q, k, v)))
  _assert_close(got, want, 3e-2)


def test_dispatch_places_every_past_assignment_once_within_the_static_tiles(seed):
  rng = np.random.default_rng(seed)
  batch, seq, rows, kv_heads, slots, tile = 2, 23, 4, 2, 3, 4
  index = _selection(rng, batch, rows, seq, slots).transpose(0, 2, 1, 3)  # [B, T, Hl', S]
  own = (np.arange(seq) // BLOCK)[None, :, None, None]
  past = np.where((index >= 0) & (index < own), index, -1)
  num_blocks = -(-seq // BLOCK)
  slot_assignment, tile_group, assignment_slot = (np.asarray(x) for x in kv_major.dispatch(
      jnp.asarray(past), kv_heads=kv_heads, num_blocks=num_blocks, tile=tile))
  assert ((assignment_slot >= 0) == (past >= 0)).all()
  taken = assignment_slot[past >= 0]
  assert len(set(taken.tolist())) == len(taken)  # no slot used twice
  assert (slot_assignment >= 0).sum() == len(taken)
  np.testing.assert_array_equal(slot_assignment[taken], np.flatnonzero(past >= 0))
  b, _, r, _ = np.nonzero(past >= 0)
  want_group = (b * kv_heads + r // (rows // kv_heads)) * num_blocks + past[past >= 0]
  np.testing.assert_array_equal(tile_group[taken // tile], want_group)  # each tile reads its rows' block


@pytest.mark.parametrize("bad,match", [("index_rows", "head rows"), ("mask_shape", "token_mask"), ("tile", "tile")])
def test_bad_input_is_a_clear_error(bad, match):
  q, k, v = (jnp.zeros((1, 8, h, 4)) for h in (4, 2, 2))
  index = jnp.zeros((1, 3 if bad == "index_rows" else 2, 8, 2), jnp.int32)
  token_mask = jnp.ones((1, 2, 8, 2, 3), bool) if bad == "mask_shape" else None
  with pytest.raises(ValueError, match=match):
    kv_major.attend_kv_major(q, k, v, index, block_kv=BLOCK, tile=0 if bad == "tile" else 4, token_mask=token_mask)


def _flash_and_autodiff(q, k, v, index, token_mask=None, tile=4):
  """[out, dq, dk, dv] of attend_kv_major with the flash VJP and with autodiff, each under one jit."""
  results = []
  for gradient in ("flash", "autodiff"):
    fn = lambda q, k, v, gradient=gradient: kv_major.attend_kv_major(  # noqa: E731
        q, k, v, jnp.asarray(index), block_kv=BLOCK, tile=tile, gradient=gradient,
        token_mask=None if token_mask is None else jnp.asarray(token_mask))
    results.append(jax.jit(lambda q, k, v, fn=fn: _values_and_grads(fn, q, k, v))(q, k, v))
  return results


@pytest.mark.parametrize("rows,mode,with_mask,seq", FLASH_CASES)
def test_flash_gradient_equals_autodiff_and_reference(seed, rows, mode, with_mask, seq):
  """The custom VJP (`gradient="flash"`) against the default (autodiff through the gathers and the merge, the
  tile attention's own VJP; the reference-checked path):
  Hl = H, KVH, 1, token masks, rows that see nothing, odd T, GQA; T = 3 has one block (no tiles)."""
  rng = np.random.default_rng(seed)
  batch, heads, kv_heads, dim, slots = 2, 4, 2, 8, 3
  q, k, v = _inputs(rng, batch, seq, heads, kv_heads, dim)
  index = _selection(rng, batch, {"heads": heads, "kv": kv_heads, "shared": 1}[rows], seq, slots, mode=mode)
  token_mask = rng.random((*index.shape, BLOCK)) < 0.6 if with_mask else None
  flash, autodiff = _flash_and_autodiff(q, k, v, index, token_mask)
  _assert_close(flash, autodiff, 2e-6)  # autodiff = the dense reference: test_kv_major_equals_dense_masked_reference
  assert np.abs(np.asarray(flash[3])).max() > 0  # some gradient flows (a test that cannot fail is a defect)


def test_flash_gradient_in_bfloat16(seed):
  rng = np.random.default_rng(seed)
  q, k, v = _inputs(rng, 1, 29, 4, 2, 16, jnp.bfloat16)
  index = _selection(rng, 1, 4, 29, 4)
  flash, autodiff = _flash_and_autodiff(q, k, v, index, tile=8)
  want = _values_and_grads(lambda q, k, v: _dense(q, k, v, _mask(index, 29, 4)), *(x.astype(jnp.float32)
                                                                                     for x in (q, k, v)))
  _assert_close(flash, want, 3e-2)
  _assert_close(flash, autodiff, 3e-2)


@pytest.mark.parametrize("gradient", ["autodiff", "flash"])
def test_return_lse_is_the_rows_logsumexp(seed, gradient):
  """return_lse=True: each row's log-sum-exp of its scaled, masked scores (NumPy), -inf where a row sees
  nothing; the output is unchanged and the lse carries no gradient (dsa_tile_kl's input)."""
  rng = np.random.default_rng(seed)
  seq, heads = 21, 4
  q, k, v = _inputs(rng, 1, seq, heads, 2, 8)
  index = _selection(rng, 1, 2, seq, 3)
  out, lse = jax.jit(lambda q, k, v: kv_major.attend_kv_major(q, k, v, jnp.asarray(index), block_kv=BLOCK, tile=4,
                                                              gradient=gradient, return_lse=True))(q, k, v)
  mask = _mask(index, seq, heads)  # [B, H, T, T]
  kk = np.repeat(np.asarray(k, np.float64), 2, axis=2)
  scores = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), kk) / np.sqrt(8)
  scores = np.where(mask, scores, -np.inf)
  top = np.max(scores, -1, keepdims=True)
  want = np.where(mask.any(-1), (np.where(np.isfinite(top), top, 0) + np.log(np.sum(np.exp(
      scores - np.where(np.isfinite(top), top, 0)), -1, keepdims=True)))[..., 0], -np.inf).transpose(0, 2, 1)
  got = np.asarray(lse, np.float64)
  assert got.shape == (1, seq, heads)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  finite = np.isfinite(want)
  assert finite.mean() > 0.5 and np.max(np.abs(got[finite] - want[finite])) < 1e-5
  plain = jax.jit(lambda q, k, v: kv_major.attend_kv_major(q, k, v, jnp.asarray(index), block_kv=BLOCK, tile=4,
                                                           gradient=gradient))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=0, atol=1e-6)
  grad = jax.grad(lambda q: jnp.sum(jnp.where(jnp.isfinite(lse_of(q)), lse_of(q), 0.0)))
  lse_of = lambda q: kv_major.attend_kv_major(q, k, v, jnp.asarray(index), block_kv=BLOCK, tile=4,  # noqa: E731
                                              gradient=gradient, return_lse=True)[1]
  assert not np.asarray(grad(q)).any()
