"""Rotary position embedding (Su et al., 2021, "RoFormer"), rotate-half convention."""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies [head_dim // 2] in f32."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; choose an even head_dim.")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta**exponents)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10_000.0) -> jax.Array:
  """Rotates pairs (x[..., i], x[..., i + D/2]) by angle positions * freq_i.

  Args:
    x: [B, T, H, D] queries or keys.
    positions: [B, T] or [T] integer token positions.
    theta: RoPE base.
  Returns:
    [B, T, H, D] in x.dtype; the math runs in f32.
  """
  head_dim = x.shape[-1]
  # [T] positions stay [T]: the sin/cos tables are then shared by the batch rather than built per row.
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)  # [(B,) T, D/2]
  sin = jnp.sin(angles)[..., None, :]
  cos = jnp.cos(angles)[..., None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)
