"""Blocked CPU causal attention against `jax.nn.dot_product_attention(is_causal=True)`: values and dq/dk/dv.

Inputs come from the `seed` fixture (tests/conftest.py; fresh under `pytest -m fuzz`) or from hypothesis
(derandomized except in the `fuzz` twin).
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.layers.attention import dense

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}  # on `_relative_errors`


@functools.partial(jax.jit, static_argnames=("block_size", "is_causal"))
def _jitted_values_and_grads(q, k, v, cotangent, block_size, is_causal):
  if block_size is None:
    fn = functools.partial(jax.nn.dot_product_attention, is_causal=is_causal)
  else:
    fn = functools.partial(dense.blocked_causal_attention, block_size=block_size)
  out, vjp = jax.vjp(fn, q, k, v)
  return [x.astype(jnp.float32) for x in (out, *vjp(cotangent.astype(out.dtype)))]


def _values_and_grads(q, k, v, cotangent, block_size=None, is_causal=True):
  """(out, dq, dk, dv) in NumPy f32: blocked with `block_size`, or the reference with block_size None."""
  return [np.asarray(x) for x in _jitted_values_and_grads(q, k, v, cotangent, block_size, is_causal)]


def _random_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q, k, v = normal(batch, seq, heads, head_dim), normal(batch, seq, kv_heads, head_dim), normal(batch, seq, kv_heads,
                                                                                                  head_dim)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), normal(batch, seq, heads, head_dim)


def _relative_errors(got, expected):
  """max |got - expected| per output, over max |expected out| for out and over the largest expected
  gradient for dq/dk/dv (as the kernel tests do): a gradient that is exactly 0 in exact arithmetic
  (dq, dk at T = 1) comes out of f32 cancellation as ~1e-7, which is no error at the gradients' scale."""
  errors = {}
  grad_scale = max(float(np.max(np.abs(e))) for e in expected[1:])
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    assert not np.isnan(g).any() and not np.isnan(e).any(), f"{name}: NaN"
    assert np.isfinite(g).all(), f"{name}: non-finite values"
    scale = float(np.max(np.abs(e))) if name == "out" else grad_scale
    errors[name] = float(np.max(np.abs(g - e)) / (scale + 1e-12))
  assert np.isfinite(list(errors.values())).all(), errors
  return errors


def _assert_blocked_matches_reference(seed, batch, seq, heads, kv_heads, head_dim, block_size, dtype):
  q, k, v, cotangent = _random_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype)
  f32 = lambda x: x.astype(jnp.float32)
  expected = _values_and_grads(f32(q), f32(k), f32(v), cotangent)
  got = _values_and_grads(q, k, v, cotangent, block_size=block_size)
  errors = _relative_errors(got, expected)
  assert max(errors.values()) < TOL[dtype], (errors, dict(seed=seed, seq=seq, block_size=block_size, kv_heads=kv_heads))


BLOCKED_CASES = dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), seq=st.integers(1, 40),
                     kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 3]),
                     head_dim=st.sampled_from([4, 8]), block_size=st.integers(1, 48))


def _blocked_case(seed, batch, seq, kv_heads, groups, head_dim, block_size):
  _assert_blocked_matches_reference(seed, batch, seq, kv_heads * groups, kv_heads, head_dim, block_size, jnp.float32)


@hypothesis.settings(max_examples=6, deadline=None)  # derandomized by the conftest profile; 15 under -m fuzz
@hypothesis.given(**BLOCKED_CASES)
def test_blocked_matches_reference(seed, batch, seq, kv_heads, groups, head_dim, block_size):
  _blocked_case(seed, batch, seq, kv_heads, groups, head_dim, block_size)


@pytest.mark.fuzz
@hypothesis.settings(max_examples=15, deadline=None, derandomize=False)
@hypothesis.given(**BLOCKED_CASES)
def test_blocked_matches_reference_fuzz(seed, batch, seq, kv_heads, groups, head_dim, block_size):
  _blocked_case(seed, batch, seq, kv_heads, groups, head_dim, block_size)


def test_blocked_matches_reference_at_model_shape(seed):
  """The `small` preset's head shape, blocks of 128 (the CPU default), a ragged last block."""
  _assert_blocked_matches_reference(seed, 1, 300, 8, 8, 64, dense.CPU_BLOCK_SIZE, jnp.float32)


def test_blocked_bfloat16(seed):
  _assert_blocked_matches_reference(seed, 2, 70, 4, 2, 16, 32, jnp.bfloat16)


def test_tolerance_catches_a_wrong_mask(seed):
  """The same check on the non-causal reference fails by far: the tolerance is tight enough to see the mask."""
  q, k, v, cotangent = _random_inputs(seed, 2, 33, 4, 2, 8, jnp.float32)
  expected = _values_and_grads(q, k, v, cotangent, is_causal=False)
  got = _values_and_grads(q, k, v, cotangent, block_size=8)
  errors = _relative_errors(got, expected)
  assert min(errors.values()) > 100 * TOL[jnp.float32], (errors, dict(seed=seed))


def test_causal_attention_dispatch(seed):
  q, k, v, _ = _random_inputs(seed, 1, 20, 4, 4, 8, jnp.float32)
  got = np.asarray(dense.causal_attention(q, k, v))
  if jax.default_backend() == "cpu":
    expected = dense.blocked_causal_attention(q, k, v)
  else:
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_array_equal(got, np.asarray(expected))
