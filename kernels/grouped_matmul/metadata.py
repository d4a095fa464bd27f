"""Tiles and group metadata of the grouped-matmul kernels (traced; computed on device inside jit).

Rows of `lhs` are sorted by group: group g owns rows [offsets[g], offsets[g + 1]), with
`offsets = [0, cumsum(group_sizes)]`; rows past offsets[G] belong to no group. Two kinds of
metadata describe which (row tile, group) pairs hold work:

  * GPU (Triton: no scalar prefetch, no dynamic grid): per row tile the half-open range of groups
    overlapping it (`tile_group_ranges`); a static grid over all row tiles loops over that range,
    and tiles past the last row loop zero times (the early exit).
  * TPU (Mosaic, megablox-style): a flat list of *visits* (group, row tile) scalar-prefetched into
    SMEM and read by the BlockSpec index maps (`gmm_visits`, `tgmm_visits`). A tile shared by two
    groups is visited twice in a row; a tile in no group (gmm) or a group with no rows (tgmm) gets
    one visit that writes zeros. The static grid length is the worst case `tiles_m + G - 1`
    (megablox's bound); visits past the real count repeat the last one, so the pipeline issues no
    copy for them and the kernel skips their compute.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes (rows, contraction, columns); None picks min(128, next power of two of the dim).

  The kernels pad M, K and N up to whole tiles (zero rows / columns, sliced off afterwards).
  Compiled GPU tiles must be powers of two >= 16 (Triton's `tl.dot`); compiled TPU tiles must be
  multiples of (8 or 16 for 16-bit rows, 128, 128) unless one tile spans the whole padded dim.
  """

  tile_m: int | None = None
  tile_k: int | None = None
  tile_n: int | None = None


def _default_tile(dim: int, cap: int = 128) -> int:
  tile = 16
  while tile < min(dim, cap):
    tile *= 2
  return tile


def resolve_tiling(tiling: Tiling | None, m: int, k: int, n: int, *, platform: str,
                   interpret: bool, dtype) -> tuple[int, int, int]:
  """(tm, tk, tn) after defaults; raises ValueError naming the `Tiling` field and the fix."""
  tiling = tiling or Tiling()
  tiles = {}
  for field, dim in (("tile_m", m), ("tile_k", k), ("tile_n", n)):
    value = getattr(tiling, field)
    tile = _default_tile(dim) if value is None else int(value)
    if tile <= 0:
      raise ValueError(f"Tiling.{field}={value} must be a positive integer (or None).")
    if not interpret and platform == "gpu" and (tile < 16 or tile & (tile - 1)):
      raise ValueError(f"Tiling.{field}={value}: Triton tiles must be powers of two >= 16; use "
                       "16, 32, 64 or 128 (or None).")
    if not interpret and platform == "tpu":
      padded = -(-dim // tile) * tile
      quantum = (16 if jnp.dtype(dtype).itemsize == 2 else 8) if field == "tile_m" else 128
      if tile % quantum and tile != padded:
        raise ValueError(f"Tiling.{field}={value}: Mosaic tiles must be multiples of {quantum} "
                         "(or cover the whole dimension); use 128 (or None).")
    tiles[field] = tile
  return tiles["tile_m"], tiles["tile_k"], tiles["tile_n"]


def varying_axes(x) -> frozenset:
  """Mesh axes x varies over inside `shard_map` (empty outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # jax 0.10: ManualAxisType; earlier releases: aval.vma
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()) or ())


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """A pallas_call output that varies over the same mesh axes as `like` (required by shard_map's
  check_vma; a no-op outside shard_map)."""
  aval = jax.typeof(like)
  if getattr(aval, "mat", None) is not None:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.mat)
  if getattr(aval, "vma", None):
    return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
  return jax.ShapeDtypeStruct(shape, dtype)


def group_offsets(group_sizes: jax.Array) -> jax.Array:
  """[0, cumsum(group_sizes)] as int32 [G + 1]."""
  sizes = group_sizes.astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes, dtype=jnp.int32)])


def tile_group_ranges(offsets: jax.Array, num_tiles: int, tile_m: int
                      ) -> tuple[jax.Array, jax.Array]:
  """(first, stop) int32 [num_tiles]: groups g in [first, stop) have rows in row tile i.

  Empty groups strictly inside a tile are in the range (the kernel skips them); a tile past the
  last grouped row gets an empty range.
  """
  starts, ends = offsets[:-1], offsets[1:]
  tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * tile_m
  tile_end = jnp.minimum(tile_start + tile_m, offsets[-1])
  first = jnp.searchsorted(ends, tile_start, side="right").astype(jnp.int32)
  stop = jnp.searchsorted(starts, tile_end, side="left").astype(jnp.int32)
  return first, jnp.maximum(stop, first)


def max_visits(num_tiles: int, num_groups: int) -> int:
  """Static bound on the visits of `gmm_visits` / `tgmm_visits`: tiles_m + G - 1."""
  return num_tiles + num_groups - 1


def _spread(counts: jax.Array, length: int):
  """Visit v -> (owner index, rank within the owner) for `counts[i]` visits per owner, in order;
  visits past sum(counts) repeat the last real one. Also returns the number of real visits."""
  ends = jnp.cumsum(counts)
  total = ends[-1]
  visit = jnp.minimum(jnp.arange(length, dtype=jnp.int32), total - 1)
  owner = jnp.searchsorted(ends, visit, side="right").astype(jnp.int32)
  return owner, visit - (ends - counts)[owner], total


def gmm_visits(offsets: jax.Array, num_tiles: int, tile_m: int):
  """Visits of the TPU gmm kernel, ordered by row tile: (group [V], tile [V], count [1]) int32.

  Each row tile is visited once per non-empty group with rows in it, in group order; a tile with
  no grouped row once with group = G (the kernel writes zeros). V = `max_visits`.
  """
  num_groups = offsets.shape[0] - 1
  nonempty = (offsets[1:] > offsets[:-1]).astype(jnp.int32)
  nonempty_before = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(nonempty)])
  first, stop = tile_group_ranges(offsets, num_tiles, tile_m)
  in_tile = nonempty_before[stop] - nonempty_before[first]  # non-empty groups per tile
  tile, rank, total = _spread(jnp.maximum(in_tile, 1), max_visits(num_tiles, num_groups))
  nonempty_ids = jnp.argsort(1 - nonempty, stable=True).astype(jnp.int32)  # non-empty first
  pick = jnp.minimum(nonempty_before[first[tile]] + rank, num_groups - 1)
  group = jnp.where(in_tile[tile] > 0, nonempty_ids[pick], num_groups)
  return group.astype(jnp.int32), tile, total.reshape(1).astype(jnp.int32)


def tgmm_visits(offsets: jax.Array, num_tiles: int, tile_m: int):
  """Visits of the TPU tgmm kernel, ordered by group: (group [V], tile [V], count [1]) int32.

  Group g is visited once per row tile its rows touch; an empty group once (its output is
  zero), at a valid tile. V = `max_visits`.
  """
  num_groups = offsets.shape[0] - 1
  starts, ends = offsets[:-1], offsets[1:]
  first_tile = jnp.minimum(starts // tile_m, num_tiles - 1)
  spans = jnp.where(ends > starts, (ends - 1) // tile_m + 1 - starts // tile_m, 1)
  group, rank, total = _spread(spans, max_visits(num_tiles, num_groups))
  tile = jnp.minimum(first_tile[group] + rank, num_tiles - 1)
  return group, tile.astype(jnp.int32), total.reshape(1).astype(jnp.int32)
