"""The indexer's training losses in DeepSeek Sparse Attention's two stages (DeepSeek-V3.2-Exp §2.1).

Both are L_I = sum_t KL(p_t || softmax(I_t)), where p_t is the main attention distribution of query t
summed over its heads and L1-normalised (= the mean over heads, each head's distribution summing to 1),
held constant (stop_gradient):

  warm-up (§2.1, "Dense Warm-up Stage")    over every visible key s <= t            `dense_indexer_kl`
  sparse  (§2.1, "Sparse Training Stage")  over the selected set S_t only           `selected_indexer_kl`

We return the mean over the (batch, query) tokens rather than the sum, so the weight
(`attention.dsa.indexer_loss_weight`) does not scale with the batch or the length. Both run over query
chunks under `lax.map`, each chunk `jax.checkpoint`ed: the warm-up target is built [B, H, Cq, T] per chunk
and never as [B, H, T, T]; the sparse one gathers [B, Cq, K, ...] per chunk.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparseformer.layers.attention.routed.dsa_indexer import (IndexerFeatures, TokenSelection, query_chunks,
                                                              score_rows)

_MASKED = -1e30


def _kl_rows(target: jax.Array, logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """sum_s p_s (log p_s - log softmax(logits)_s) over allowed entries: [..., S] -> [...] (0 log 0 = 0)."""
  log_q = jax.nn.log_softmax(jnp.where(allowed, logits, _MASKED), axis=-1)
  positive = allowed & (target > 0)
  log_p = jnp.log(jnp.where(positive, target, 1.0))
  return jnp.sum(jnp.where(positive, target * (log_p - log_q), 0.0), axis=-1)


def _head_mean_distribution(scores: jax.Array, allowed: jax.Array) -> jax.Array:
  """Softmax over the last axis of f32 scores [B, Q, G, R, S] where allowed [B, Q, 1, 1, S], averaged over
  the heads (G, R) -> [B, Q, S]; rows with nothing allowed give zeros."""
  scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  row_sum = jnp.sum(probs, axis=-1, keepdims=True)
  return jnp.mean(probs / jnp.where(row_sum > 0, row_sum, 1.0), axis=(2, 3))


def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, D] -> [B, T, G, R, D] scaled by D^-1/2 (the attention's own scale), f32."""
  batch, seq_len, heads, dim = q.shape
  return (q.astype(jnp.float32) / math.sqrt(dim)).reshape(batch, seq_len, kv_heads, heads // kv_heads, dim)


def dense_indexer_kl(q: jax.Array, k: jax.Array, features: IndexerFeatures, *, query_chunk: int,
                     key_chunk: int) -> jax.Array:
  """Warm-up loss: mean over tokens of KL(p_t || softmax_{s <= t}(I[t, s])), p from dense causal attention.

  q [B, T, H, D], k [B, T, KVH, D]: the main attention's queries and keys (after RoPE), detached here.
  Per query chunk: p [B, Cq, T] from the [B, H, Cq, T] dense scores, I [B, Cq, T] by `score_rows`.
  Gradients reach only `features` (the indexer). Returns an f32 scalar.
  """
  batch, seq_len = q.shape[:2]
  chunk = max(1, min(query_chunk, seq_len))
  q, k = jax.lax.stop_gradient(_grouped(q, k.shape[2])), jax.lax.stop_gradient(k.astype(jnp.float32))
  keys = jnp.arange(seq_len)

  @jax.checkpoint
  def one_chunk(args):
    q_chunk, q_index, weights, start = args
    rows = start + jnp.arange(chunk)
    visible = (keys[None, :] <= rows[:, None])[None]  # [1, Cq, T]; padded rows see keys too, weighted 0 below
    target = _head_mean_distribution(jnp.einsum("bqgrd,bsgd->bqgrs", q_chunk, k), visible[:, :, None, None])
    logits = score_rows(q_index, weights, features.k, key_chunk=key_chunk)
    kl = _kl_rows(jax.lax.stop_gradient(target), logits, visible)
    return jnp.sum(jnp.where(rows < seq_len, kl, 0.0))

  starts = jnp.arange(0, math.ceil(seq_len / chunk) * chunk, chunk)
  per_chunk = jax.lax.map(one_chunk, (query_chunks(q, chunk), query_chunks(features.q, chunk),
                                      query_chunks(features.weights, chunk), starts))
  return jnp.sum(per_chunk) / (batch * seq_len)


def selected_indexer_kl(q: jax.Array, k: jax.Array, features: IndexerFeatures, selection: TokenSelection, *,
                        query_chunk: int, block_size: int | None = None, target: jax.Array | None = None) -> jax.Array:
  """Sparse-stage loss: mean over tokens of KL(p_t || softmax_{s in S_t}(I[t, s])) over the selected set.

  p_t is the sparse attention's own distribution over S_t (softmax of the main scores over the selected
  keys, head mean), detached. `selection` [B, T, K] as from `dsa_indexer.running_top_k` (or the tokens of
  dsa_block's selected blocks). Gradients reach only `features`. Returns an f32 scalar.

  block_size: the selection is `dsa.block_tokens` of blocks of this size (slot j * bs + i holds key
  block_j * bs + i), so keys are gathered as whole blocks ([B, Cq, n] slices of bs rows) instead of one row
  per slot: the same values (a test holds them equal), fewer and larger gathers.

  target: p_t itself, f32 [B, T, K] in the selection's slot order (`dsa_gather.token_gather_attention(
  return_probs=True)`): the main scores are then not recomputed (q, k unread).
  """
  batch, seq_len = q.shape[:2]
  chunk = max(1, min(query_chunk, seq_len))
  q, k = jax.lax.stop_gradient(_grouped(q, k.shape[2])), jax.lax.stop_gradient(k.astype(jnp.float32))
  index = jnp.where(selection.valid, selection.index, 0)
  gather = jax.vmap(lambda rows, ids: rows[ids])  # [B, S, ...], [B, Cq, K] -> [B, Cq, K, ...]
  if block_size is not None:
    if index.shape[-1] % block_size:
      raise ValueError(f"selected_indexer_kl: {index.shape[-1]} slots are not whole blocks of block_size="
                       f"{block_size}; pass the selection of dsa.block_tokens with its block size.")
    num_blocks = math.ceil(seq_len / block_size)
    index = index.reshape(*index.shape[:2], -1, block_size)[..., 0] // block_size  # [B, T, n] block ids
    as_blocks = lambda x: jnp.pad(x, ((0, 0), (0, num_blocks * block_size - seq_len)) + ((0, 0),) * (  # noqa: E731
        x.ndim - 2)).reshape(batch, num_blocks, block_size, *x.shape[2:])
    blocks = jax.vmap(lambda rows, ids: rows[ids])  # [B, nk, bs, ...], [B, Cq, n] -> [B, Cq, n, bs, ...]
    gather = lambda x, ids: (lambda g: g.reshape(*g.shape[:2], -1, *g.shape[4:]))(  # noqa: E731
        blocks(as_blocks(x), ids))

  @jax.checkpoint
  def one_chunk(args):
    q_chunk, q_index, weights, ids, valid, p = args
    if p is None:
      p = _head_mean_distribution(jnp.einsum("bqgrd,bqkgd->bqgrk", q_chunk, gather(k, ids)),
                                  valid[:, :, None, None])
    logits = jnp.einsum("bqhd,bqkd->bqhk", q_index, gather(features.k, ids))
    logits = jnp.einsum("bqhk,bqh->bqk", jax.nn.relu(logits), weights)  # eq. 1 on the selected keys
    return jnp.sum(_kl_rows(jax.lax.stop_gradient(p), logits, valid))  # padded rows: nothing valid, 0

  target = None if target is None else query_chunks(jax.lax.stop_gradient(target.astype(jnp.float32)), chunk)
  per_chunk = jax.lax.map(one_chunk, tuple(query_chunks(x, chunk) for x in (
      q, features.q, features.weights, index, selection.valid)) + (target,))
  return jnp.sum(per_chunk) / (batch * seq_len)
