"""Shared pieces of the block-sparse flash attention kernels (GPU Triton and TPU Mosaic).

Everything here is platform neutral (tile sizes and launch knobs live in tiles.py):
  * `LayoutArrays` / `LayoutMeta`: the BlockLayout contract (see notes/layout_contract.md) turned
    into device arrays + static metadata, including the transposed view computed on device when
    the forward lists are traced (content-routed layouts);
  * the flash-attention math on one (query tile, key tile) pair, written once and called from the
    kernels of both platforms. Scores live in the base-2 domain (`s = q.k * scale * log2(e)`) so the
    exponentials are `exp2`; the log-sum-exp leaves the kernels in natural-log units.

Conventions inside the math: a score tile `s` is [rows, cols]; per-row statistics are kept 2-D
with a broadcastable singleton axis, `[tq, 1]` in the forward / dQ orientation (queries on rows)
and `[1, tq]` in the dK/dV orientation (keys on rows, `sT = k @ q^T`), so the same functions
serve both orientations on both platforms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b^T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b
TN_DIMS = (((0,), (0,)), ((), ()))  # a^T @ b


# ----------------------------------------------------------------------------------------------
# Integer helpers
# ----------------------------------------------------------------------------------------------


def div(x, n: int):
  """x // n for a non-negative traced int and a static n (lax.div: jnp's floor semantics emit a
  sign op that the Triton and Mosaic lowerings reject or do not need)."""
  return x if n == 1 else lax.div(x, n)


def rem(x, n: int):
  """x % n for a non-negative traced int and a static n (see `div`)."""
  return 0 if n == 1 else lax.rem(x, n)


# ----------------------------------------------------------------------------------------------
# Layout arrays
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayoutMeta:
  """Static facts about a layout (hashable: part of the kernels' static configuration)."""

  seq_q: int
  seq_kv: int
  block_q: int
  block_kv: int
  num_q_blocks: int
  num_kv_blocks: int
  layout_heads: int  # Hl: 1 (shared by all heads) or num_heads
  max_kv: int
  max_q: int


class LayoutArrays(NamedTuple):
  """The contract arrays as jnp arrays (host constants or traced); shapes as in the contract."""

  kv_index: jax.Array  # int32 [Hl, nq, max_kv]; per row FULL blocks first, then PARTIAL
  kv_count: jax.Array  # int32 [Hl, nq]
  kv_mask_id: jax.Array  # int32 [Hl, nq, max_kv]; -1 FULL, >= 0 PARTIAL
  q_index: jax.Array  # int32 [Hl, nk, max_q]; same order rule
  q_count: jax.Array  # int32 [Hl, nk]
  q_mask_id: jax.Array  # int32 [Hl, nk, max_q]
  partial_masks: jax.Array  # bool [P, block_q, block_kv]
  kv_full_count: jax.Array  # int32 [Hl, nq]: the first kv_full_count listed blocks are FULL
  q_full_count: jax.Array  # int32 [Hl, nk]


def transpose_block_lists(kv_index: jax.Array, kv_count: jax.Array, kv_mask_id: jax.Array,
                          num_kv_blocks: int, max_q: int | None = None):
  """Builds the transposed view (per key block, the query blocks that visit it) on device.

  Args: forward lists `kv_index`, `kv_mask_id` int32 [Hl, nq, max_kv] and `kv_count` [Hl, nq],
  possibly traced. `max_q` (static) bounds the per-key-block lists; default nq (always enough).
  Returns (q_index, q_count, q_mask_id) with [Hl, nk, max_q] / [Hl, nk], query block ids
  ascending, padding entries repeating the last valid entry (or 0 when the count is 0).
  """
  hl, nq, max_kv = kv_index.shape
  max_q = nq if max_q is None else max_q
  valid = jnp.arange(max_kv)[None, None, :] < kv_count[..., None]
  # table[h, i, j] = mask_id + 2 where block (i, j) is listed, 0 where it is not.
  code = jnp.where(valid, kv_mask_id + 2, 0).astype(jnp.int32)
  h_idx = jnp.broadcast_to(jnp.arange(hl)[:, None, None], kv_index.shape)
  i_idx = jnp.broadcast_to(jnp.arange(nq)[None, :, None], kv_index.shape)
  table = jnp.zeros((hl, nq, num_kv_blocks), jnp.int32)
  table = table.at[h_idx, i_idx, jnp.clip(kv_index, 0, num_kv_blocks - 1)].max(code)
  table_t = jnp.swapaxes(table, 1, 2)  # [Hl, nk, nq]
  listed = table_t > 0
  q_count = jnp.minimum(listed.sum(-1), max_q).astype(jnp.int32)
  order = jnp.argsort(jnp.logical_not(listed), axis=-1, stable=True)[..., :max_q]  # listed first
  last = jnp.take_along_axis(order, jnp.maximum(q_count - 1, 0)[..., None], axis=-1)
  pos = jnp.arange(max_q)[None, None, :]
  q_index = jnp.where(pos < q_count[..., None], order, jnp.where(q_count[..., None] > 0, last, 0))
  q_mask_id = jnp.take_along_axis(table_t, q_index, axis=-1) - 2
  q_mask_id = jnp.where(q_mask_id < -1, -1, q_mask_id)
  return q_index.astype(jnp.int32), q_count, q_mask_id.astype(jnp.int32)


def full_blocks_first(index, count, mask_id):
  """Reorders each row's listed blocks FULL first, then PARTIAL (both stable), so a kernel can
  visit the FULL blocks in a loop without any mask code and the PARTIAL ones in a masked loop.

  Works on host NumPy lists (the usual case, no device work) and on traced jax arrays alike.
  Args: index, mask_id int32 [Hl, n, width], count [Hl, n]. Returns (index, mask_id, full_count
  [Hl, n]); padding entries past the count repeat the last valid entry of the new order (0 when
  the count is 0), so a TPU pipeline never re-fetches a block for them.
  """
  xp = np if all(isinstance(a, np.ndarray) for a in (index, count, mask_id)) else jnp
  listed = xp.arange(index.shape[-1]) < count[..., None]
  full_count = xp.sum(listed & (mask_id < 0), axis=-1).astype(np.int32)
  rank = xp.where(listed, (mask_id >= 0).astype(np.int32), 2)
  order = xp.argsort(rank, axis=-1, stable=True)
  index = xp.take_along_axis(index, order, axis=-1)
  mask_id = xp.take_along_axis(mask_id, order, axis=-1)
  last = xp.maximum(count - 1, 0)[..., None]
  index = xp.where(listed, index, xp.take_along_axis(index, last, axis=-1))
  mask_id = xp.where(listed, mask_id, xp.take_along_axis(mask_id, last, axis=-1))
  return index, mask_id, full_count


def _int32(x):
  """int32 lists: NumPy stays on the host (reordered there), jax arrays (maybe traced) stay jax."""
  return x.astype(jnp.int32) if isinstance(x, jax.Array) else np.asarray(x, np.int32)


def layout_to_arrays(layout: Any, num_heads: int) -> tuple[LayoutArrays, LayoutMeta]:
  """Reads a BlockLayout (host NumPy) or any object with the contract fields (possibly traced).

  The transposed view is taken from the layout when present (`q_index`, `q_count`, `q_mask_id`
  not None) and computed on device from the forward lists otherwise. Both views come back with
  each row's FULL blocks first (`full_blocks_first`); host lists are reordered on the host.
  """
  for name in ("kv_index", "kv_count", "kv_mask_id", "partial_masks", "seq_q", "seq_kv",
               "block_q", "block_kv"):
    if getattr(layout, name, None) is None:
      raise ValueError(f"layout is missing field {name!r} required by the BlockLayout contract.")
  seq_q, seq_kv = int(layout.seq_q), int(layout.seq_kv)
  block_q, block_kv = int(layout.block_q), int(layout.block_kv)
  nq, nk = -(-seq_q // block_q), -(-seq_kv // block_kv)
  kv_index, kv_count, kv_mask_id = (_int32(getattr(layout, name))
                                    for name in ("kv_index", "kv_count", "kv_mask_id"))
  partial_masks = jnp.asarray(layout.partial_masks, jnp.bool_)
  hl = kv_index.shape[0]
  if kv_index.ndim != 3 or kv_index.shape[1] != nq or kv_count.shape != (hl, nq):
    raise ValueError(f"layout.kv_index {kv_index.shape} / kv_count {kv_count.shape} do not match "
                     f"num_q_blocks={nq} (seq_q={seq_q}, block_q={block_q}).")
  if kv_mask_id.shape != kv_index.shape:
    raise ValueError(f"layout.kv_mask_id {kv_mask_id.shape} must match kv_index {kv_index.shape}.")
  if hl not in (1, num_heads):
    raise ValueError(f"layout has {hl} head rows; it must have 1 (shared) or "
                     f"num_heads={num_heads}.")
  if partial_masks.ndim != 3 or partial_masks.shape[1:] != (block_q, block_kv):
    raise ValueError(f"layout.partial_masks {partial_masks.shape} must be [P, {block_q}, "
                     f"{block_kv}].")
  if getattr(layout, "q_index", None) is not None:
    q_index, q_count, q_mask_id = (_int32(getattr(layout, name))
                                   for name in ("q_index", "q_count", "q_mask_id"))
    if q_index.shape[:2] != (hl, nk) or q_count.shape != (hl, nk):
      raise ValueError(f"layout.q_index {q_index.shape} does not match [Hl={hl}, nk={nk}, max_q].")
  else:
    q_index, q_count, q_mask_id = transpose_block_lists(kv_index, kv_count, kv_mask_id, nk)
  kv_index, kv_mask_id, kv_full_count = full_blocks_first(kv_index, kv_count, kv_mask_id)
  q_index, q_mask_id, q_full_count = full_blocks_first(q_index, q_count, q_mask_id)
  meta = LayoutMeta(seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv,
                    num_q_blocks=nq, num_kv_blocks=nk, layout_heads=hl,
                    max_kv=kv_index.shape[2], max_q=q_index.shape[2])
  arrays = LayoutArrays(*(jnp.asarray(x) for x in (
      kv_index, kv_count, kv_mask_id, q_index, q_count, q_mask_id, partial_masks,
      kv_full_count, q_full_count)))
  return arrays, meta


# ----------------------------------------------------------------------------------------------
# Flash-attention math on one tile pair (shared by the GPU and TPU kernels)
# ----------------------------------------------------------------------------------------------


def scores(a: jax.Array, b: jax.Array, scale_log2: float) -> jax.Array:
  """f32 `a @ b^T * scale * log2(e)`: [rows, D] x [cols, D] -> [rows, cols] (base-2 logits)."""
  s = lax.dot_general(a, b, NT_DIMS, preferred_element_type=jnp.float32)
  return s * scale_log2


def mask_partial(s: jax.Array, mask_id: jax.Array, load_mask: Callable[[jax.Array], jax.Array]):
  """Applies the token predicate only on PARTIAL blocks (mask_id >= 0): disallowed -> -inf.

  `load_mask(mask_id)` reads the bool tile of `partial_masks` aligned with `s`; it runs only in
  the PARTIAL branch, so FULL blocks cost neither the load nor the select.
  """
  return lax.cond(mask_id >= 0,
                  lambda x: jnp.where(load_mask(mask_id), x, -jnp.inf),
                  lambda x: x, s)


def apply_mask(s: jax.Array, mask_id: jax.Array, load_mask: Callable[[jax.Array], jax.Array],
               masked: bool | None) -> jax.Array:
  """Masking for a block whose kind is known statically (False: FULL, s unchanged; True:
  PARTIAL, predicate applied unconditionally) or only at run time (None: `mask_partial`)."""
  if masked is None:
    return mask_partial(s, mask_id, load_mask)
  return jnp.where(load_mask(mask_id), s, -jnp.inf) if masked else s


def softmax_init(rows: int, head_dim: int):
  """Initial (acc [rows, D], m [rows, 1], l [rows, 1]) of the online softmax, all f32."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))


def softmax_step(carry, s: jax.Array, v: jax.Array):
  """One online-softmax update with base-2 scores `s` [tq, tk] and values `v` [tk, D].

  Rows that have seen only masked keys keep m = -inf; `m_safe` turns their shift into 0 so
  exp2(-inf - 0) = 0 instead of NaN (no per-element select on FULL blocks).
  """
  acc, m_prev, l_prev = carry
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  p = jnp.exp2(s - m_safe)
  alpha = jnp.exp2(m_prev - m_safe)
  l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  pv = lax.dot_general(p.astype(v.dtype), v, NN_DIMS, preferred_element_type=jnp.float32)
  return alpha * acc + pv, m_next, l_next


def softmax_finalize(carry):
  """(out [tq, D] f32, lse [tq, 1] natural log); rows with no visible key: out 0, lse -inf."""
  acc, m, l = carry
  empty = l == 0.0
  out = acc / jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)
  return out, lse


def lse_to_base2(lse: jax.Array) -> jax.Array:
  """Natural-log LSE -> base-2 shift for `exp2(s - shift)`; empty rows (-inf) -> +inf so p = 0."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)


def dq_step(dq: jax.Array, s: jax.Array, lse2: jax.Array, delta: jax.Array, do: jax.Array,
            k: jax.Array, v: jax.Array) -> jax.Array:
  """dQ accumulation (unscaled) for one tile pair, queries on rows.

  s [tq, tk] base-2 logits (masked: -inf), lse2/delta [tq, 1], do [tq, D], k/v [tk, D].
  """
  p = jnp.exp2(s - lse2)
  dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  return dq + lax.dot_general(ds.astype(k.dtype), k, NN_DIMS, preferred_element_type=jnp.float32)


def _dkv_parts(s_t, lse2_row, delta_row, do, v):
  """p^T [tk, tq] and dS^T [tk, tq] (both f32) of one tile pair, keys on rows."""
  p_t = jnp.exp2(s_t - lse2_row)
  dp_t = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
  return p_t, p_t * (dp_t - delta_row)


def dkv_step(carry, s_t: jax.Array, lse2_row: jax.Array, delta_row: jax.Array, q: jax.Array,
             do: jax.Array, v: jax.Array):
  """dK (unscaled) / dV accumulation for one tile pair, keys on rows (`s_t = k @ q^T`).

  s_t [tk, tq] base-2 logits (masked: -inf), lse2_row/delta_row [1, tq], q/do [tq, D], v [tk, D].
  """
  dk, dv = carry
  p_t, ds_t = _dkv_parts(s_t, lse2_row, delta_row, do, v)
  dv = dv + lax.dot_general(p_t.astype(do.dtype), do, NN_DIMS, preferred_element_type=jnp.float32)
  dk = dk + lax.dot_general(ds_t.astype(q.dtype), q, NN_DIMS, preferred_element_type=jnp.float32)
  return dk, dv


def dkv_dq_step(carry, s_t: jax.Array, lse2_row: jax.Array, delta_row: jax.Array, q: jax.Array,
                do: jax.Array, k: jax.Array, v: jax.Array):
  """`dkv_step` that also returns this pair's dQ contribution (unscaled) `dS @ k` [tq, D] f32.

  Used by the fused GPU backward (dQ summed over key tiles with atomic adds); k [tk, D].
  """
  dk, dv = carry
  p_t, ds_t = _dkv_parts(s_t, lse2_row, delta_row, do, v)
  ds_t = ds_t.astype(q.dtype)
  dv = dv + lax.dot_general(p_t.astype(do.dtype), do, NN_DIMS, preferred_element_type=jnp.float32)
  dk = dk + lax.dot_general(ds_t, q, NN_DIMS, preferred_element_type=jnp.float32)
  dq = lax.dot_general(ds_t, k, TN_DIMS, preferred_element_type=jnp.float32)
  return (dk, dv), dq
