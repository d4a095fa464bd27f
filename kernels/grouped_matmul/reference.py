"""Per-group loop references of the grouped matmuls (tests only; O(G) full-size products).

Rows of lhs are sorted by group (group g owns rows [offsets[g], offsets[g + 1])); rows past
sum(group_sizes) belong to no group. Both functions are plain JAX, so JAX differentiates them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_masks(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """bool [G, M]: row r belongs to group g."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  starts = ends - group_sizes.astype(jnp.int32)
  rows = jnp.arange(num_rows)
  return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                  preferred_element_type=None) -> jax.Array:
  """out[r] = lhs[r] @ rhs[g(r)] for grouped rows, 0 past sum(group_sizes): [M, K], [G, K, N] ->
  [M, N] in `preferred_element_type` (default lhs.dtype); f32 accumulation."""
  masks = _row_masks(group_sizes, lhs.shape[0])
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for g in range(rhs.shape[0]):
    product = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32)
    out = jnp.where(masks[g][:, None], product, out)
  return out.astype(preferred_element_type or lhs.dtype)


def tgmm_reference(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array,
                   preferred_element_type=None) -> jax.Array:
  """out[g] = lhs[rows of g]^T @ grad[rows of g]: [M, K], [M, N] -> [G, K, N] (0 for empty g)."""
  masks = _row_masks(group_sizes, lhs.shape[0])
  outs = []
  for g in range(group_sizes.shape[0]):
    x = jnp.where(masks[g][:, None], lhs, 0)
    dy = jnp.where(masks[g][:, None], grad, 0)
    outs.append(jnp.dot(x.T, dy, preferred_element_type=jnp.float32))
  return jnp.stack(outs).astype(preferred_element_type or lhs.dtype)
