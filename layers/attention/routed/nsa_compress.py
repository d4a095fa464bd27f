"""NSA's compressed branch and block selection as pure functions (Yuan et al., 2025, arXiv 2502.11089, §3.3).

    k_cmp = compress(k_raw, block=l, stride=d)                  # [B, T_c, KVH, D], eq. 7 (mean or MLP phi)
    out, probs = compressed_attention(q, rope(k_cmp, j*d), v_cmp, block=l, stride=d)   # eq. 8
    scores = selection_scores(probs, ...)                        # [B, KVH, T, n_sel], eqs. 9-10
    block_index = select_blocks(scores, ...)                     # [B, KVH, T, S] int32, -1 = empty slot

Compressed key j summarises tokens [j*d, j*d + l) and is visible to query t iff j*d + l - 1 <= t
(it has seen only the past). Scores are [B, H, T, T_c] with T_c = (T - l) // d + 1: never [T, T]; the model
runs the last three lines as `compressed_branch`, over query chunks (the causal part, [chunk, T_c] live).
"""

from __future__ import annotations

import functools
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


def compressed_visible(num_keys: int, num_queries: int, *, block: int, stride: int,
                       first_query: int = 0) -> np.ndarray:
  """bool [Q, T_c]: query t (rows: first_query .. first_query + Q - 1) sees compressed key j (of num_keys)
  iff the whole block lies in its past, j*d + l - 1 <= t."""
  return np.arange(num_keys)[None, :] * stride + block - 1 <= first_query + np.arange(num_queries)[:, None]


