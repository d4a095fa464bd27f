"""Shared pieces of cached decode for the content-routed kinds (decode_moba.py, decode_nsa.py, decode_dsa.py).

Contract of every routed kind's decode (issue 13), called by the model-level decode (models/decode.py):

    cache = module.init_cache(batch, max_len)          # dict of zero arrays; module.cache_logical_axes() names axes
    out, cache = module.prefill(x, q, k, v, positions, lengths, cache)   # x [B, T, D], q [B, T, H, Dh], k, v [B, T, KVH, Dh]
    out, cache = module.decode_step(x_t, q_t, k_t, v_t, positions, cache)  # [B, 1, ...], positions int32 [B]

q and k carry RoPE already. Prefill rows are right-padded: row b is real up to lengths[b]; its outputs past
lengths[b] are zeros and its cache holds only real positions (everything past them is zero). In decode,
positions[b] is the index of row b's new token in its own sequence, which equals the number of tokens its
cache holds (rows advance independently); prefill positions are the token indices 0 .. T - 1, as in
training. A position >= max_len is not stored (scatter updates out of range are dropped).

Helpers here: writes of one token per row, ring buffers (slot s holds the latest position == s mod size),
and `gather_attend`, softmax attention of one query token over gathered cache rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_prefill(kind: str, q: jax.Array, k: jax.Array, lengths: jax.Array, max_len: int) -> None:
  """ValueError (before any work) unless q [B, T, H, D], k [B, T, KVH, D], lengths [B] and T <= max_len."""
  if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2]:
    raise ValueError(f"{kind} prefill: q must be [B, T, H, D] and k, v [B, T, KVH, D]; got {q.shape}, {k.shape}.")
  if lengths.shape != (q.shape[0],):
    raise ValueError(f"{kind} prefill: lengths must be int32 [B={q.shape[0]}], got shape {lengths.shape}.")
  if q.shape[1] > max_len:
    raise ValueError(f"{kind} prefill: {q.shape[1]} prompt positions exceed the cache's max_len={max_len}; "
                     "build the cache with a larger max_len (init_cache(batch, max_len)).")


def check_step(kind: str, q_t: jax.Array, k_t: jax.Array, positions: jax.Array) -> None:
  """ValueError unless q_t [B, 1, H, D], k_t [B, 1, KVH, D] and positions [B]."""
  if q_t.ndim != 4 or k_t.ndim != 4 or q_t.shape[1] != 1 or k_t.shape[:2] != q_t.shape[:2]:
    raise ValueError(f"{kind} decode_step: q_t must be [B, 1, H, D] and k_t, v_t [B, 1, KVH, D]; got "
                     f"{q_t.shape}, {k_t.shape}.")
  if positions.shape != (q_t.shape[0],):
    raise ValueError(f"{kind} decode_step: positions must be int32 [B={q_t.shape[0]}] (one per row), got "
                     f"shape {positions.shape}.")


def real_rows(lengths: jax.Array, seq_len: int) -> jax.Array:
  """bool [B, T]: token t of row b is real (t < lengths[b])."""
  return jnp.arange(seq_len)[None, :] < lengths[:, None]


def keep_real(x: jax.Array, lengths: jax.Array, max_len: int | None = None) -> jax.Array:
  """x [B, T, ...] with the positions >= lengths[b] zeroed, padded with zeros to max_len on axis 1."""
  mask = real_rows(lengths, x.shape[1]).reshape(*x.shape[:2], *(1,) * (x.ndim - 2))
  x = jnp.where(mask, x, jnp.zeros((), x.dtype))
  if max_len is not None and max_len > x.shape[1]:
    x = jnp.pad(x, [(0, 0), (0, max_len - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  return x


def write(buffer: jax.Array, index: jax.Array, value: jax.Array, when: jax.Array | None = None) -> jax.Array:
  """buffer [B, L, ...] with buffer[b, index[b]] = value[b] (value [B, ...]) where `when[b]`; an index outside
  [0, L) writes nothing."""
  rows = jnp.arange(buffer.shape[0])
  value = value.astype(buffer.dtype)
  if when is not None:
    old = buffer[rows, jnp.clip(index, 0, buffer.shape[1] - 1)]
    value = jnp.where(when.reshape(-1, *(1,) * (value.ndim - 1)), value, old)
  index = jnp.where(index < 0, buffer.shape[1], index)  # negative indices would wrap around
  return buffer.at[rows, index].set(value, mode="drop")


def ring_positions(last: jax.Array, size: int) -> jax.Array:
  """int32 [B, size]: the position slot s of a ring holds once position last[b] is written, i.e. the largest
  p <= last[b] with p = s (mod size); negative where the slot is still empty."""
  slot = jnp.arange(size)[None, :]
  return (last[:, None] - jnp.mod(last[:, None] - slot, size)).astype(jnp.int32)


def ring_from_sequence(x: jax.Array, lengths: jax.Array, size: int) -> jax.Array:
  """The ring of `size` slots after writing row b's real tokens x[b, :lengths[b]] in order: [B, size, ...]."""
  held = ring_positions(lengths - 1, size)  # [B, size]
  rows = jnp.arange(x.shape[0])[:, None]
  gathered = x[rows, jnp.clip(held, 0, x.shape[1] - 1)]
  return jnp.where((held >= 0).reshape(*held.shape, *(1,) * (x.ndim - 2)), gathered, jnp.zeros((), x.dtype))


