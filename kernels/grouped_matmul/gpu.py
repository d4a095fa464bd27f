"""GPU (Triton lowering) grouped-matmul kernels; also the CPU interpret-mode path.

Triton has neither scalar prefetch nor a dynamic grid, so both kernels run a static worst-case
grid whose programs find their work in metadata passed as ordinary inputs and exit early
(loops of zero trips) where there is none:

  gmm  grid (row tiles, column tiles): program (i, j) loops over the groups with rows in row tile i
       (`metadata.tile_group_ranges`; empty groups skipped by a cond), each a K loop of
       `lhs[tile, k] @ rhs[g, k, j]`, and keeps each row's own group's product. Every output tile
       is written exactly once (rows of no group as zeros), so no atomics and no zero-fill pass.
  tgmm grid (G, K tiles, N tiles): program (g, a, b) loops over the row tiles group g touches,
       accumulating `lhs[rows, a]^T @ grad[rows, b]` with rows outside g masked to zero; an empty
       group loops zero times and writes zeros.
All inputs arrive padded to whole tiles (api.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparseformer.kernels.grouped_matmul import metadata

TN_DIMS = (((0,), (0,)), ((), ()))  # a^T @ b


def _full(shape) -> pl.BlockSpec:
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _gmm_kernel(offsets_ref, first_ref, stop_ref, lhs_ref, rhs_ref, out_ref, *, tile_k: int,
                num_k: int):
  i = pl.program_id(0)
  tile_m, tile_n = out_ref.shape
  rows = i * tile_m + jnp.arange(tile_m, dtype=jnp.int32)[:, None]  # [tm, 1]

  def k_step(kk, part, g):
    start = pl.multiple_of(kk * tile_k, tile_k)
    return part + jnp.dot(lhs_ref[:, pl.ds(start, tile_k)], rhs_ref[g, pl.ds(start, tile_k), :],
                          preferred_element_type=jnp.float32)

  def group_step(g, acc):
    begin, end = offsets_ref[g], offsets_ref[g + 1]

    def compute(acc):
      part = lax.fori_loop(0, num_k, functools.partial(k_step, g=g),
                           jnp.zeros((tile_m, tile_n), jnp.float32))
      return jnp.where((rows >= begin) & (rows < end), part, acc)

    return lax.cond(end > begin, compute, lambda acc: acc, acc)

  acc = lax.fori_loop(first_ref[i], stop_ref[i], group_step,
                      jnp.zeros((tile_m, tile_n), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs, rhs, offsets, *, tiles: tuple[int, int, int], out_dtype, interpret: bool):
  """lhs [Mp, Kp], rhs [G, Kp, Np] (padded to tiles), offsets int32 [G + 1] -> [Mp, Np]."""
  tile_m, tile_k, tile_n = tiles
  (num_rows, depth), (num_groups, _, width) = lhs.shape, rhs.shape
  num_tiles = num_rows // tile_m
  first, stop = metadata.tile_group_ranges(offsets, num_tiles, tile_m)
  return pl.pallas_call(
      functools.partial(_gmm_kernel, tile_k=tile_k, num_k=depth // tile_k),
      grid=(num_tiles, width // tile_n),
      in_specs=[_full(offsets.shape), _full(first.shape), _full(stop.shape),
                pl.BlockSpec((tile_m, depth), lambda i, j: (i, 0)),
                pl.BlockSpec((num_groups, depth, tile_n), lambda i, j: (0, 0, j))],
      out_specs=pl.BlockSpec((tile_m, tile_n), lambda i, j: (i, j)),
      out_shape=metadata.out_struct((num_rows, width), out_dtype, lhs),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name="grouped_matmul_gmm",
  )(offsets, first, stop, lhs, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, grad_ref, out_ref, *, tile_m: int):
  g = pl.program_id(0)
  begin, end = offsets_ref[g], offsets_ref[g + 1]
  tile_k, tile_n = out_ref.shape
  first = lax.div(begin, tile_m)
  stop = jnp.where(end > begin, lax.div(end + tile_m - 1, tile_m), first)

  def step(t, acc):
    start = pl.multiple_of(t * tile_m, tile_m)
    rows = start + jnp.arange(tile_m, dtype=jnp.int32)[:, None]
    mine = (rows >= begin) & (rows < end)
    x = jnp.where(mine, lhs_ref[pl.ds(start, tile_m), :], 0)
    dy = jnp.where(mine, grad_ref[pl.ds(start, tile_m), :], 0)
    return acc + lax.dot_general(x, dy, TN_DIMS, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(first, stop, step, jnp.zeros((tile_k, tile_n), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs, grad, offsets, *, tiles: tuple[int, int, int], out_dtype, interpret: bool):
  """lhs [Mp, Kp], grad [Mp, Np] (padded), offsets int32 [G + 1] -> [G, Kp, Np]."""
  tile_m, tile_k, tile_n = tiles
  (num_rows, depth), width = lhs.shape, grad.shape[1]
  num_groups = offsets.shape[0] - 1
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, tile_m=tile_m),
      grid=(num_groups, depth // tile_k, width // tile_n),
      in_specs=[_full(offsets.shape),
                pl.BlockSpec((num_rows, tile_k), lambda g, a, b: (0, a)),
                pl.BlockSpec((num_rows, tile_n), lambda g, a, b: (0, b))],
      out_specs=pl.BlockSpec((None, tile_k, tile_n), lambda g, a, b: (g, a, b)),
      out_shape=metadata.out_struct((num_groups, depth, width), out_dtype, lhs),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name="grouped_matmul_tgmm",
  )(offsets, lhs, grad)
