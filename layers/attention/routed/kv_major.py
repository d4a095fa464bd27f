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
Gradients: autodiff through the gathers and the merge with the tile attention's own flash VJP (probabilities
recomputed from each tile's saved lse), or (gradient="flash") a custom VJP of the whole call that recomputes tile
probabilities from the rows' final lse; none to the selection. A row with nothing visible returns zeros with zero
gradients.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


def _tile_forward(q_tiles, k_tiles, v_tiles, mask):
  scores = jnp.einsum("ntrd,nkd->ntrk", q_tiles, k_tiles, preferred_element_type=jnp.float32)
  probs, row_sum, lse = _softmax_parts(scores, None if mask is None else mask[:, :, None, :])
  out = jnp.einsum("ntrk,nkd->ntrd", probs.astype(v_tiles.dtype), v_tiles, preferred_element_type=jnp.float32)
  return out / row_sum[..., None], lse


@jax.custom_vjp
def _tile_attention(q_tiles: jax.Array, k_tiles: jax.Array, v_tiles: jax.Array, mask: jax.Array | None):
  """q [n, tile, R, D] (pre-scaled) against k, v [n, bk, D], mask bool [n, tile, bk] or None
  -> (out f32 [n, tile, R, D], lse f32 [n, tile, R]). The VJP (`_tile_backward`) is flash attention's inside
  each tile: probabilities recomputed from the saved lse, no stored [n, tile, R, bk]."""
  return _tile_forward(q_tiles, k_tiles, v_tiles, mask)


def _tile_attention_fwd(q_tiles, k_tiles, v_tiles, mask):
  out, lse = _tile_forward(q_tiles, k_tiles, v_tiles, mask)
  return (out, lse), (q_tiles, k_tiles, v_tiles, mask, lse)


def _tile_grads(q, k, v, mask, lse, d_out, delta=None, d_lse=None):
  """Flash attention's backward inside each tile: q, d_out [n, tile, R, D], k, v [n, bk, D], mask bool
  broadcastable to [n, tile, R, bk], lse f32 [n, tile, R] -> (dq [n, tile, R, D], dk, dv [n, bk, D]) f32.

  d_scores = P (dP - delta) with P recomputed from lse; delta = rowsum(dO * O) (given) or, from P and dP with
  no saved O, rowsum(P * dP) - d_lse (d_lse: the cotangent of lse). dk, dv contract the flattened (tile, R)
  rows as dimension 1 of both operands: the "ntrk,ntrd->nkd" einsum let XLA CPU transpose d_scores and run a
  slower dot (docs/benchmarks.md, 2026-12-04)."""
  n, tile, reps, _ = q.shape
  scores = jnp.einsum("ntrd,nkd->ntrk", q, k, preferred_element_type=jnp.float32)
  probs = _probs_from_lse(scores, mask, lse)
  d_out = d_out.astype(v.dtype)
  d_probs = jnp.einsum("ntrd,nkd->ntrk", d_out, v, preferred_element_type=jnp.float32)
  if delta is None:
    delta = jnp.sum(probs * d_probs, axis=-1) - d_lse
  d_scores = probs * (d_probs - delta[..., None])
  dq = jnp.einsum("ntrk,nkd->ntrd", d_scores.astype(k.dtype), k, preferred_element_type=jnp.float32)
  rows = lambda x, dtype: x.reshape(n, tile * reps, x.shape[-1]).astype(dtype)  # noqa: E731
  by_rows = (((1,), (1,)), ((0,), (0,)))
  dk = jax.lax.dot_general(rows(d_scores, q.dtype), rows(q, q.dtype), by_rows, preferred_element_type=jnp.float32)
  dv = jax.lax.dot_general(rows(probs, v.dtype), rows(d_out, v.dtype), by_rows, preferred_element_type=jnp.float32)
  return dq, dk, dv


def _tile_backward(residuals, cotangents):
  """dq, dk, dv of a tile batch from d_out and d_lse (the merge weights read lse); saves no tile output."""
  q, k, v, mask, lse = residuals
  d_out, d_lse = cotangents
  visible = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask[:, :, None, :]
  dq, dk, dv = _tile_grads(q, k, v, visible, lse, d_out, d_lse=d_lse)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_tile_attention.defvjp(_tile_attention_fwd, _tile_backward)


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


