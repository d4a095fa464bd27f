"""GPU (Triton lowering) glue for the block-sparse flash attention kernels.

Triton has no scalar prefetch and no dynamic grid, so the block lists are ordinary inputs and
each program runs a data-dependent `lax.fori_loop` over its listed blocks, loading
`k_ref[pl.ds(block * block_kv, tile)]`. A tile never spans two layout blocks; when the kernel
tile is smaller than the layout block the loop walks `count * sub_tiles` steps.

Grids (at most 3 dims on Triton):
  forward, dQ: (query tiles, B, H)        K/V of head h come from kv head h // group (GQA, no copy)
  dK/dV:       (key tiles, B, KVH)        loops over the group's query heads, then over the query
                                          blocks listed for this key block (transposed view)
Arrays stay in the caller's [B, T, H, D] layout; padded lengths (multiples of the layout blocks)
are prepared by api.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparseformer.kernels.block_sparse_attention import common
from sparseformer.kernels.block_sparse_attention.common import LayoutArrays, LayoutMeta
from sparseformer.kernels.block_sparse_attention.tiles import Tiles


def _full(shape) -> pl.BlockSpec:
  """The whole array as one block (the kernel indexes it with program ids / loaded block ids)."""
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _int8(masks: jax.Array) -> jax.Array:
  """Token tiles as int8 (1 byte per element, as XLA stores bool) for plain byte loads."""
  return masks.astype(jnp.int8)


def _lists(arrays: LayoutArrays, view: str) -> tuple[jax.Array, ...]:
  """(index, count, full_count, mask_id) of the forward ("kv") or transposed ("q") view."""
  return tuple(getattr(arrays, f"{view}_{name}")
               for name in ("index", "count", "full_count", "mask_id"))


def _list_specs(arrays: LayoutArrays, view: str) -> list[pl.BlockSpec]:
  return [_full(x.shape) for x in _lists(arrays, view)]


def _split(index, sub: int, tile: int):
  """Program/loop index over tiles -> (layout block, row offset inside the block)."""
  return common.div(index, sub), common.rem(index, sub) * tile


def _query_tile(meta: LayoutMeta, tq: int):
  """Query tile of this program. Reversed launch order: for causal-like layouts the last query
  tiles have the longest block lists, and starting them first shortens the tail of the grid."""
  return meta.num_q_blocks * (meta.block_q // tq) - 1 - pl.program_id(0)


def _reversed_tile_map(num_tiles: int):
  """BlockSpec index map of a query tile over [B, Tp, H, D] matching `_query_tile`."""
  return lambda i, b, h: (b, num_tiles - 1 - i, h, 0)


def _reversed_row_map(num_tiles: int):
  """BlockSpec index map of a query tile over [B, H, Tp] (lse, delta) matching `_query_tile`."""
  return lambda i, b, h: (b, h, num_tiles - 1 - i)


def _kv_head_map(group: int):
  """BlockSpec index map of a query program's whole K or V sequence: kv head h // group (GQA)."""
  return lambda i, b, h: (b, 0, common.div(h, group), 0)


def _visit_blocks(full, count, body, carry, separate: bool):
  """Runs `body(t, carry, masked)` over the listed tiles t in [0, count).

  The lists hold FULL blocks first (`common.full_blocks_first`): with `separate`, tiles
  [0, full) run in a loop without any mask code and [full, count) in a masked loop; otherwise
  one loop whose body branches on each block's kind (`masked=None`).
  """
  if not separate:
    return lax.fori_loop(0, count, functools.partial(body, masked=None), carry)
  carry = lax.fori_loop(0, full, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full, count, functools.partial(body, masked=True), carry)


