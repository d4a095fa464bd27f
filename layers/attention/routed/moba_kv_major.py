"""MoBA's key-block-major ("efficient") scheme: the xla fast path of `moba_attention`.

Lu et al. (2025), MoBA's implementation section (its Algorithm 1, in our reading): instead of a query block visiting the union of its tokens' blocks,
every key block gathers the (head, token) queries that chose it (MoE-style dropless dispatch with key blocks
as experts), attends them without a mask (a chosen past block lies wholly before its queries), and the partial
results merge with the causal own-block attention by log-sum-exp.

Dispatch: the B * H * T * (topk - 1) past-block assignments are sorted by (batch, kv head, block) and packed
into tiles of `tile` queries that all read one key block: at most ceil(assignments / tile) + B * KVH * nk tiles
(each group wastes under one tile), a static count. Work is O(T * H * topk * block), never [T, T].
Gradients are autodiff through the gathers, the tile attention (rematerialised: its scores are not stored)
and the merge; the selection has none.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


@jax.checkpoint
def _tile_attention(q_tiles: jax.Array, k_tiles: jax.Array, v_tiles: jax.Array):
  """q [n, tile, D] (pre-scaled) against k, v [n, bk, D] -> (out f32 [n, tile, D], lse f32 [n, tile])."""
  scores = jnp.einsum("ntd,nkd->ntk", q_tiles, k_tiles, preferred_element_type=jnp.float32)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  probs = jnp.exp(scores - row_max)
  row_sum = jnp.sum(probs, axis=-1)
  out = jnp.einsum("ntk,nkd->ntd", probs.astype(v_tiles.dtype), v_tiles, preferred_element_type=jnp.float32)
  return out / row_sum[..., None], row_max[..., 0] + jnp.log(row_sum)


def _own_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int):
  """Causal attention inside each key block: q [B, Tp, H, D] (pre-scaled), k, v [B, Tp, KVH, D] padded to whole
  blocks -> (out f32 [B, H, Tp, D], lse f32 [B, H, Tp]); padded keys are masked."""
  batch, padded, heads, dim = q.shape
  kv_heads, blocks = k.shape[2], padded // block_size
  group = heads // kv_heads
  qb = q.reshape(batch, blocks, block_size, kv_heads, group, dim)
  kb, vb = (x.reshape(batch, blocks, block_size, kv_heads, dim) for x in (k, v))
  scores = jnp.einsum("bnqkgd,bnskd->bkgnqs", qb, kb, preferred_element_type=jnp.float32)
  causal = jnp.arange(block_size)[:, None] >= jnp.arange(block_size)[None, :]
  scores = jnp.where(causal, scores, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))  # the diagonal keeps it finite
  probs = jnp.exp(scores - row_max)
  row_sum = jnp.sum(probs, axis=-1)
  out = jnp.einsum("bkgnqs,bnskd->bkgnqd", probs.astype(v.dtype), vb, preferred_element_type=jnp.float32)
  out = (out / row_sum[..., None]).reshape(batch, heads, blocks * block_size, dim)
  lse = (row_max[..., 0] + jnp.log(row_sum)).reshape(batch, heads, blocks * block_size)
  return out, lse


def dispatch(block_index: jax.Array, *, kv_heads: int, num_blocks: int, tile: int):
  """Packs past-block assignments into tiles.

  block_index int32 [B, H, T, S] (slot 0 = own block, -1 = empty). Returns (slot_query int32 [n * tile]: the
  flat (b, t, h) query row of each tile slot or -1, tile_group int32 [n]: the (b, kv head, block) group each
  tile reads, assignment_slot int32 [B, H, T, S - 1]: the tile slot of each past assignment or -1).
  """
  batch, heads, seq, _ = block_index.shape
  group = heads // kv_heads
  past = block_index[..., 1:]
  valid = past >= 0
  b = jnp.arange(batch)[:, None, None, None]
  h = jnp.arange(heads)[None, :, None, None]
  t = jnp.arange(seq)[None, None, :, None]
  num_groups = batch * kv_heads * num_blocks
  group_id = jnp.where(valid, (b * kv_heads + h // group) * num_blocks + past, num_groups).reshape(-1)
  query_row = jnp.broadcast_to((b * seq + t) * heads + h, past.shape).reshape(-1)
  assignments = group_id.shape[0]
  num_tiles = math.ceil(assignments / tile) + num_groups
  order = jnp.argsort(group_id, stable=True)
  sorted_group = group_id[order]
  counts = jnp.zeros(num_groups + 1, jnp.int32).at[group_id].add(1)[:num_groups]
  group_tiles = (counts + tile - 1) // tile
  tile_end = jnp.cumsum(group_tiles)
  tile_start = tile_end - group_tiles
  first = jnp.cumsum(counts) - counts  # rank of each group's first assignment in sorted order
  safe_group = jnp.minimum(sorted_group, num_groups - 1)
  rank = jnp.arange(assignments) - first[safe_group]
  slot = jnp.where(sorted_group < num_groups, tile_start[safe_group] * tile + rank, -1)
  slot_query = jnp.full(num_tiles * tile, -1, jnp.int32).at[jnp.where(slot >= 0, slot, num_tiles * tile)].set(
      query_row[order], mode="drop")
  tile_group = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"), num_groups - 1)
  assignment_slot = jnp.zeros(assignments, jnp.int32).at[order].set(slot).reshape(past.shape)
  return slot_query, tile_group.astype(jnp.int32), assignment_slot


def attend(q: jax.Array, k: jax.Array, v: jax.Array, block_index: jax.Array, *, block_size: int, tile: int = 128,
           scale: float | None = None) -> jax.Array:
  """MoBA attention of q [B, T, H, D] over k, v [B, T, KVH, D] given selections block_index [B, H, T, S]
  (`moba.select_blocks`: own block first, then past blocks, -1 empty) -> [B, T, H, D] in q.dtype."""
  batch, seq, heads, dim = q.shape
  kv_heads = k.shape[2]
  num_blocks = math.ceil(seq / block_size)
  padded = num_blocks * block_size
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0)))
  own_out, own_lse = _own_block_attention(pad(q), pad(k), pad(v), block_size)
  own_out, own_lse = own_out[:, :, :seq], own_lse[:, :, :seq]  # [B, H, T, D], [B, H, T]
  if block_index.shape[-1] == 1:
    return jnp.swapaxes(own_out, 1, 2).astype(q.dtype)

  slot_query, tile_group, assignment_slot = dispatch(block_index, kv_heads=kv_heads, num_blocks=num_blocks, tile=tile)
  q_rows = q.reshape(batch * seq * heads, dim)
  q_tiles = q_rows[jnp.maximum(slot_query, 0)].reshape(-1, tile, dim)
  # [B * KVH * nk, bk, D]: group (b, kv head, block) -> its keys
  to_blocks = lambda x: pad(x).reshape(batch, num_blocks, block_size, kv_heads, dim).transpose(0, 3, 1, 2, 4).reshape(
      -1, block_size, dim)
  tile_out, tile_lse = _tile_attention(q_tiles, to_blocks(k)[tile_group], to_blocks(v)[tile_group])
  taken = assignment_slot >= 0
  slot = jnp.maximum(assignment_slot, 0)
  past_out = tile_out.reshape(-1, dim)[slot]  # [B, H, T, S - 1, D]
  past_lse = jnp.where(taken, tile_lse.reshape(-1)[slot], -jnp.inf)

  lse = jnp.concatenate([own_lse[..., None], past_lse], axis=-1)  # [B, H, T, S]
  total = jax.scipy.special.logsumexp(lse, axis=-1, keepdims=True)  # finite: the own block is never empty
  weights = jnp.exp(lse - total)
  out = weights[..., 0, None] * own_out + jnp.einsum("bhts,bhtsd->bhtd", weights[..., 1:],
                                                     jnp.where(taken[..., None], past_out, 0.0))
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)