class _Plan(NamedTuple):
  """The integer side of one call (no gradient): masks and the dispatch of past-block assignments."""

  own_mask: jax.Array  # bool [B, T, Hl', bk]: the keys of its own block each row sees
  slot_assignment: jax.Array | None  # int32 [n * tile]: flat assignment (b, t, row, slot) of each tile slot or -1
  tile_group: jax.Array | None  # int32 [n]: the (b, kv head, block) group each tile reads
  assignment_slot: jax.Array | None  # int32 [B, T, Hl', S]: the tile slot of each assignment or -1
  tile_mask: jax.Array | None  # bool [n, tile, bk] (token_mask rows of the tile slots) or None


def _plan(index, mask_rows, *, kv_heads: int, block_kv: int, tile: int) -> _Plan:
  """index int32 [B, T, Hl', S], mask_rows bool [B, T, Hl', S, bk] or None -> the call's _Plan."""
  seq = index.shape[1]
  num_blocks = math.ceil(seq / block_kv)
  own_block = (jnp.arange(seq) // block_kv)[None, :, None, None]
  is_own = index == own_block  # at most one slot per row (no duplicates)
  key = own_block * block_kv + jnp.arange(block_kv)  # [1, T, 1, bk]
  own_mask = (key <= jnp.arange(seq)[None, :, None, None]) & jnp.any(is_own, axis=-1)[..., None]
  if mask_rows is not None:
    own_mask = own_mask & jnp.any(is_own[..., None] & mask_rows, axis=-2)
  if index.shape[-1] == 0 or num_blocks == 1:
    return _Plan(own_mask, None, None, None, None)
  past = jnp.where((index >= 0) & (index < own_block), index, -1)
  slot_assignment, tile_group, assignment_slot = dispatch(past, kv_heads=kv_heads, num_blocks=num_blocks, tile=tile)
  tile_mask = None
  if mask_rows is not None:
    tile_mask = mask_rows.reshape(-1, block_kv)[jnp.maximum(slot_assignment, 0)].reshape(-1, tile, block_kv)
  return _Plan(own_mask, slot_assignment, tile_group, assignment_slot, tile_mask)


def _pad(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _key_blocks(x: jax.Array, block_kv: int) -> jax.Array:
  """k or v [B, T, KVH, D] -> [B * KVH * nk, bk, D]: group (b, kv head, block) -> its keys (zero padded)."""
  batch, seq, kv_heads, dim = x.shape
  num_blocks = math.ceil(seq / block_kv)
  return _pad(x, num_blocks * block_kv).reshape(batch, num_blocks, block_kv, kv_heads, dim).transpose(
      0, 3, 1, 2, 4).reshape(-1, block_kv, dim)


def _tile_rows(x: jax.Array, plan: _Plan, slots: int, tile: int) -> jax.Array:
  """Per-row x [B, T, Hl', ...] -> its tile slots [n, tile, ...] (a slot that holds nothing reads row 0)."""
  rows = x.reshape(-1, *x.shape[3:])[jnp.maximum(plan.slot_assignment, 0) // slots]
  return rows.reshape(-1, tile, *x.shape[3:])


def _forward(q, k, v, plan: _Plan, geometry):
  """q [B, T, Hl', R, D] (pre-scaled), k, v [B, T, KVH, D] -> (out f32 [B, T, Hl', R, D], lse f32 [B, T, Hl', R])."""
  block_kv, tile, slots = geometry
  batch, seq, rows, reps, dim = q.shape
  padded = math.ceil(seq / block_kv) * block_kv
  own_out, own_lse = _own_block_attention(*(_pad(x, padded) for x in (q, k, v, plan.own_mask)))
  parts_lse, parts_out = [own_lse[:, :seq, :, :, None]], [own_out[:, :seq, :, :, None]]  # [B, T, Hl', R, 1(, D)]
  if plan.slot_assignment is not None:
    k_tiles, v_tiles = (_key_blocks(x, block_kv)[plan.tile_group] for x in (k, v))
    tile_out, tile_lse = _tile_attention(_tile_rows(q, plan, slots, tile), k_tiles, v_tiles, plan.tile_mask)
    taken = plan.assignment_slot >= 0
    slot = jnp.maximum(plan.assignment_slot, 0)
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
  total_lse = jnp.where(total[..., 0] > 0, top[..., 0] + jnp.log(jnp.where(total[..., 0] > 0, total[..., 0], 1.0)),
                        -jnp.inf)
  return out, total_lse


def _probs_from_lse(scores: jax.Array, mask: jax.Array, lse: jax.Array) -> jax.Array:
  """exp(scores - the row's final lse) where mask, else 0 (a row that sees nothing has lse -inf: all 0)."""
  finite = jnp.isfinite(lse)
  return jnp.where(mask & finite[..., None], jnp.exp(jnp.where(mask, scores, 0.0) - jnp.where(finite, lse, 0.0)[
      ..., None]), 0.0)


def _own_block_backward(q, k, v, mask, lse, delta, d_out):
  """Flash-style gradients of the own-block part (shapes as `_own_block_attention`, padded): (dq, dk, dv) f32."""
  batch, padded, rows, reps, dim = q.shape
  kv_heads, block = k.shape[2], mask.shape[-1]
  blocks, per_kv = padded // block, rows // kv_heads
  grouped = lambda x: x.reshape(batch, blocks, block, kv_heads, per_kv, *x.shape[3:])  # noqa: E731
  kb, vb = (x.reshape(batch, blocks, block, kv_heads, dim) for x in (k, v))
  qb, dob = grouped(q), grouped(d_out.astype(v.dtype))
  scores = jnp.einsum("bnqkgrd,bnskd->bnqkgrs", qb, kb, preferred_element_type=jnp.float32)
  probs = _probs_from_lse(scores, grouped(mask)[:, :, :, :, :, None, :], grouped(lse))
  d_probs = jnp.einsum("bnqkgrd,bnskd->bnqkgrs", dob, vb, preferred_element_type=jnp.float32)
  d_scores = probs * (d_probs - grouped(delta)[..., None])
  dq = jnp.einsum("bnqkgrs,bnskd->bnqkgrd", d_scores.astype(k.dtype), kb, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bnqkgrs,bnqkgrd->bnskd", d_scores.astype(q.dtype), qb, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bnqkgrs,bnqkgrd->bnskd", probs.astype(v.dtype), dob, preferred_element_type=jnp.float32)
  return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, plan: _Plan, geometry):
  """`_forward`'s (out, lse) with a flash-style VJP (`_attend_backward`); lse carries no gradient (the
  caller stops it)."""
  return _forward(q, k, v, plan, geometry)


def _attend_forward(q, k, v, plan, geometry):
  out, lse = _forward(q, k, v, plan, geometry)
  return (out, lse), (q, k, v, plan, out, lse)


def _attend_backward(geometry, residuals, cotangents):
  """dq, dk, dv recomputing every tile's probabilities from the rows' final lse (flash attention's backward):
  no saved tiles, and the tile rows' dq return to their rows by a gather through `assignment_slot` (the
  dispatch's inverse), summed over slots, instead of autodiff's scatter-add; dk, dv per tile sum into their
  key block (tiles sorted by block, a segment sum of whole tiles)."""
  block_kv, tile, slots = geometry
  q, k, v, plan, out, lse = residuals
  d_out = cotangents[0]  # lse's cotangent is zero: attend_kv_major returns it under stop_gradient
  batch, seq, rows, reps, dim = q.shape
  kv_heads = k.shape[2]
  num_blocks = math.ceil(seq / block_kv)
  padded = num_blocks * block_kv
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1)  # [B, T, Hl', R]: rowsum(dO * O)
  dq, dk, dv = _own_block_backward(*(_pad(x, padded) for x in (q, k, v, plan.own_mask, lse, delta, d_out)))
  dq, dk, dv = dq[:, :seq], dk[:, :seq], dv[:, :seq]
  if plan.slot_assignment is not None:
    q_tiles = _tile_rows(q, plan, slots, tile)  # [n, tile, R, D]
    do_tiles = _tile_rows(d_out.astype(v.dtype), plan, slots, tile)
    lse_tiles, delta_tiles = (_tile_rows(x, plan, slots, tile) for x in (lse, delta))  # [n, tile, R]
    k_tiles, v_tiles = (_key_blocks(x, block_kv)[plan.tile_group] for x in (k, v))  # [n, bk, D]
    mask = (plan.slot_assignment >= 0).reshape(-1, tile, 1, 1)
    if plan.tile_mask is not None:
      mask = mask & plan.tile_mask[:, :, None, :]
    dq_tiles, dk_tiles, dv_tiles = _tile_grads(q_tiles, k_tiles, v_tiles, mask, lse_tiles, do_tiles, delta_tiles)
    taken = (plan.assignment_slot >= 0)[..., None, None]
    dq_slots = dq_tiles.reshape(-1, reps, dim)[jnp.maximum(plan.assignment_slot, 0)]  # [B, T, Hl', S, R, D]
    dq = dq + jnp.sum(jnp.where(taken, dq_slots, 0.0), axis=3)

    def to_keys(grad):  # [n, bk, D] per tile -> [B, T, KVH, D], summed into the key block each tile read
      summed = jax.ops.segment_sum(grad, plan.tile_group, batch * kv_heads * num_blocks, indices_are_sorted=True)
      return summed.reshape(batch, kv_heads, padded, dim).transpose(0, 2, 1, 3)[:, :seq]
    dk, dv = dk + to_keys(dk_tiles), dv + to_keys(dv_tiles)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_forward, _attend_backward)


