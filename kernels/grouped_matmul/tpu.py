"""TPU (Mosaic) grouped-matmul kernels: megablox-style visits scalar-prefetched into SMEM.

The visit lists (`metadata.gmm_visits`, `tgmm_visits`) drive the BlockSpec index maps, so the
pipeline copies exactly the (row tile, group) blocks that hold work. The grid is static, the
worst case `tiles_m + G - 1` visits; visits past the real count repeat the last one (no copy)
and skip their compute.

  gmm  grid (N tiles, visits, K tiles): an f32 accumulator over K; on the last K step the rows of
       the visit's group are stored into the output tile, which stays in VMEM across consecutive
       visits of the same row tile. The first visit of a tile starts it from zeros, so rows of no
       group (past sum(group_sizes)) come out as zeros.
  tgmm grid (K tiles, N tiles, visits): visits are ordered by group; the accumulator starts at a
       group's first visit and is stored at its last. lhs arrives transposed ([K, M], as in
       megablox) so the product is a plain [tk, tm] @ [tm, tn].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparseformer.kernels.grouped_matmul import metadata


def _gmm_kernel(offsets_ref, group_ref, tile_ref, count_ref, lhs_ref, rhs_ref, out_ref, acc_ref,
                *, num_groups: int, num_k: int):
  v, kk = pl.program_id(1), pl.program_id(2)
  g = group_ref[v]
  real = v < count_ref[0]

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(real & (g < num_groups))
  def _step():
    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=jnp.float32)

  @pl.when(real & (kk == num_k - 1))
  def _store():
    tile_m = acc_ref.shape[0]
    tile = tile_ref[v]
    begin = offsets_ref[jnp.minimum(g, num_groups)]
    end = offsets_ref[jnp.minimum(g + 1, num_groups)]
    rows = tile * tile_m + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
    first_visit = (v == 0) | (tile_ref[jnp.maximum(v - 1, 0)] != tile)
    previous = jnp.where(first_visit, 0.0, out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where((rows >= begin) & (rows < end), acc_ref[...],
                             previous).astype(out_ref.dtype)


def gmm(lhs, rhs, offsets, *, tiles: tuple[int, int, int], out_dtype, interpret: bool):
  """lhs [Mp, Kp], rhs [G, Kp, Np] (padded to tiles), offsets int32 [G + 1] -> [Mp, Np]."""
  tile_m, tile_k, tile_n = tiles
  (num_rows, depth), (num_groups, _, width) = lhs.shape, rhs.shape
  num_tiles = num_rows // tile_m
  group, tile, count = metadata.gmm_visits(offsets, num_tiles, tile_m)
  num_visits = group.shape[0]

  def lhs_map(j, v, kk, offsets_ref, group_ref, tile_ref, count_ref):
    return tile_ref[v], kk

  def rhs_map(j, v, kk, offsets_ref, group_ref, tile_ref, count_ref):
    return jnp.minimum(group_ref[v], num_groups - 1), kk, j

  def out_map(j, v, kk, offsets_ref, group_ref, tile_ref, count_ref):
    return tile_ref[v], j

  return pl.pallas_call(
      functools.partial(_gmm_kernel, num_groups=num_groups, num_k=depth // tile_k),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(width // tile_n, num_visits, depth // tile_k),
          in_specs=[pl.BlockSpec((tile_m, tile_k), lhs_map),
                    pl.BlockSpec((None, tile_k, tile_n), rhs_map)],
          out_specs=pl.BlockSpec((tile_m, tile_n), out_map),
          scratch_shapes=[pltpu.VMEM((tile_m, tile_n), jnp.float32)]),
      out_shape=metadata.out_struct((num_rows, width), out_dtype, lhs),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="grouped_matmul_gmm",
  )(offsets, group, tile, count, lhs, rhs)


def _tgmm_kernel(offsets_ref, group_ref, tile_ref, count_ref, lhs_t_ref, grad_ref, out_ref,
                 acc_ref, *, num_visits: int):
  v = pl.program_id(2)
  g = group_ref[v]
  first_visit = (v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != g)
  last_visit = (v == num_visits - 1) | (group_ref[jnp.minimum(v + 1, num_visits - 1)] != g)

  @pl.when(first_visit)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(v < count_ref[0])
  def _step():
    tile_m = grad_ref.shape[0]
    start = tile_ref[v] * tile_m
    begin, end = offsets_ref[g], offsets_ref[g + 1]
    cols = start + lax.broadcasted_iota(jnp.int32, lhs_t_ref.shape, 1)  # [tk, tm]: row ids
    rows = start + lax.broadcasted_iota(jnp.int32, grad_ref.shape, 0)  # [tm, tn]
    x_t = jnp.where((cols >= begin) & (cols < end), lhs_t_ref[...], 0)
    dy = jnp.where((rows >= begin) & (rows < end), grad_ref[...], 0)
    acc_ref[...] += jnp.dot(x_t, dy, preferred_element_type=jnp.float32)

  @pl.when(last_visit)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, grad, offsets, *, tiles: tuple[int, int, int], out_dtype, interpret: bool):
  """lhs [Mp, Kp], grad [Mp, Np] (padded), offsets int32 [G + 1] -> [G, Kp, Np]."""
  tile_m, tile_k, tile_n = tiles
  (num_rows, depth), width = lhs.shape, grad.shape[1]
  num_groups = offsets.shape[0] - 1
  group, tile, count = metadata.tgmm_visits(offsets, num_rows // tile_m, tile_m)
  num_visits = group.shape[0]

  def lhs_map(a, b, v, offsets_ref, group_ref, tile_ref, count_ref):
    return a, tile_ref[v]

  def grad_map(a, b, v, offsets_ref, group_ref, tile_ref, count_ref):
    return tile_ref[v], b

  def out_map(a, b, v, offsets_ref, group_ref, tile_ref, count_ref):
    return group_ref[v], a, b

  return pl.pallas_call(
      functools.partial(_tgmm_kernel, num_visits=num_visits),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(depth // tile_k, width // tile_n, num_visits),
          in_specs=[pl.BlockSpec((tile_k, tile_m), lhs_map),
                    pl.BlockSpec((tile_m, tile_n), grad_map)],
          out_specs=pl.BlockSpec((None, tile_k, tile_n), out_map),
          scratch_shapes=[pltpu.VMEM((tile_k, tile_n), jnp.float32)]),
      out_shape=metadata.out_struct((num_groups, depth, width), out_dtype, lhs),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="grouped_matmul_tgmm",
  )(offsets, group, tile, count, lhs.T, grad)