def compressed_attention(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, *, block: int, stride: int,
                         scale: float | None = None, first_query: int = 0) -> tuple[jax.Array, jax.Array]:
  """Attention of every query over the compressed keys it may see (eq. 8 with the compressed K/V).

  q [B, Q, H, D] (roped; the queries at positions first_query .. first_query + Q - 1), k_cmp [B, T_c, KVH, D]
  (roped at the blocks' first positions; any prefix of the keys that covers what the queries see), v_cmp
  likewise; query head h reads kv head h // (H // KVH). Returns (out [B, Q, H, D] in q.dtype, probs f32
  [B, KVH, G, Q, T_c] with G = H / KVH, the softmax the selection reads). A query that sees no compressed
  key (t < l - 1) gets out 0 and probs 0, never NaN. Softmax statistics in f32.
  """
  batch, num_queries, heads, dim = q.shape
  kv_heads, count = k_cmp.shape[2], k_cmp.shape[1]
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  group = heads // kv_heads
  if count == 0:
    return jnp.zeros_like(q), jnp.zeros((batch, kv_heads, group, num_queries, 0), jnp.float32)
  q = q.reshape(batch, num_queries, kv_heads, group, dim)
  scores = jnp.einsum("BTKGD,BCKD->BKGTC", q, k_cmp, preferred_element_type=jnp.float32) * scale
  visible = jnp.asarray(compressed_visible(count, num_queries, block=block, stride=stride, first_query=first_query))
  row_max = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.exp(jnp.where(visible, scores - row_max, -jnp.inf))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("BKGTC,BCKD->BTKGD", probs.astype(v_cmp.dtype), v_cmp, preferred_element_type=jnp.float32)
  return out.reshape(batch, num_queries, heads, dim).astype(q.dtype), probs


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
  heads of a group (eq. 10) and mapped by `overlap_weights`. With d | l' and l <= l', compressed block j
  starts in selection block j // r (r = l' / d) and spills into the next one by the rest of its l / d
  strides, so the map is two weighted sums over groups of r compressed blocks (a reshape), never a
  [T_c, n_sel] product or a scatter.
  """
  shared = jnp.sum(probs, axis=2)  # [B, KVH, T, T_c]
  num_cmp = shared.shape[-1]
  if num_cmp == 0:
    return jnp.zeros((*shared.shape[:-1], num_sel), jnp.float32)
  ratio, strides = select_block // compress_stride, compress_block // compress_stride
  groups = -(-num_cmp // ratio)
  shared = jnp.pad(shared, [(0, 0)] * (shared.ndim - 1) + [(0, groups * ratio - num_cmp)])
  shared = shared.reshape(*shared.shape[:-1], groups, ratio)
  phase = np.arange(ratio)
  here = np.minimum(strides, ratio - phase).astype(np.float32)  # strides inside selection block j // r
  spill = strides - here  # strides in the next one
  scores = jnp.einsum("...gr,r->...g", shared, here)
  pad = [(0, 0)] * (scores.ndim - 1)
  scores = jnp.pad(scores, pad + [(0, 1)])
  if spill.any():
    scores = scores + jnp.pad(jnp.einsum("...gr,r->...g", shared, spill), pad + [(1, 0)])
  width = scores.shape[-1]  # groups + 1; blocks past num_sel hold 0 (compressed blocks lie inside T)
  if width < num_sel:
    return jnp.pad(scores, pad + [(0, num_sel - width)])
  return scores[..., :num_sel]


def compressed_branch(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array, *, block: int, stride: int,
                      query_chunk: int, selection: dict | None = None) -> tuple[jax.Array, jax.Array | None]:
  """The compressed branch (eq. 8) and, with `selection`, the selection it ranks (eqs. 9-10, §4.1), over
  chunks of `query_chunk` queries: chunk c scores only the compressed keys its last query can see, so the
  work is the causal part of [T, T_c] and the live memory one chunk's [Q, T_c]. Each chunk is a
  jax.checkpoint: its probabilities are recomputed in the backward, not stored (memory linear in T).

  q [B, T, H, D], k_cmp / v_cmp [B, T_c, KVH, D] as `compressed_attention` takes them; `selection` the
  keyword arguments of `select_blocks` (select_block, num_selected, init_blocks, local_blocks). Returns
  (out [B, T, H, D] in q.dtype, block_index int32 [B, KVH, T, S] or None), equal to `compressed_attention`
  followed by `selection_scores` and `select_blocks` on the whole sequence.
  """
  seq_len = q.shape[1]

  @functools.partial(jax.checkpoint, static_argnums=(3,))
  def attend(q_c, k_c, v_c, first):
    out, probs = compressed_attention(q_c, k_c, v_c, block=block, stride=stride, first_query=first)
    return out, jax.lax.stop_gradient(probs)

  outs, indices = [], []
  for first in range(0, seq_len, query_chunk):
    last = min(first + query_chunk, seq_len) - 1
    seen = num_compressed(last + 1, block=block, stride=stride)  # keys of the chunk's last query
    out, probs = attend(q[:, first:last + 1], k_cmp[:, :seen], v_cmp[:, :seen], first)
    outs.append(out)
    if selection is not None:
      select_block = selection["select_block"]
      visible = last // select_block + 1  # selection blocks the chunk's last query may pick
      scores = selection_scores(probs, visible, compress_block=block, compress_stride=stride,
                                select_block=select_block)
      index = select_blocks(scores, first_query=first, **selection)
      slots = min(selection["num_selected"], num_select_blocks(seq_len, select_block))
      indices.append(jnp.pad(index, [(0, 0)] * 3 + [(0, slots - index.shape[-1])], constant_values=-1))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  if selection is None:
    return out, None
  return out, indices[0] if len(indices) == 1 else jnp.concatenate(indices, axis=2)


def select_blocks(scores: jax.Array, num_selected: int, *, select_block: int, init_blocks: int,
                  local_blocks: int, first_query: int = 0) -> jax.Array:
  """Top-n selection blocks per (kv head, query), the paper's §4.1 rule; no gradient (indices only).

  scores f32 [B, KVH, Q, n_sel] (`selection_scores`) of the queries first_query .. first_query + Q - 1. Query t in block b_t = t // l' may pick blocks
  0 .. b_t (never the future); blocks 0 .. init_blocks - 1 and b_t - local_blocks + 1 .. b_t are always
  picked and counted in n. The other slots go to the highest scores, ties to the lower block id.
  Returns int32 [B, KVH, T, S] with S = min(n, n_sel): the picked block ids in ascending order, then -1 in
  the slots a query cannot fill (fewer than S visible blocks).
  """
  rows, num_sel = scores.shape[-2], scores.shape[-1]
  slots = min(num_selected, num_sel)
  own = (first_query + np.arange(rows))[:, None] // select_block  # [T, 1]
  block = np.arange(num_sel)[None, :]
  visible = block <= own
  forced = visible & ((block < init_blocks) | (block > own - local_blocks))
  top = routing.masked_top_k(jax.lax.stop_gradient(scores), slots, mask=jnp.asarray(visible),
                             forced=jnp.asarray(forced))
  index = jnp.where(top.valid, top.indices, num_sel)
  index = jnp.sort(index, axis=-1)  # ascending ids, unfilled slots (num_sel) last
  return jnp.where(index < num_sel, index, -1).astype(jnp.int32)