def attend_kv_major(q: jax.Array, k: jax.Array, v: jax.Array, block_index: jax.Array, *, block_kv: int,
                    tile: int = 128, token_mask: jax.Array | None = None, scale: float | None = None,
                    gradient: str = "autodiff", return_lse: bool = False):
  """Causal attention of q [B, T, H, D] over k, v [B, T, KVH, D], query t restricted to the keys <= t of its
  selected blocks block_index int32 [B, Hl, T, S] (Hl in (1, KVH, H); any slot order, -1 empty, no
  duplicates) and, with token_mask bool [B, Hl, T, S, block_kv], to the keys its slot keeps.
  Returns [B, T, H, D] in q.dtype (zeros for a row that sees nothing). gradient: "autodiff" (through the
  forward's gathers and merge, the tile attention by its own VJP; the default) or "flash" (the custom
  VJP `_attend_backward`, held equal by the tests; faster for MoBA's 512-key blocks, which use it; for
  64-key blocks faster alone but not inside the dsa_block layer: docs/benchmarks.md). return_lse: also return each row's log-sum-exp of its
  scaled scores, f32 [B, T, H] under stop_gradient (-inf for a row that sees nothing; dsa_tile_kl reads it)."""
  _check(q, k, v, block_index, block_kv, tile, token_mask)
  if gradient not in ("flash", "autodiff"):
    raise ValueError(f"attend_kv_major: gradient={gradient!r} is unknown; choose 'flash' or 'autodiff'.")
  batch, seq, heads, dim = q.shape
  kv_heads = k.shape[2]
  if block_index.shape[1] == 1 and kv_heads > 1:  # a shared row serves every kv group
    block_index = jnp.repeat(block_index, kv_heads, axis=1)
    token_mask = None if token_mask is None else jnp.repeat(token_mask, kv_heads, axis=1)
  rows = block_index.shape[1]
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  q = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(batch, seq, rows, heads // rows, dim)
  index = jnp.transpose(block_index.astype(jnp.int32), (0, 2, 1, 3))  # [B, T, Hl', S]
  mask_rows = None if token_mask is None else jnp.transpose(token_mask, (0, 2, 1, 3, 4))  # [B, T, Hl', S, bk]
  plan = jax.lax.stop_gradient(_plan(index, mask_rows, kv_heads=kv_heads, block_kv=block_kv, tile=tile))
  geometry = (block_kv, tile, index.shape[-1])
  out, lse = (_attend if gradient == "flash" else _forward)(q, k, v, plan, geometry)
  out = out.reshape(batch, seq, heads, dim).astype(q.dtype)
  if not return_lse:
    return out
  return out, jax.lax.stop_gradient(lse).reshape(batch, seq, heads)
