"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-AI 2025, "DeepSeek-V3.2-Exp", §2, eq. 1).

    I[t, s] = sum_j w[t, j] * ReLU(q_I[t, j] . k_I[s])                              (eq. 1)

H_I = `index_heads` query heads of width d_I = `index_head_dim`; ONE key head shared by all of them
(MQA), k_I = LayerNorm(W_k x); per-head weights w = (W_w x) * H_I^-1/2 * d_I^-1/2 (the scale of the
paper's released inference code); partial RoPE on the first `rope_dim` dims of q_I and k_I, rotate-half
(non-interleaved) as in the released code. Our decoder has no MLA query latent, so q_I = W_q x reads the
attention input x itself (DeepSeek reads the latent c_q). The Hadamard rotation and FP8 quantisation of
the released kernels are inference-speed options, not part of the function, and are left out.

Everything here is a pure function of arrays except `LightningIndexer`, which owns the parameters.
Scores run in f32 and never as [T, T] beyond tests: `running_top_k` scans key chunks with a running
top-k per query chunk, `block_max_scores` max-pools per key block chunk by chunk, and `score_rows`
builds [Cq, T] rows of one query chunk (the warm-up loss) with each key tile rematerialised.
Causality is by sequence index: key s is visible to query t iff s <= t.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import rope, routing, weights

_MASKED = -1e30  # finite stand-in for -inf (sums of masked scores stay finite)


class IndexerFeatures(NamedTuple):
  """The indexer's per-token features, all f32: scores are `tile_scores(q, weights, k)`."""

  q: jax.Array  # [B, T, H_I, d_I] indexer queries (partial RoPE applied)
  weights: jax.Array  # [B, T, H_I] per-head weights, scaled by H_I^-1/2 d_I^-1/2
  k: jax.Array  # [B, T, d_I] the one shared indexer key (LayerNorm, partial RoPE)


class LightningIndexer(nnx.Module):
  """Parameters of the lightning indexer (eq. 1): W_q [D, H_I, d_I], W_k [D, d_I], LayerNorm(d_I), W_w [D, H_I].

  Every parameter sits under this module, so its path contains "indexer" (the warm-up stage's optimizer
  freezes everything else by that name, train/optimizer.py).
  """

  def __init__(self, dim: int, *, index_heads: int, index_head_dim: int, rope_dim: int, rope_theta: float,
               init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
    normal = nnx.initializers.normal(init_std)
    self.index_heads, self.index_head_dim, self.rope_dim = index_heads, index_head_dim, rope_dim
    self.rope_theta, self.dtype = rope_theta, dtype
    self.wq = nnx.Param(normal(rngs.params(), (dim, index_heads, index_head_dim), param_dtype),
                        logical_axes=("embed", None, None))
    self.wk = nnx.Param(normal(rngs.params(), (dim, index_head_dim), param_dtype), logical_axes=("embed", None))
    self.k_norm_scale = nnx.Param(jnp.ones((index_head_dim,), param_dtype), logical_axes=(None,))
    self.k_norm_bias = nnx.Param(jnp.zeros((index_head_dim,), param_dtype), logical_axes=(None,))
    self.w_weights = nnx.Param(normal(rngs.params(), (dim, index_heads), param_dtype), logical_axes=("embed", None))

  def __call__(self, x: jax.Array, positions: jax.Array) -> IndexerFeatures:
    """x [B, T, D] (the caller detaches it where the stage asks), positions [T] or [B, T] -> features."""
    x = x.astype(self.dtype)
    cast = lambda w: weights.for_matmul(w, self.dtype)  # noqa: E731
    q = jnp.einsum("btd,dhe->bthe", x, cast(self.wq), preferred_element_type=jnp.float32)
    k = jnp.einsum("btd,de->bte", x, cast(self.wk), preferred_element_type=jnp.float32)
    k = layer_norm(k, self.k_norm_scale[...], self.k_norm_bias[...])
    q = partial_rope(q, positions, self.rope_dim, self.rope_theta)
    k = partial_rope(k[:, :, None], positions, self.rope_dim, self.rope_theta)[:, :, 0]
    head_weights = jnp.einsum("btd,dh->bth", x.astype(jnp.float32), weights.for_matmul(self.w_weights, jnp.float32))
    head_weights = head_weights * (self.index_heads ** -0.5 * self.index_head_dim ** -0.5)
    return IndexerFeatures(q, head_weights, k)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis in f32 (Ba et al. 2016), with scale and bias."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def partial_rope(x: jax.Array, positions: jax.Array, rope_dim: int, theta: float) -> jax.Array:
  """RoPE (rotate-half) on the first `rope_dim` dims of x [B, T, N, d]; the rest pass through."""
  if rope_dim == 0:
    return x
  rotated = rope.apply_rope(x[..., :rope_dim], positions, theta=theta)
  return jnp.concatenate([rotated, x[..., rope_dim:]], axis=-1)


def tile_scores(q: jax.Array, weights: jax.Array, k: jax.Array) -> jax.Array:
  """Eq. 1 on a tile: q [B, Q, H_I, d], weights [B, Q, H_I], k [B, S, d] -> I [B, Q, S] in f32."""
  logits = jnp.einsum("bqhd,bsd->bqhs", q, k, preferred_element_type=jnp.float32)
  return jnp.einsum("bqhs,bqh->bqs", jax.nn.relu(logits), weights)


def dense_scores(features: IndexerFeatures) -> jax.Array:
  """All scores I [B, T, T] at once, future keys included (tests and short sequences only)."""
  return tile_scores(features.q, features.weights, features.k)


# ------------------------------------------------------------------------------------- chunking


def _pad_axis1(x: jax.Array, length: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return x if x.shape[1] == length else jnp.pad(x, pad, constant_values=value)


def query_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, ...] -> [n, B, chunk, ...], padded with zeros to a whole number of chunks."""
  n = math.ceil(x.shape[1] / chunk)
  x = _pad_axis1(x, n * chunk)
  return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)


def query_unchunks(x: jax.Array, seq_len: int) -> jax.Array:
  """[n, B, chunk, ...] -> [B, seq_len, ...] (inverse of `query_chunks`)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :seq_len]


def _chunk_size(chunk: int, seq_len: int, multiple: int = 1) -> int:
  """`chunk` capped at the sequence (rounded up to `multiple`), and a multiple of `multiple`."""
  chunk = min(chunk, -(-seq_len // multiple) * multiple)
  return max(multiple, chunk // multiple * multiple)


def _key_tiles(k: jax.Array, chunk: int) -> jax.Array:
  """[B, S, d] -> [n, B, chunk, d] key chunks (zero padded)."""
  return query_chunks(k, chunk)


# ------------------------------------------------------------------------------------- selection


class TokenSelection(NamedTuple):
  """Per-query selected keys: index int32 [B, T, K] (-1 in empty slots), valid bool [B, T, K]."""

  index: jax.Array
  valid: jax.Array


def running_top_k(features: IndexerFeatures, topk: int, *, key_chunk: int, query_chunk: int) -> TokenSelection:
  """Each query's top-`topk` visible keys by I (eq. 1), K = min(topk, T) slots, never building [T, T].

  Query chunks of `query_chunk` run under `lax.map`; inside, key chunks of `key_chunk` run under
  `lax.scan` with a running top-k: each step merges the chunk's scores with the carried K best
  (`routing.masked_top_k` over the carry followed by the chunk, so ties go to the lower key index: the
  carry holds only lower indices, in order among equal scores). Key chunks wholly in a query chunk's
  future are skipped (`lax.cond`). A query t with t + 1 <= K selects every visible key; its other slots
  are empty (index -1, valid False). Slots are sorted by decreasing score. No gradient (indices only).
  """
  features = jax.tree.map(jax.lax.stop_gradient, features)
  batch, seq_len = features.k.shape[:2]
  slots = min(topk, seq_len)
  q_chunk, k_chunk = _chunk_size(query_chunk, seq_len), _chunk_size(key_chunk, seq_len)
  k_tiles = _key_tiles(features.k, k_chunk)
  key_ids = jnp.arange(k_tiles.shape[0] * k_chunk, dtype=jnp.int32).reshape(-1, k_chunk)

  def one_query_chunk(args):
    q, weights, start = args
    rows = start + jnp.arange(q_chunk, dtype=jnp.int32)  # [Cq] query indices

    def merge(carry, tile):
      values, index, valid = carry
      k, keys = tile
      visible = (keys[None, :] <= rows[:, None]) & (keys[None, :] < seq_len)  # [Cq, Ck]
      scores = tile_scores(q, weights, k)
      all_values = jnp.concatenate([values, scores], axis=-1)
      all_index = jnp.concatenate([index, jnp.broadcast_to(keys, (batch, q_chunk, k_chunk))], axis=-1)
      all_valid = jnp.concatenate([valid, jnp.broadcast_to(visible, (batch, q_chunk, k_chunk))], axis=-1)
      picked = routing.masked_top_k(all_values, slots, mask=all_valid)
      position = jnp.maximum(picked.indices, 0)
      new_index = jnp.where(picked.valid, jnp.take_along_axis(all_index, position, axis=-1), -1)
      return (jnp.where(picked.valid, picked.values, _MASKED), new_index, picked.valid)

    def step(carry, tile):
      needed = tile[1][0] <= start + q_chunk - 1  # the chunk's first key is visible to some query
      return jax.lax.cond(needed, merge, lambda carry, _: carry, carry, tile), None

    init = (jnp.full((batch, q_chunk, slots), _MASKED, jnp.float32), jnp.full((batch, q_chunk, slots), -1, jnp.int32),
            jnp.zeros((batch, q_chunk, slots), bool))
    (_, index, valid), _ = jax.lax.scan(step, init, (k_tiles, key_ids))
    return index, valid

  starts = jnp.arange(0, query_chunks(features.k[:, :, :1], q_chunk).shape[0] * q_chunk, q_chunk, dtype=jnp.int32)
  index, valid = jax.lax.map(one_query_chunk, (query_chunks(features.q, q_chunk),
                                                query_chunks(features.weights, q_chunk), starts))
  return TokenSelection(query_unchunks(index, seq_len), query_unchunks(valid, seq_len))


def block_max_scores(features: IndexerFeatures, block_size: int, *, key_chunk: int, query_chunk: int) -> jax.Array:
  """Indexer scores max-pooled per key block over the visible keys: [B, T, ceil(T / block_size)] f32.

  score[t, b] = max_{s in block b, s <= t} I[t, s]; a block with no visible key scores _MASKED
  (-1e30). Built per (query chunk, key chunk) tile, key chunks a multiple of block_size, so only
  [T, T / block_size] is ever kept. No gradient (selection only).
  """
  features = jax.tree.map(jax.lax.stop_gradient, features)
  seq_len = features.k.shape[1]
  q_chunk = _chunk_size(query_chunk, seq_len)
  k_chunk = _chunk_size(key_chunk, seq_len, block_size)
  k_tiles = _key_tiles(features.k, k_chunk)
  key_ids = jnp.arange(k_tiles.shape[0] * k_chunk, dtype=jnp.int32).reshape(-1, k_chunk)
  num_blocks = math.ceil(seq_len / block_size)

  def one_query_chunk(args):
    q, weights, start = args
    rows = start + jnp.arange(q_chunk, dtype=jnp.int32)

    def tile(_, args):
      k, keys = args
      visible = (keys[None, :] <= rows[:, None]) & (keys[None, :] < seq_len)
      scores = jnp.where(visible, tile_scores(q, weights, k), _MASKED)
      return None, scores.reshape(*scores.shape[:2], -1, block_size).max(-1)  # [B, Cq, Ck / bs]

    _, pooled = jax.lax.scan(tile, None, (k_tiles, key_ids))  # [n_k, B, Cq, Ck / bs]
    return jnp.moveaxis(pooled, 0, 2).reshape(*pooled.shape[1:3], -1)[..., :num_blocks]

  starts = jnp.arange(0, math.ceil(seq_len / q_chunk) * q_chunk, q_chunk, dtype=jnp.int32)
  pooled = jax.lax.map(one_query_chunk, (query_chunks(features.q, q_chunk), query_chunks(features.weights, q_chunk),
                                         starts))
  return query_unchunks(pooled, seq_len)


def score_rows(q: jax.Array, weights: jax.Array, k: jax.Array, *, key_chunk: int) -> jax.Array:
  """I [B, Q, S] of one query chunk against all keys, differentiable, one key tile at a time.

  Each tile is `jax.checkpoint`ed, so the backward keeps only the [B, Q, S] rows, never the
  [B, Q, H_I, S] ReLU inputs of every tile.
  """
  seq_kv = k.shape[1]
  chunk = _chunk_size(key_chunk, seq_kv)
  tile = jax.checkpoint(lambda _, k_tile: (None, tile_scores(q, weights, k_tile)))
  _, rows = jax.lax.scan(tile, None, _key_tiles(k, chunk))  # [n, B, Q, Ck]
  return jnp.moveaxis(rows, 0, 2).reshape(*rows.shape[1:3], -1)[..., :seq_kv]
