"""Exact token-gather attention: each query attends the keys it selected (DSA, DeepSeek-V3.2-Exp §2).

    out[t, h] = sum_{j valid} softmax_j(q[t, h] . k[index[t, j], h // R] * scale) v[index[t, j], h // R]

One selection per token shared by all heads (MQA style, as DSA under MLA's MQA mode): index [B, T, K]
with `valid` [B, T, K]. Queries run in chunks of `query_chunk` under `lax.map`; a step gathers its
chunk's keys and values [B, Cq, K, KVH, D], so memory is O(B * Cq * K * KVH * D) per step, not for the
whole sequence. A flash-style custom VJP (Dao et al. 2022, FlashAttention, §3.1 / Alg. 2) keeps only
q, k, v, out and the f32 log-sum-exp, recomputes each chunk's gathers in the backward pass and
scatter-adds dk / dv; the backward never stores [T, K, D] gathers for all chunks.
Softmax statistics in f32, output in q.dtype; a row with no valid key returns zeros with zero gradients.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from sparseformer.layers.attention.routed.dsa_indexer import query_chunks, query_unchunks


def token_gather_attention(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, valid: jax.Array, *,
                           query_chunk: int = 128, scale: float | None = None, return_probs: bool = False):
  """q [B, T, H, D], k / v [B, S, KVH, D], index int [B, T, K] (any value where not valid), valid bool
  [B, T, K] -> [B, T, H, D] in q.dtype. Raises ValueError on inconsistent shapes.

  return_probs: also return the head mean of the attention probabilities per slot, f32 [B, T, K] under
  stop_gradient (0 in invalid slots; DSA's sparse-stage KL target, `dsa_loss.selected_indexer_kl(target=)`)."""
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"token_gather_attention: expected q [B, T, H, D], k = v [B, S, KVH, D]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"token_gather_attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  if index.shape != valid.shape or index.shape[:2] != q.shape[:2]:
    raise ValueError(f"token_gather_attention: index {index.shape} and valid {valid.shape} must both be "
                     f"[B, T, K] with B, T = {q.shape[:2]}")
  batch, seq_len, heads, dim = q.shape
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  chunk = max(1, min(query_chunk, seq_len))
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # one rounding, as the block backends
  q = q.reshape(batch, seq_len, k.shape[2], heads // k.shape[2], dim)  # [B, T, G, R, D]
  index = jnp.where(valid, index, 0).astype(jnp.int32)
  out, probs = _gather_core(chunk, query_chunks(q, chunk), k, v, query_chunks(index, chunk),
                            query_chunks(valid.astype(bool), chunk))
  out = query_unchunks(out, seq_len).reshape(batch, seq_len, heads, dim)
  if not return_probs:
    return out
  return out, jax.lax.stop_gradient(query_unchunks(probs, seq_len))


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, S, G, D], index [B, Cq, K] -> [B, Cq, K, G, D]."""
  return jax.vmap(lambda rows, ids: rows[ids])(x, index)


def _scores(q, k_sel, valid):
  """f32 scores [B, Cq, G, R, K] of pre-scaled q [B, Cq, G, R, D]; invalid slots -inf."""
  scores = jnp.einsum("bqgrd,bqkgd->bqgrk", q, k_sel, preferred_element_type=jnp.float32)
  return jnp.where(valid[:, :, None, None, :], scores, -jnp.inf)


def _forward(q_chunks, k, v, index_chunks, valid_chunks):
  def step(args):
    q, index, valid = args
    k_sel, v_sel = _gather(k, index), _gather(v, index)
    scores = _scores(q, k_sel, valid)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # no valid key: probabilities 0, not NaN
    probs = jnp.exp(scores - row_max)
    row_sum = jnp.sum(probs, axis=-1)
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)
    out = jnp.einsum("bqgrk,bqkgd->bqgrd", probs.astype(v.dtype), v_sel, preferred_element_type=jnp.float32)
    head_mean = jnp.mean(probs / safe_sum[..., None], axis=(2, 3))  # [B, Cq, K]
    return (out / safe_sum[..., None]).astype(q.dtype), row_max[..., 0] + jnp.log(safe_sum), head_mean

  return jax.lax.map(step, (q_chunks, index_chunks, valid_chunks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gather_core(chunk, q_chunks, k, v, index_chunks, valid_chunks):
  """(out, head-mean probabilities) per chunk; the probabilities carry no gradient (the caller stops them)."""
  del chunk  # static: part of the trace key only
  out, _, head_mean = _forward(q_chunks, k, v, index_chunks, valid_chunks)
  return out, head_mean


def _gather_core_fwd(chunk, q_chunks, k, v, index_chunks, valid_chunks):
  del chunk
  out, lse, head_mean = _forward(q_chunks, k, v, index_chunks, valid_chunks)
  return (out, head_mean), (q_chunks, k, v, index_chunks, valid_chunks, out, lse)


def _gather_core_bwd(chunk, residuals, cotangents):
  """Per chunk: recompute p from the lse, dq for the chunk, scatter-add dk / dv of its selected keys."""
  del chunk
  d_out = cotangents[0]  # the head-mean probabilities are returned under stop_gradient: no cotangent
  q_chunks, k, v, index_chunks, valid_chunks, out, lse = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [n, B, Cq, G, R]
  scatter = jax.vmap(lambda acc, ids, update: acc.at[ids].add(update))

  def step(carry, args):
    dk_acc, dv_acc = carry
    q, do, lse_step, delta_step, index, valid = args
    k_sel, v_sel = _gather(k, index), _gather(v, index)
    probs = jnp.exp(_scores(q, k_sel, valid) - lse_step[..., None])
    d_probs = jnp.einsum("bqgrd,bqkgd->bqgrk", do, v_sel, preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - delta_step[..., None])).astype(q.dtype)
    dq = jnp.einsum("bqgrk,bqkgd->bqgrd", d_scores, k_sel, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bqgrk,bqgrd->bqkgd", d_scores, q, preferred_element_type=jnp.float32)
    dv = jnp.einsum("bqgrk,bqgrd->bqkgd", probs.astype(do.dtype), do, preferred_element_type=jnp.float32)
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[3:])  # noqa: E731  [B, Cq * K, G, D]
    ids = index.reshape(index.shape[0], -1)
    return (scatter(dk_acc, ids, flat(dk)), scatter(dv_acc, ids, flat(dv))), dq.astype(q.dtype)

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), (q_chunks, d_out.astype(q_chunks.dtype), lse, delta,
                                                     index_chunks, valid_chunks))
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_gather_core.defvjp(_gather_core_fwd, _gather_core_bwd)
