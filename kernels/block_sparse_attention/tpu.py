"""TPU (Mosaic) glue for the block-sparse flash attention kernels.

The block lists are scalar-prefetched into SMEM and read by the BlockSpec index maps, so the
pipeline DMAs exactly the listed K/V (or Q) blocks; the innermost grid axis is shrunk to the
widest row (`max_kv`, resp. `group * max_q`), and steps past a row's count repeat the previous
block index (the contract's padding rule), so they cost neither a copy nor compute.

Grids ("arbitrary" innermost axis carries the online-softmax / gradient accumulators in VMEM):
  forward, dQ: (B, H, query blocks, max_kv)
  dK/dV:       (B, KVH, key blocks, group * max_q)   query heads of the group, then listed blocks
Tiles are the layout blocks. Operands are transposed to head-major [B, H, T, D] so every block's
last two dims are (block, D); per-row statistics travel lane-replicated ([rows, 128]) for the
forward/dQ orientation and sublane-replicated ([8, rows]) for the dK/dV orientation, as in
splash attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparseformer.kernels.block_sparse_attention import common
from sparseformer.kernels.block_sparse_attention.common import LayoutArrays, LayoutMeta
from sparseformer.kernels.block_sparse_attention.tiles import Tiles

LANES = 128
SUBLANES = 8


def _head_major(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 1, 2)  # [B, T, H, D] <-> [B, H, T, D]


def _fwd_kernel(kv_index_ref, kv_count_ref, kv_mask_id_ref, q_ref, k_ref, v_ref, mask_ref,
                o_ref, lse_ref, acc_ref, m_ref, l_ref, *, meta: LayoutMeta, scale_log2: float):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (h if meta.layout_heads > 1 else 0) * meta.num_q_blocks + i

  @pl.when(j == 0)
  def _init():
    acc, m, l = common.softmax_init(*acc_ref.shape)
    acc_ref[...] = acc
    m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l, l_ref.shape)

  @pl.when(j < kv_count_ref[row])
  def _step():
    s = common.scores(q_ref[...], k_ref[...], scale_log2)
    s = common.mask_partial(s, kv_mask_id_ref[row * meta.max_kv + j], lambda _: mask_ref[...])
    carry = (acc_ref[...], m_ref[...][:, :1], l_ref[...][:, :1])
    acc, m, l = common.softmax_step(carry, s, v_ref[...])
    acc_ref[...] = acc
    m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l, l_ref.shape)

  @pl.when(j == meta.max_kv - 1)
  def _finish():
    out, lse = common.softmax_finalize((acc_ref[...], m_ref[...][:, :1], l_ref[...][:, :1]))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _row_maps(meta: LayoutMeta, group: int, index_ref_pos: int):
  """Index maps for the forward / dQ grids (b, h, i, j, *prefetch)."""

  def flat(h, i, j):
    return ((h if meta.layout_heads > 1 else 0) * meta.num_q_blocks + i) * meta.max_kv + j

  def q_map(b, h, i, j, *refs):
    return b, h, i, 0

  def kv_map(b, h, i, j, *refs):
    return b, common.div(h, group), refs[index_ref_pos][flat(h, i, j)], 0

  def mask_map(b, h, i, j, *refs):
    return jnp.maximum(refs[2][flat(h, i, j)], 0), 0, 0

  return q_map, kv_map, mask_map


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(-1).astype(jnp.int32)


def forward(q, k, v, arrays: LayoutArrays, meta: LayoutMeta, tiles: Tiles, scale: float,
            interpret: bool):
  """q [B, Tp, H, D], k/v [B, Sp, KVH, D] (padded) -> (out [B, Tp, H, D], lse f32 [B, H, Tp])."""
  del tiles  # the layout blocks are the tiles on TPU
  batch, seq_q, heads, head_dim = q.shape
  group = heads // k.shape[2]
  bq, bkv = meta.block_q, meta.block_kv
  q_map, kv_map, mask_map = _row_maps(meta, group, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(batch, heads, meta.num_q_blocks, meta.max_kv),
      in_specs=[pl.BlockSpec((None, None, bq, head_dim), q_map),
                pl.BlockSpec((None, None, bkv, head_dim), kv_map),
                pl.BlockSpec((None, None, bkv, head_dim), kv_map),
                pl.BlockSpec((None, bq, bkv), mask_map)],
      out_specs=[pl.BlockSpec((None, None, bq, head_dim), q_map),
                 pl.BlockSpec((None, None, bq, LANES), q_map)],
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32)])
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, meta=meta, scale_log2=scale * common.LOG2E),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((batch, heads, seq_q, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq_q, LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="block_sparse_attention_fwd",
  )(_flat(arrays.kv_index), _flat(arrays.kv_count), _flat(arrays.kv_mask_id),
    _head_major(q), _head_major(k), _head_major(v), arrays.partial_masks)
  return _head_major(out), lse[..., 0]


def _dq_kernel(kv_index_ref, kv_count_ref, kv_mask_id_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, mask_ref, dq_ref, acc_ref, *, meta: LayoutMeta, scale: float):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = (h if meta.layout_heads > 1 else 0) * meta.num_q_blocks + i

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(j < kv_count_ref[row])
  def _step():
    k = k_ref[...]
    s = common.scores(q_ref[...], k, scale * common.LOG2E)
    s = common.mask_partial(s, kv_mask_id_ref[row * meta.max_kv + j], lambda _: mask_ref[...])
    lse2 = common.lse_to_base2(lse_ref[...][:, :1])
    acc_ref[...] = common.dq_step(acc_ref[...], s, lse2, delta_ref[...][:, :1], do_ref[...], k,
                                  v_ref[...])

  @pl.when(j == meta.max_kv - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_index_ref, q_count_ref, q_mask_id_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, mask_t_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, meta: LayoutMeta,
                group: int, scale: float):
  kv_head, kv_block, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  h = kv_head * group + common.div(t, meta.max_q)
  j = common.rem(t, meta.max_q)
  row = (h if meta.layout_heads > 1 else 0) * meta.num_kv_blocks + kv_block

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  @pl.when(j < q_count_ref[row])
  def _step():
    q = q_ref[...]
    s_t = common.scores(k_ref[...], q, scale * common.LOG2E)  # [bkv, bq]
    s_t = common.mask_partial(s_t, q_mask_id_ref[row * meta.max_q + j], lambda _: mask_t_ref[...])
    lse2 = common.lse_to_base2(lse_ref[...][:1, :])  # [1, bq]
    dk, dv = common.dkv_step((dk_acc[...], dv_acc[...]), s_t, lse2, delta_ref[...][:1, :], q,
                             do_ref[...], v_ref[...])
    dk_acc[...] = dk
    dv_acc[...] = dv

  @pl.when(t == group * meta.max_q - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, do, lse, delta, arrays: LayoutArrays, meta: LayoutMeta, tiles: Tiles,
             scale: float, interpret: bool):
  """Padded inputs; lse/delta f32 [B, H, Tp] (delta already includes -dlse) -> (dq, dk, dv)."""
  del tiles
  batch, seq_q, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bq, bkv = meta.block_q, meta.block_kv
  qh, kh, vh, doh = map(_head_major, (q, k, v, do))
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  q_map, kv_map, mask_map = _row_maps(meta, group, 0)
  lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, meta=meta, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, heads, meta.num_q_blocks, meta.max_kv),
          in_specs=[pl.BlockSpec((None, None, bq, head_dim), q_map),
                    pl.BlockSpec((None, None, bkv, head_dim), kv_map),
                    pl.BlockSpec((None, None, bkv, head_dim), kv_map),
                    pl.BlockSpec((None, None, bq, head_dim), q_map),
                    pl.BlockSpec((None, None, bq, LANES), q_map),
                    pl.BlockSpec((None, None, bq, LANES), q_map),
                    pl.BlockSpec((None, bq, bkv), mask_map)],
          out_specs=pl.BlockSpec((None, None, bq, head_dim), q_map),
          scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="block_sparse_attention_dq",
  )(_flat(arrays.kv_index), _flat(arrays.kv_count), _flat(arrays.kv_mask_id),
    qh, kh, vh, doh, lanes(lse), lanes(delta), arrays.partial_masks)

  def flat(kv_head, kv_block, t):
    h = kv_head * group + common.div(t, meta.max_q)
    row = (h if meta.layout_heads > 1 else 0) * meta.num_kv_blocks + kv_block
    return h, row * meta.max_q + common.rem(t, meta.max_q)

  def kv_map_t(b, kv_head, kv_block, t, *refs):
    return b, kv_head, kv_block, 0

  def q_map_t(b, kv_head, kv_block, t, q_index_ref, *refs):
    h, pos = flat(kv_head, kv_block, t)
    return b, h, q_index_ref[pos], 0

  def row_map_t(b, kv_head, kv_block, t, q_index_ref, *refs):
    h, pos = flat(kv_head, kv_block, t)
    return b, h, 0, q_index_ref[pos]

  def mask_map_t(b, kv_head, kv_block, t, q_index_ref, q_count_ref, q_mask_id_ref):
    return jnp.maximum(q_mask_id_ref[flat(kv_head, kv_block, t)[1]], 0), 0, 0

  sublanes = lambda x: jnp.broadcast_to(x[:, :, None, :], (batch, heads, SUBLANES, seq_q))
  masks_t = jnp.swapaxes(arrays.partial_masks, 1, 2)  # [P, bkv, bq]
  dkh, dvh = pl.pallas_call(
      functools.partial(_dkv_kernel, meta=meta, group=group, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, kv_heads, meta.num_kv_blocks, group * meta.max_q),
          in_specs=[pl.BlockSpec((None, None, bq, head_dim), q_map_t),
                    pl.BlockSpec((None, None, bkv, head_dim), kv_map_t),
                    pl.BlockSpec((None, None, bkv, head_dim), kv_map_t),
                    pl.BlockSpec((None, None, bq, head_dim), q_map_t),
                    pl.BlockSpec((None, None, SUBLANES, bq), row_map_t),
                    pl.BlockSpec((None, None, SUBLANES, bq), row_map_t),
                    pl.BlockSpec((None, bkv, bq), mask_map_t)],
          out_specs=[pl.BlockSpec((None, None, bkv, head_dim), kv_map_t),
                     pl.BlockSpec((None, None, bkv, head_dim), kv_map_t)],
          scratch_shapes=[pltpu.VMEM((bkv, head_dim), jnp.float32),
                          pltpu.VMEM((bkv, head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="block_sparse_attention_dkv",
  )(_flat(arrays.q_index), _flat(arrays.q_count), _flat(arrays.q_mask_id),
    qh, kh, vh, doh, sublanes(lse), sublanes(delta), masks_t)
  return _head_major(dq), _head_major(dkh), _head_major(dvh)
