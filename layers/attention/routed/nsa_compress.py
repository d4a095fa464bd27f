"""NSA's compressed branch and block selection as pure functions (Yuan et al., 2025, arXiv 2502.11089, §3.3).

    k_cmp = compress(k_raw, block=l, stride=d)                  # [B, T_c, KVH, D], eq. 7 (mean or MLP phi)
    out, probs = compressed_attention(q, rope(k_cmp, j*d), v_cmp, block=l, stride=d)   # eq. 8
    scores = selection_scores(probs, ...)                        # [B, KVH, T, n_sel], eqs. 9-10
    block_index = select_blocks(scores, ...)                     # [B, KVH, T, S] int32, -1 = empty slot

Compressed key j summarises tokens [j*d, j*d + l) and is visible to query t iff j*d + l - 1 <= t
(it has seen only the past). Scores are [B, H, T, T_c] with T_c = (T - l) // d + 1: never [T, T].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.layers import routing, weights


def num_compressed(seq_len: int, *, block: int, stride: int) -> int:
  """T_c = floor((T - l) / d) + 1 compressed blocks fit in T tokens (0 when T < l; eq. 7's index range)."""
  return max(0, (seq_len - block) // stride + 1)


def num_select_blocks(seq_len: int, select_block: int) -> int:
  """Selection blocks of l' tokens covering T tokens (the last may be partial)."""
  return math.ceil(seq_len / select_block)


def block_windows(x: jax.Array, *, block: int, stride: int) -> jax.Array:
  """x [B, T, N, D] -> the T_c windows [B, T_c, l, N, D]; window j holds tokens j*d .. j*d + l - 1."""
  count = num_compressed(x.shape[1], block=block, stride=stride)
  token = np.arange(count)[:, None] * stride + np.arange(block)[None, :]  # [T_c, l]
  return x[:, token]


def compress(x: jax.Array, *, block: int, stride: int, mlp: dict | None = None) -> jax.Array:
  """phi of eq. 7 over every window: x [B, T, N, D] (un-roped keys or values) -> [B, T_c, N, D] in x.dtype.

  `mlp=None`: mean pooling (fla's simplification). Otherwise the paper's "learnable MLP with intra-block
  position encoding", shared by the N heads: with the window's tokens x_i (i < l) and a learned position
  embedding pe [l, D], phi = w2 . gelu(sum_i (x_i + pe_i) . w1_i + b1) + b2, i.e. an MLP over the
  flattened [l * D] window. `mlp` holds pe [l, D], w1 [l, D, F], b1 [F], w2 [F, D], b2 [D] (any dtype;
  the products run in x.dtype with f32 accumulation).
  """
  windows = block_windows(x, block=block, stride=stride)  # [B, T_c, l, N, D]
  if mlp is None:
    return jnp.mean(windows.astype(jnp.float32), axis=2).astype(x.dtype)
  cast = {name: value if weights.is_quantized(value) else value.astype(x.dtype) for name, value in mlp.items()}
  windows = windows + cast["pe"][None, None, :, None, :]
  hidden = jnp.einsum("BCLND,LDF->BCNF", windows, cast["w1"], preferred_element_type=jnp.float32)
  hidden = jax.nn.gelu(hidden + cast["b1"].astype(jnp.float32)).astype(x.dtype)
  out = jnp.einsum("BCNF,FD->BCND", hidden, cast["w2"], preferred_element_type=jnp.float32)
  return (out + cast["b2"].astype(jnp.float32)).astype(x.dtype)


def compressed_visible(seq_len: int, *, block: int, stride: int) -> np.ndarray:
  """bool [T, T_c]: query t sees compressed key j iff the whole block lies in its past, j*d + l - 1 <= t."""
  count = num_compressed(seq_len, block=block, stride=stride)
  return np.arange(count)[None, :] * stride + block - 1 <= np.arange(seq_len)[:, None]


def compressed_attention(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, *, block: int, stride: int,
                         scale: float | None = None) -> tuple[jax.Array, jax.Array]:
  """Attention of every query over the compressed keys it may see (eq. 8 with the compressed K/V).

  q [B, T, H, D] (roped), k_cmp [B, T_c, KVH, D] (roped at the blocks' first positions), v_cmp likewise;
  query head h reads kv head h // (H // KVH). Returns (out [B, T, H, D] in q.dtype, probs f32
  [B, KVH, G, T, T_c] with G = H / KVH, the softmax the selection reads). A query that sees no compressed
  key (t < l - 1) gets out 0 and probs 0, never NaN. Softmax statistics in f32.
  """
  batch, seq_len, heads, dim = q.shape
  kv_heads = k_cmp.shape[2]
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  group = heads // kv_heads
  if k_cmp.shape[1] == 0:
    return jnp.zeros_like(q), jnp.zeros((batch, kv_heads, group, seq_len, 0), jnp.float32)
  q = q.reshape(batch, seq_len, kv_heads, group, dim)
  scores = jnp.einsum("BTKGD,BCKD->BKGTC", q, k_cmp, preferred_element_type=jnp.float32) * scale
  visible = jnp.asarray(compressed_visible(seq_len, block=block, stride=stride))
  row_max = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.exp(jnp.where(visible, scores - row_max, -jnp.inf))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("BKGTC,BCKD->BTKGD", probs.astype(v_cmp.dtype), v_cmp, preferred_element_type=jnp.float32)
  return out.reshape(batch, seq_len, heads, dim).astype(q.dtype), probs


def overlap_weights(num_cmp: int, num_sel: int, *, compress_block: int, compress_stride: int,
                    select_block: int) -> np.ndarray:
  """f32 [T_c, n_sel]: tokens shared by compressed block j and selection block s, in units of the stride d.

  Eq. 9 maps compressed scores onto selection blocks "according to their spatial relationship"; this is
  that relationship written as token overlap |[j*d, j*d + l) ∩ [s*l', (s+1)*l')| / d. For l=32, d=16,
  l'=64, selection block s collects compressed blocks 4s-1 .. 4s+3 with weights 1, 2, 2, 2, 1. Dense:
  for tests and small T (`selection_scores` applies the same weights as a band).
  """
  start = np.arange(num_cmp)[:, None] * compress_stride
  sel_start = np.arange(num_sel)[None, :] * select_block
  overlap = np.minimum(start + compress_block, sel_start + select_block) - np.maximum(start, sel_start)
  return (np.maximum(overlap, 0) / compress_stride).astype(np.float32)


def selection_scores(probs: jax.Array, num_sel: int, *, compress_block: int, compress_stride: int,
                     select_block: int) -> jax.Array:
  """Importance of each selection block for each query, shared by a GQA group (eqs. 9-10).

  probs f32 [B, KVH, G, T, T_c] (`compressed_attention`) -> f32 [B, KVH, T, n_sel]: summed over the G query
  heads of a group (eq. 10) and mapped by `overlap_weights`. A compressed block overlaps at most
  ceil(l / l') + 1 selection blocks, so the map is a few scatter-adds of [B, KVH, T, T_c], never a
  [T_c, n_sel] matrix product.
  """
  shared = jnp.sum(probs, axis=2)  # [B, KVH, T, T_c]
  num_cmp = shared.shape[-1]
  scores = jnp.zeros((*shared.shape[:-1], num_sel), jnp.float32)
  if num_cmp == 0:
    return scores
  start = np.arange(num_cmp) * compress_stride
  for offset in range((compress_block - 1) // select_block + 2):
    target = start // select_block + offset  # [T_c] selection block this band entry lands in
    overlap = (np.minimum(start + compress_block, (target + 1) * select_block)
               - np.maximum(start, target * select_block))
    weight = np.where(target < num_sel, np.maximum(overlap, 0), 0) / compress_stride
    if not weight.any():
      continue
    scores = scores.at[..., np.minimum(target, num_sel - 1)].add(shared * weight.astype(np.float32))
  return scores


def select_blocks(scores: jax.Array, num_selected: int, *, select_block: int, init_blocks: int,
                  local_blocks: int) -> jax.Array:
  """Top-n selection blocks per (kv head, query), the paper's §4.1 rule; no gradient (indices only).

  scores f32 [B, KVH, T, n_sel] (`selection_scores`). Query t in block b_t = t // l' may pick blocks
  0 .. b_t (never the future); blocks 0 .. init_blocks - 1 and b_t - local_blocks + 1 .. b_t are always
  picked and counted in n. The other slots go to the highest scores, ties to the lower block id.
  Returns int32 [B, KVH, T, S] with S = min(n, n_sel): the picked block ids in ascending order, then -1 in
  the slots a query cannot fill (fewer than S visible blocks).
  """
  seq_len, num_sel = scores.shape[-2], scores.shape[-1]
  slots = min(num_selected, num_sel)
  own = np.arange(seq_len)[:, None] // select_block  # [T, 1]
  block = np.arange(num_sel)[None, :]
  visible = block <= own
  forced = visible & ((block < init_blocks) | (block > own - local_blocks))
  top = routing.masked_top_k(jax.lax.stop_gradient(scores), slots, mask=jnp.asarray(visible),
                             forced=jnp.asarray(forced))
  index = jnp.where(top.valid, top.indices, num_sel)
  index = jnp.sort(index, axis=-1)  # ascending ids, unfilled slots (num_sel) last
  return jnp.where(index < num_sel, index, -1).astype(jnp.int32)
