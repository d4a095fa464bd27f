"""What the attention backends read from a layout, whether its lists are host NumPy or jax arrays.

A layout is a `BlockLayout` or any object with its contract fields (seq_q, seq_kv, block_q,
block_kv, kv_index, kv_count, kv_mask_id, partial_masks); content-routed attention builds the lists
inside jit, so they may be tracers. Everything static (sizes, head count, max_kv, number of partial
tiles) comes from plain ints and array shapes (`geometry`), never from values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.layers.attention.layouts import FULL, BlockGrid


@dataclasses.dataclass(frozen=True)
class Geometry(BlockGrid):
  """Static facts of a layout: plain ints read from its fields and array shapes, never from values,
  so they are known at trace time even when the lists are traced (content-routed layouts)."""

  seq_q: int
  seq_kv: int
  block_q: int
  block_kv: int
  num_heads: int  # Hl: 1 (shared by all heads) or the number of attention heads
  max_kv: int
  num_partial: int  # P: tiles in partial_masks


LIST_FIELDS = ("kv_index", "kv_count", "kv_mask_id")


def geometry(layout) -> Geometry:
  """Checks the contract fields of a BlockLayout or any object with them (lists as NumPy or jax
  arrays, maybe traced) and returns its static facts; errors name the field and the fix."""
  for name in ("seq_q", "seq_kv", "block_q", "block_kv", *LIST_FIELDS, "partial_masks"):
    if getattr(layout, name, None) is None:
      raise ValueError(f"layout has no field {name!r}; a layout needs the BlockLayout contract fields "
                       f"(seq_q, seq_kv, block_q, block_kv, {', '.join(LIST_FIELDS)}, partial_masks)")
  for name in ("seq_q", "seq_kv", "block_q", "block_kv"):
    value = getattr(layout, name)
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"layout.{name} must be a positive Python int (static), got {value!r}; "
                       "only the lists may be traced")
  kv_index, kv_count, kv_mask_id, partial_masks = (getattr(layout, name) for name in (*LIST_FIELDS, "partial_masks"))
  geo = Geometry(int(layout.seq_q), int(layout.seq_kv), int(layout.block_q), int(layout.block_kv),
                 num_heads=kv_count.shape[0] if kv_count.ndim == 2 else -1, max_kv=kv_index.shape[-1],
                 num_partial=partial_masks.shape[0] if partial_masks.ndim == 3 else -1)
  expected = (geo.num_heads, geo.num_q_blocks, geo.max_kv)
  for name, value, shape in (("kv_count", kv_count, expected[:2]), ("kv_index", kv_index, expected),
                             ("kv_mask_id", kv_mask_id, expected)):
    if value.shape != shape or not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"layout.{name}: expected an int array of shape {shape} ([Hl, num_q_blocks"
                       f"{', max_kv' if len(shape) == 3 else ''}] for seq_q={geo.seq_q}, block_q={geo.block_q}), "
                       f"got {value.dtype} {value.shape}")
  if partial_masks.shape[1:] != (geo.block_q, geo.block_kv) or geo.num_partial < 1:
    raise ValueError(f"layout.partial_masks: expected bool [P>=1, {geo.block_q}, {geo.block_kv}], got "
                     f"{partial_masks.shape}; add one all-True dummy tile when nothing is partial")
  return geo


def on_host(layout) -> bool:
  """True for NumPy lists and tiles (bucketed host plan); jax arrays, maybe traced, take the traced plan."""
  return all(isinstance(getattr(layout, name), np.ndarray) for name in (*LIST_FIELDS, "partial_masks"))


def tile_ids(xp, kv_count, kv_mask_id, num_partial: int):
  """Row of the tile table (`tile_table`) for each list entry [..., width]: its partial mask id,
  P for FULL, P + 1 (all False) past kv_count. xp: np (host lists) or jnp (maybe traced)."""
  valid = xp.arange(kv_mask_id.shape[-1]) < kv_count[..., None]
  return xp.where(~valid, num_partial + 1, xp.where(kv_mask_id == FULL, num_partial, kv_mask_id)).astype(xp.int32)


def tile_table(xp, partial_masks):
  """bool [P + 2, bq, bk]: the partial masks, then FULL (all True), then padding (all False)."""
  shape = (1, *partial_masks.shape[1:])
  return xp.concatenate([partial_masks, xp.ones(shape, bool), xp.zeros(shape, bool)])


def token_mask(layout, geo: Geometry | None = None) -> jax.Array:
  """`BlockLayout.to_token_mask` in jnp, for layouts with (maybe traced) jax lists: bool [Hl, T, S]."""
  geo = geometry(layout) if geo is None else geo
  kv_index, kv_count, kv_mask_id = (jnp.asarray(getattr(layout, name)) for name in LIST_FIELDS)
  tile_id = tile_ids(jnp, kv_count, kv_mask_id, geo.num_partial)
  heads = jnp.arange(geo.num_heads)[:, None, None]
  rows = jnp.arange(geo.num_q_blocks)[None, :, None]
  # Padding entries (tile P + 1, never allowed) repeat a listed id: min keeps the listed entry's tile.
  table = jnp.full((geo.num_heads, geo.num_q_blocks, geo.num_kv_blocks), geo.num_partial + 1, jnp.int32)
  table = table.at[heads, rows, kv_index].min(tile_id)
  mask = tile_table(jnp, jnp.asarray(layout.partial_masks, bool))[table]  # [Hl, nq, nk, bq, bk]
  mask = mask.transpose(0, 1, 3, 2, 4).reshape(geo.num_heads, geo.padded_seq_q, geo.padded_seq_kv)
  return mask[:, :geo.seq_q, :geo.seq_kv]
