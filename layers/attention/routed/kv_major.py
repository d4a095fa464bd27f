"""Key-block-major ("kv_major") attention over any per-token block selection: the xla fast path of MoBA,
NSA's selected branch and dsa_block.

    out = attend_kv_major(q, k, v, block_index, block_kv=64, tile=128)

Lu et al. (2025, "MoBA", its implementation section / Algorithm 1, in our reading): instead of a query block
visiting the union of its tokens' blocks (selection.py), every key block gathers the query rows that chose it
(MoE-style dropless dispatch with key blocks as experts) and attends them in tiles; the parts merge by
log-sum-exp. Per assignment (row, slot) with block c and query t:

  c < t // block_kv   the block lies wholly before t: a kv-major tile, unmasked (or the slot's token_mask row);
  c == t // block_kv  the block containing t: causal in-block attention (the own-block path, token_mask too);
  c > t // block_kv   future: dropped (selections never contain it; masked defensively).

Rows: block_index [B, Hl, T, S] with Hl in (1, KVH, H). Hl = H: one row per (token, query head); Hl = KVH or 1:
one row per (token, kv head) carrying its G query heads (the shared row is repeated to the KVH groups), so a
GQA group's selection is dispatched once, not G times. Tiles: the B * T * Hl' * S assignments sorted by
(batch, kv head, block) and packed `tile` rows a tile, ceil(assignments / tile) + B * KVH * nk tiles at most
(each group wastes under one tile), a static count. Work is O(T * H * S * block_kv), never [T, T].
Gradients: autodiff through the gathers, the tile attention (rematerialised) and the merge; none to the
selection. A row with nothing visible returns zeros with zero gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _softmax_parts(scores: jax.Array, mask: jax.Array | None):
  """Masked f32 scores [..., k] -> (probs [..., k], row_sum [...], lse [...]); an all-masked row: 0, 0, -inf."""
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - row_max)
  row_sum = jnp.sum(probs, axis=-1)
  safe = jnp.where(row_sum > 0, row_sum, 1.0)
  lse = jnp.where(row_sum > 0, row_max[..., 0] + jnp.log(safe), -jnp.inf)
  return probs, safe, lse


@jax.checkpoint
def _tile_attention(q_tiles: jax.Array, k_tiles: jax.Array, v_tiles: jax.Array, mask: jax.Array | None):
  """q [n, tile, R, D] (pre-scaled) against k, v [n, bk, D], mask bool [n, tile, bk] or None
  -> (out f32 [n, tile, R, D], lse f32 [n, tile, R])."""
  scores = jnp.einsum("ntrd,nkd->ntrk", q_tiles, k_tiles, preferred_element_type=jnp.float32)
  probs, row_sum, lse = _softmax_parts(scores, None if mask is None else mask[:, :, None, :])
  out = jnp.einsum("ntrk,nkd->ntrd", probs.astype(v_tiles.dtype), v_tiles, preferred_element_type=jnp.float32)
  return out / row_sum[..., None], lse


def _own_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array):
  """Attention inside each query's own key block: q [B, Tp, Hl', R, D] (pre-scaled), k, v [B, Tp, KVH, D]
  padded to whole blocks, mask bool [B, Tp, Hl', bk] (causal, key range, selection and token_mask folded in)
  -> (out f32 [B, Tp, Hl', R, D], lse f32 [B, Tp, Hl', R])."""
  batch, padded, rows, reps, dim = q.shape
  kv_heads = k.shape[2]
  block = mask.shape[-1]
  blocks, per_kv = padded // block, rows // kv_heads
  qb = q.reshape(batch, blocks, block, kv_heads, per_kv, reps, dim)
  kb, vb = (x.reshape(batch, blocks, block, kv_heads, dim) for x in (k, v))
  scores = jnp.einsum("bnqkgrd,bnskd->bnqkgrs", qb, kb, preferred_element_type=jnp.float32)
  probs, row_sum, lse = _softmax_parts(scores, mask.reshape(batch, blocks, block, kv_heads, per_kv, 1, block))
  out = jnp.einsum("bnqkgrs,bnskd->bnqkgrd", probs.astype(v.dtype), vb, preferred_element_type=jnp.float32)
  out = out / row_sum[..., None]
  return out.reshape(batch, padded, rows, reps, dim), lse.reshape(batch, padded, rows, reps)


def dispatch(past: jax.Array, *, kv_heads: int, num_blocks: int, tile: int):
  """Packs past-block assignments into tiles of `tile` rows that read one key block.

  past int32 [B, T, Hl', S]: per row (b, t, row head) the past block of each slot, -1 where the slot is not a
  past block; row head r reads kv head r // (Hl' / KVH). Returns (slot_assignment int32 [n * tile]: the flat
  index into past of each tile slot or -1, tile_group int32 [n]: the (b, kv head, block) group each tile
  reads, assignment_slot int32 past.shape: the tile slot of each assignment or -1).
  """
  batch, _, rows, _ = past.shape
  per_kv = rows // kv_heads
  valid = past >= 0
  b = jnp.arange(batch)[:, None, None, None]
  r = jnp.arange(rows)[None, None, :, None]
  num_groups = batch * kv_heads * num_blocks
  group_id = jnp.where(valid, (b * kv_heads + r // per_kv) * num_blocks + past, num_groups).reshape(-1)
  assignments = group_id.shape[0]
  num_tiles = math.ceil(assignments / tile) + num_groups
  order = jnp.argsort(group_id, stable=True).astype(jnp.int32)
  sorted_group = group_id[order]
  counts = jnp.zeros(num_groups + 1, jnp.int32).at[group_id].add(1)[:num_groups]
  group_tiles = (counts + tile - 1) // tile
  tile_end = jnp.cumsum(group_tiles)
  tile_start = tile_end - group_tiles
  first = jnp.cumsum(counts) - counts  # rank of each group's first assignment in sorted order
  safe_group = jnp.minimum(sorted_group, num_groups - 1)
  rank = jnp.arange(assignments) - first[safe_group]
  slot = jnp.where(sorted_group < num_groups, tile_start[safe_group] * tile + rank, -1)
  slot_assignment = jnp.full(num_tiles * tile, -1, jnp.int32).at[jnp.where(slot >= 0, slot, num_tiles * tile)].set(
      order, mode="drop")
  tile_group = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"), num_groups - 1)
  assignment_slot = jnp.zeros(assignments, jnp.int32).at[order].set(slot).reshape(past.shape)
  return slot_assignment, tile_group.astype(jnp.int32), assignment_slot


def _check(q, k, v, block_index, block_kv, tile, token_mask):
  batch, seq, heads, _ = q.shape
  kv_heads = k.shape[2]
  if k.shape[:2] != (batch, seq) or v.shape != k.shape or heads % kv_heads:
    raise ValueError(f"attend_kv_major: expected q [B, T, H, D] and k = v [B, T, KVH, D] with KVH | H (causal "
                     f"self-attention), got {q.shape}, {k.shape}, {v.shape}")
  if block_index.ndim != 4 or block_index.shape[0] != batch or block_index.shape[2] != seq:
    raise ValueError(f"block_index must be [B={batch}, Hl, T={seq}, S], got {block_index.shape}")
  if block_index.shape[1] not in (1, kv_heads, heads):
    raise ValueError(f"block_index has {block_index.shape[1]} head rows; it must have 1, num_kv_heads={kv_heads} "
                     f"or num_heads={heads}")
  if token_mask is not None and token_mask.shape != (*block_index.shape, block_kv):
    raise ValueError(f"token_mask must be {(*block_index.shape, block_kv)} ([B, Hl, T, S, block_kv]), got "
                     f"{token_mask.shape}")
  if not isinstance(tile, int) or tile < 1 or not isinstance(block_kv, int) or block_kv < 1:
    raise ValueError(f"attend_kv_major: tile={tile!r} and block_kv={block_kv!r} must be integers >= 1 (the "
                     "kv_major_tile / block size fields of the attention kind).")


def attend_kv_major(q: jax.Array, k: jax.Array, v: jax.Array, block_index: jax.Array, *, block_kv: int,
                    tile: int = 128, token_mask: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """Causal attention of q [B, T, H, D] over k, v [B, T, KVH, D], query t restricted to the keys <= t of its
  selected blocks block_index int32 [B, Hl, T, S] (Hl in (1, KVH, H); any slot order, -1 empty, no
  duplicates) and, with token_mask bool [B, Hl, T, S, block_kv], to the keys its slot keeps.
  Returns [B, T, H, D] in q.dtype (zeros for a row that sees nothing)."""
  _check(q, k, v, block_index, block_kv, tile, token_mask)
  batch, seq, heads, dim = q.shape
  kv_heads = k.shape[2]
  if block_index.shape[1] == 1 and kv_heads > 1:  # a shared row serves every kv group
    block_index = jnp.repeat(block_index, kv_heads, axis=1)
    token_mask = None if token_mask is None else jnp.repeat(token_mask, kv_heads, axis=1)
  rows = block_index.shape[1]
  reps = heads // rows
  num_blocks = math.ceil(seq / block_kv)
  padded = num_blocks * block_kv
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  q = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(batch, seq, rows, reps, dim)
  index = jnp.transpose(block_index.astype(jnp.int32), (0, 2, 1, 3))  # [B, T, Hl', S]
  mask_rows = None if token_mask is None else jnp.transpose(token_mask, (0, 2, 1, 3, 4))  # [B, T, Hl', S, bk]
  own_block = (jnp.arange(seq) // block_kv)[None, :, None, None]
  is_own = index == own_block  # at most one slot per row (no duplicates)
  past = jnp.where((index >= 0) & (index < own_block), index, -1)

  # Own block: causal, key < T, selected, the own slot's token_mask row.
  key = own_block * block_kv + jnp.arange(block_kv)  # [1, T, 1, bk]
  own_mask = (key <= jnp.arange(seq)[None, :, None, None]) & jnp.any(is_own, axis=-1)[..., None]
  if mask_rows is not None:
    own_mask = own_mask & jnp.any(is_own[..., None] & mask_rows, axis=-2)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - seq)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  own_out, own_lse = _own_block_attention(pad(q), pad(k), pad(v), pad(own_mask))
  parts_lse, parts_out = [own_lse[:, :seq, :, :, None]], [own_out[:, :seq, :, :, None]]  # [B, T, Hl', R, 1(, D)]

  if index.shape[-1] > 0 and num_blocks > 1:
    slot_assignment, tile_group, assignment_slot = dispatch(past, kv_heads=kv_heads, num_blocks=num_blocks,
                                                            tile=tile)
    slots = index.shape[-1]
    used = jnp.maximum(slot_assignment, 0)
    q_tiles = q.reshape(-1, reps, dim)[used // slots].reshape(-1, tile, reps, dim)
    to_blocks = lambda x: pad(x).reshape(batch, num_blocks, block_kv, kv_heads, dim).transpose(  # noqa: E731
        0, 3, 1, 2, 4).reshape(-1, block_kv, dim)  # group (b, kv head, block) -> its keys
    tile_mask = None if mask_rows is None else mask_rows.reshape(-1, block_kv)[used].reshape(-1, tile, block_kv)
    tile_out, tile_lse = _tile_attention(q_tiles, to_blocks(k)[tile_group], to_blocks(v)[tile_group], tile_mask)
    taken = assignment_slot >= 0
    slot = jnp.maximum(assignment_slot, 0)
    past_lse = jnp.where(taken[..., None], tile_lse.reshape(-1, reps)[slot], -jnp.inf)  # [B, T, Hl', S, R]
    past_out = jnp.where(taken[..., None, None], tile_out.reshape(-1, reps, dim)[slot], 0.0)
    parts_lse.append(jnp.moveaxis(past_lse, 3, 4))
    parts_out.append(jnp.moveaxis(past_out, 3, 4))

  lse = jnp.concatenate(parts_lse, axis=-1)  # [B, T, Hl', R, 1 + S]
  top = jax.lax.stop_gradient(jnp.max(lse, axis=-1, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lse - top)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)  # a row that sees nothing: all weights 0
  out = sum(jnp.einsum("btgrs,btgrsd->btgrd", w, o) for w, o in
            zip(jnp.split(weights, [1], axis=-1), parts_out, strict=False))
  return out.reshape(batch, seq, heads, dim).astype(q.dtype)
