"""Tests of layers/rope.py against the RoFormer formula (Su et al., 2021), written from scratch in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseformer.layers import rope

# Jitted (compiled once per shape; eager dispatch would compile each of its ops per shape), theta traced.
apply_rope = jax.jit(lambda x, positions, theta=10_000.0: rope.apply_rope(x, positions, theta=theta))


def _reference_rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
  """RoFormer eq. 34 in float64, half-split pairs (i, i + D/2): each pair times a 2 x 2 rotation matrix.

  x: [B, T, H, D]; positions: [B, T]. theta_i = base^(-2i/D); pair i at position m turns by m * theta_i.
  """
  batch, length, heads, head_dim = x.shape
  half = head_dim // 2
  out = np.empty(x.shape, np.float64)
  for b in range(batch):
    for t in range(length):
      m = float(positions[b, t])
      for i in range(half):
        angle = m * base ** (-2.0 * i / head_dim)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        for h in range(heads):
          pair = np.array([x[b, t, h, i], x[b, t, h, i + half]], np.float64)
          out[b, t, h, i], out[b, t, h, i + half] = rotation @ pair
  return out


def test_frequencies_are_base_to_the_minus_two_i_over_d():
  for head_dim, base in ((2, 10_000.0), (16, 10_000.0), (64, 500_000.0)):
    got = np.asarray(rope.rope_frequencies(head_dim, base))
    want = np.array([base ** (-2.0 * i / head_dim) for i in range(head_dim // 2)])
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_allclose(got, want, rtol=2e-6)
  assert float(rope.rope_frequencies(16, 10_000.0)[0]) == 1.0


def test_odd_head_dim_is_rejected():
  with pytest.raises(ValueError, match="even head_dim, got 7"):
    rope.rope_frequencies(7, 10_000.0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), half=st.sampled_from([1, 8]), base=st.sampled_from([100.0, 10_000.0, 1e6]))
def test_apply_rope_matches_the_rotation_matrix_reference(seed, half, base):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 5, 3, 2 * half)).astype(np.float32)
  positions = rng.integers(0, 64, size=(2, 5))
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=base))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, _reference_rope(x, positions, base), atol=2e-5, rtol=1e-5)


def test_large_positions_and_shared_positions():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 2, 8)).astype(np.float32)
  positions = np.array([0, 1, 1000, 4095])
  # [T] positions broadcast over the batch, exactly as the same [B, T] positions.
  shared = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions)))
  per_row = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(np.stack([positions] * 2))))
  np.testing.assert_array_equal(shared, per_row)
  assert np.isfinite(shared).all()
  # f32 angles of up to ~4e3 radians: absolute error ~ position * 2^-24 per rotation.
  np.testing.assert_allclose(shared, _reference_rope(x, np.stack([positions] * 2), 10_000.0), atol=2e-3)
  np.testing.assert_array_equal(shared[:, 0], x[:, 0])  # position 0 is the identity


def test_rotation_keeps_norms_and_dtype():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 6, 2, 16)).astype(np.float32)
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.arange(6) * 37))
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  bf16 = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.arange(6))
  assert bf16.dtype == jnp.bfloat16


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 512), n=st.integers(0, 512), shift=st.integers(-512, 512))
def test_scores_depend_only_on_the_relative_position(seed, m, n, shift):
  """<R(m) q, R(n) k> = <R(m + s) q, R(n + s) k> = <q, R(n - m) k> (RoFormer eq. 16)."""
  shift = max(shift, -min(m, n))  # positions stay >= 0
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32) for _ in range(2))

  def score(q_position, k_position):
    rotated_q = apply_rope(q, jnp.array([q_position]))
    rotated_k = apply_rope(k, jnp.array([k_position]))
    return float(jnp.einsum("BTHD,BTHD->", rotated_q, rotated_k))

  base_score = score(m, n)
  assert np.isfinite(base_score)
  assert base_score == pytest.approx(score(m + shift, n + shift), abs=2e-3)
  # The same from the float64 reference: q unrotated, k turned by n - m (negative angles allowed).
  k_relative = _reference_rope(np.asarray(k), np.array([[n - m]]), 10_000.0)
  assert base_score == pytest.approx(float(np.sum(np.asarray(q, np.float64) * k_relative)), abs=2e-3)