def _fwd_kernel(kv_index_ref, kv_count_ref, kv_full_ref, kv_mask_id_ref, masks_ref, q_ref, k_ref,
                v_ref, o_ref, lse_ref, *, meta: LayoutMeta, tiles: Tiles, scale_log2: float):
  tq, tk = tiles.fwd_q, tiles.fwd_kv
  i, h = _query_tile(meta, tq), pl.program_id(2)
  hl = h if meta.layout_heads > 1 else 0
  q_block, q_off = _split(i, meta.block_q // tq, tq)
  kv_sub = meta.block_kv // tk
  q = q_ref[...]  # [tq, D]

  def body(t, carry, masked):
    j, k_off = _split(t, kv_sub, tk)
    start = pl.multiple_of(kv_index_ref[hl, q_block, j] * meta.block_kv + k_off, tk)
    s = common.scores(q, k_ref[pl.ds(start, tk), :], scale_log2)
    s = common.apply_mask(
        s, kv_mask_id_ref[hl, q_block, j],
        lambda m: masks_ref[m, pl.ds(q_off, tq), pl.ds(k_off, tk)] != 0, masked)
    return common.softmax_step(carry, s, v_ref[pl.ds(start, tk), :])

  carry = _visit_blocks(kv_full_ref[hl, q_block] * kv_sub, kv_count_ref[hl, q_block] * kv_sub,
                        body, common.softmax_init(tq, q.shape[-1]), tiles.separate_partial)
  out, lse = common.softmax_finalize(carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def forward(q, k, v, arrays: LayoutArrays, meta: LayoutMeta, tiles: Tiles, scale: float,
            interpret: bool):
  """q [B, Tp, H, D], k/v [B, Sp, KVH, D] (padded) -> (out [B, Tp, H, D], lse f32 [B, H, Tp])."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  tq, tk = tiles.fwd_q, tiles.fwd_kv
  kernel = functools.partial(_fwd_kernel, meta=meta, tiles=tiles,
                             scale_log2=scale * common.LOG2E)
  kv_spec = pl.BlockSpec((None, seq_kv, None, head_dim), _kv_head_map(group))
  tile_spec = pl.BlockSpec((None, tq, None, head_dim), _reversed_tile_map(seq_q // tq))
  return pl.pallas_call(
      kernel,
      grid=(seq_q // tq, batch, heads),
      in_specs=[*_list_specs(arrays, "kv"), _full(arrays.partial_masks.shape),
                tile_spec, kv_spec, kv_spec],
      out_specs=[tile_spec, pl.BlockSpec((None, None, tq), _reversed_row_map(seq_q // tq))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(*_lists(arrays, "kv"), _int8(arrays.partial_masks), q, k, v)


def _dq_kernel(kv_index_ref, kv_count_ref, kv_full_ref, kv_mask_id_ref, masks_ref, q_ref, k_ref,
               v_ref, do_ref, lse2_ref, delta_ref, dq_ref, *, meta: LayoutMeta, tiles: Tiles,
               scale: float):
  tq, tk = tiles.dq_q, tiles.dq_kv
  i, h = _query_tile(meta, tq), pl.program_id(2)
  hl = h if meta.layout_heads > 1 else 0
  q_block, q_off = _split(i, meta.block_q // tq, tq)
  kv_sub = meta.block_kv // tk
  q, do = q_ref[...], do_ref[...]  # [tq, D]
  lse2 = lse2_ref[...][:, None]  # [tq, 1]
  delta = delta_ref[...][:, None]

  def body(t, dq, masked):
    j, k_off = _split(t, kv_sub, tk)
    start = pl.multiple_of(kv_index_ref[hl, q_block, j] * meta.block_kv + k_off, tk)
    k = k_ref[pl.ds(start, tk), :]
    s = common.scores(q, k, scale * common.LOG2E)
    s = common.apply_mask(
        s, kv_mask_id_ref[hl, q_block, j],
        lambda m: masks_ref[m, pl.ds(q_off, tq), pl.ds(k_off, tk)] != 0, masked)
    return common.dq_step(dq, s, lse2, delta, do, k, v_ref[pl.ds(start, tk), :])

  dq = _visit_blocks(kv_full_ref[hl, q_block] * kv_sub, kv_count_ref[hl, q_block] * kv_sub,
                     body, jnp.zeros(q.shape, jnp.float32), tiles.separate_partial_bwd)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_count_ref, q_full_ref, q_mask_id_ref, masks_t_ref, q_ref, k_ref,
                v_ref, do_ref, lse2_ref, delta_ref, *refs, meta: LayoutMeta, tiles: Tiles,
                group: int, scale: float):
  """dK/dV of one key tile; with `fused_dq` also adds dS @ k into the f32 dQ buffer (atomics).

  refs: (dk_ref, dv_ref), or with fused_dq (dq_in_ref, dk_ref, dv_ref, dq_ref), where dq_ref
  aliases the zero-initialised dq_in buffer [B, Tp, H, D] f32.
  """
  tq, tk, fused_dq = tiles.dkv_q, tiles.dkv_kv, tiles.fused_dq
  if fused_dq:
    _, dk_ref, dv_ref, dq_ref = refs
  else:
    dk_ref, dv_ref = refs
  i, b, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv_block, k_off = _split(i, meta.block_kv // tk, tk)
  q_sub = meta.block_q // tq
  k, v = k_ref[...], v_ref[...]  # [tk, D]

  def head_body(g, carry):
    h = kv_head * group + g
    hl = h if meta.layout_heads > 1 else 0

    def body(t, carry, masked):
      j, q_off = _split(t, q_sub, tq)
      start = pl.multiple_of(q_index_ref[hl, kv_block, j] * meta.block_q + q_off, tq)
      q = q_ref[b, pl.ds(start, tq), h, :]
      s_t = common.scores(k, q, scale * common.LOG2E)  # [tk, tq]
      s_t = common.apply_mask(
          s_t, q_mask_id_ref[hl, kv_block, j],
          lambda m: masks_t_ref[m, pl.ds(k_off, tk), pl.ds(q_off, tq)] != 0, masked)
      lse2 = lse2_ref[b, h, pl.ds(start, tq)][None, :]  # [1, tq]
      delta = delta_ref[b, h, pl.ds(start, tq)][None, :]
      do = do_ref[b, pl.ds(start, tq), h, :]
      if not fused_dq:
        return common.dkv_step(carry, s_t, lse2, delta, q, do, v)
      carry, dq = common.dkv_dq_step(carry, s_t, lse2, delta, q, do, k, v)
      plgpu.atomic_add(dq_ref, (b, pl.ds(start, tq), h, slice(None)), dq)
      return carry

    return _visit_blocks(q_full_ref[hl, kv_block] * q_sub, q_count_ref[hl, kv_block] * q_sub,
                         body, carry, tiles.separate_partial_bwd)

  zeros = jnp.zeros(k.shape, jnp.float32)
  if group == 1:
    dk, dv = head_body(0, (zeros, zeros))
  else:
    dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def dq_call(q, k, v, do, lse2, delta, arrays: LayoutArrays, meta: LayoutMeta, tiles: Tiles,
            scale: float, interpret: bool):
  """The dQ kernel: padded q/do [B, Tp, H, D], k/v [B, Sp, KVH, D], lse2 (base 2, `+inf` for
  empty rows) and delta f32 [B, H, Tp] -> dq [B, Tp, H, D] in q.dtype."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  tq, tk = tiles.dq_q, tiles.dq_kv
  kv_spec = pl.BlockSpec((None, seq_kv, None, head_dim), _kv_head_map(heads // kv_heads))
  tile_spec = pl.BlockSpec((None, tq, None, head_dim), _reversed_tile_map(seq_q // tq))
  row_spec = pl.BlockSpec((None, None, tq), _reversed_row_map(seq_q // tq))
  return pl.pallas_call(
      functools.partial(_dq_kernel, meta=meta, tiles=tiles, scale=scale),
      grid=(seq_q // tq, batch, heads),
      in_specs=[*_list_specs(arrays, "kv"), _full(arrays.partial_masks.shape),
                tile_spec, kv_spec, kv_spec, tile_spec, row_spec, row_spec],
      out_specs=tile_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps_dq,
                                           num_stages=tiles.num_stages_dq),
      interpret=interpret,
      name="block_sparse_attention_dq",
  )(*_lists(arrays, "kv"), _int8(arrays.partial_masks), q, k, v, do, lse2, delta)


def dkv_call(q, k, v, do, lse2, delta, arrays: LayoutArrays, meta: LayoutMeta, tiles: Tiles,
             scale: float, interpret: bool):
  """The dK/dV kernel (inputs as `dq_call`) -> (dk, dv) in k.dtype, plus with `tiles.fused_dq`
  the f32 dq [B, Tp, H, D] (unscaled, summed by atomic adds)."""
  batch, seq_q, heads, head_dim = q.shape
  seq_kv, kv_heads = k.shape[1], k.shape[2]
  tq, tk = tiles.dkv_q, tiles.dkv_kv
  fused = tiles.fused_dq
  masks_t = _int8(jnp.swapaxes(arrays.partial_masks, 1, 2))  # [P, block_kv, block_q]
  kv_tile_spec = pl.BlockSpec((None, tk, None, head_dim), lambda i, b, g: (b, i, g, 0))
  in_specs = [*_list_specs(arrays, "q"), _full(masks_t.shape), _full(q.shape),
              kv_tile_spec, kv_tile_spec, _full(do.shape), _full(lse2.shape), _full(delta.shape)]
  args = [*_lists(arrays, "q"), masks_t, q, k, v, do, lse2, delta]
  out_specs = [kv_tile_spec, kv_tile_spec]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  aliases = {}
  if fused:  # dQ accumulator: zeros in, summed in place by every key tile that sees the row
    in_specs.append(_full(q.shape))
    args.append(jnp.zeros(q.shape, jnp.float32))
    out_specs.append(_full(q.shape))
    out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    aliases = {len(args) - 1: 2}
  return pl.pallas_call(
      functools.partial(_dkv_kernel, meta=meta, tiles=tiles, group=heads // kv_heads,
                        scale=scale),
      grid=(seq_kv // tk, batch, kv_heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps_bwd,
                                           num_stages=tiles.num_stages_bwd),
      interpret=interpret,
      name="block_sparse_attention_dkv_dq" if fused else "block_sparse_attention_dkv",
  )(*args)


def backward(q, k, v, do, lse, delta, arrays: LayoutArrays, meta: LayoutMeta, tiles: Tiles,
             scale: float, interpret: bool):
  """Padded inputs; lse/delta f32 [B, H, Tp] (delta already includes -dlse) -> (dq, dk, dv)."""
  lse2 = common.lse_to_base2(lse)  # once here instead of per tile in the kernels
  if tiles.fused_dq:
    dk, dv, dq = dkv_call(q, k, v, do, lse2, delta, arrays, meta, tiles, scale, interpret)
    return (dq * scale).astype(q.dtype), dk, dv
  dq = dq_call(q, k, v, do, lse2, delta, arrays, meta, tiles, scale, interpret)
  dk, dv = dkv_call(q, k, v, do, lse2, delta, arrays, meta, tiles, scale, interpret)
  return dq, dk, dv