def gather_attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, index: jax.Array, valid: jax.Array, *,
                  scale: float | None = None) -> jax.Array:
  """Softmax attention of one query token per row over the cache rows it selected.

  q [B, H, D]; k_cache, v_cache [B, L, KVH, D]; index int [B, Hs, K] cache rows (any value where not
  valid), valid bool [B, Hs, K], with Hs = 1 (one selection for all heads, DSA), KVH (one per GQA group,
  NSA) or H (one per query head, MoBA; query head h reads kv head h // (H / KVH)). Only the K selected
  rows of each kv head are gathered ([B, KVH, R, K, D], R = Hs / KVH or 1), never a masked full row.
  Logits scale (default 1 / sqrt(D)) is applied to q with one rounding, as the block backends do;
  softmax in f32; a query with no valid key returns zeros. Returns [B, H, D] in q.dtype.
  """
  batch, heads, dim = q.shape
  kv_heads = k_cache.shape[2]
  selection_heads = index.shape[1]
  if selection_heads not in (1, kv_heads, heads):
    raise ValueError(f"gather_attend: index has {selection_heads} head rows; it must have 1, num_kv_heads="
                     f"{kv_heads} or num_heads={heads}.")
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  per_group = max(1, selection_heads // kv_heads)  # R selections per kv head
  shape = (batch, kv_heads, per_group, index.shape[-1])
  index = jnp.broadcast_to(index.reshape(batch, -1, per_group, index.shape[-1]), shape)
  valid = jnp.broadcast_to(valid.reshape(batch, -1, per_group, valid.shape[-1]), shape)
  index = jnp.where(valid, index, 0).astype(jnp.int32)
  rows = jnp.arange(batch)[:, None, None, None]
  kv_head = jnp.arange(kv_heads)[None, :, None, None]
  k_sel, v_sel = k_cache[rows, index, kv_head], v_cache[rows, index, kv_head]  # [B, KVH, R, K, D]
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  q = q.reshape(batch, kv_heads, per_group, heads // kv_heads // per_group, dim)  # [B, KVH, R, G / R, D]
  scores = jnp.einsum("bkrgd,bkrjd->bkrgj", q, k_sel, preferred_element_type=jnp.float32)
  scores = jnp.where(valid[:, :, :, None, :], scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bkrgj,bkrjd->bkrgd", weights.astype(v_sel.dtype), v_sel, preferred_element_type=jnp.float32)
  out = out / jnp.where(total > 0, total, 1.0)
  return out.reshape(batch, heads, dim).astype(q.dtype)


def block_tokens(block_index: jax.Array, block_size: int, position: jax.Array, max_len: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Selected key blocks int [B, Hs, S] (-1 = empty) -> their tokens [B, Hs, S * block_size] and valid (the
  block is listed, token <= position[b], token < max_len)."""
  tokens = block_index[..., None] * block_size + jnp.arange(block_size)  # [B, Hs, S, bs]
  valid = (block_index[..., None] >= 0) & (tokens <= position[:, None, None, None]) & (tokens < max_len)
  flat = lambda x: x.reshape(*x.shape[:2], -1)  # noqa: E731
  return flat(tokens), flat(valid)
