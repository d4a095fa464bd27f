"""Cached decode for DeepSeek Sparse Attention (DeepSeek-V3.2-Exp, §2): `dsa` (top-k tokens) and `dsa_block`
(indexer scores max-pooled per key block), equal to dsa.py's forward at every position.

  cache   k, v [B, max_len, KVH, D] and, in the sparse stage, index_k f32 [B, max_len, d_I], the lightning
          indexer's one shared key per position (LayerNorm(W_k x), partial RoPE), as the released inference
          code caches it (there in FP8; here f32, the training dtype of the scores).
  step    write k_t, v_t and the new token's indexer key at its position p; score the cached keys s <= p by
          eq. 1, I[s] = sum_j w_j ReLU(q_I,j . k_I[s]), in f32; then
            dsa        the top min(topk, p + 1) keys (every visible key while p + 1 <= topk), ties to the lower
                       index, as `dsa_indexer.running_top_k` selects;
            dsa_block  blocks ranked by the max of I over their keys s <= p, the own block p // block_size
                       forced and counted, top min(topk // block_size, blocks), as `dsa.select_blocks`;
          gather only the selected keys' K/V (one selection for all heads) and attend them.

Stages: the sparse stage decodes as above. The warm-up stage's forward is dense causal attention (its top-k is
used only by the indexer's KL loss, which decode does not compute), so warm-up decode is dense attention over
the cached prefix 0..p and keeps no indexer cache. Losses never run in decode; only the output matters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparseformer.layers import routing
from sparseformer.layers.attention.routed import decode_common as dc
from sparseformer.layers.attention.routed import dsa_indexer

_KV_AXES = ("batch", "kv_seq", "kv_heads", "head_dim")


def _sparse(module) -> bool:
  return module.config.dsa.stage != "warmup"


def init_cache(module, batch: int, max_len: int) -> dict[str, jax.Array]:
  """Zero cache of one DSA layer for `batch` rows of up to `max_len` tokens."""
  kv_shape = (batch, max_len, module.num_kv_heads, module.head_dim)
  dtype = module.indexer.dtype
  cache = {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype)}
  if _sparse(module):
    cache["index_k"] = jnp.zeros((batch, max_len, module.config.dsa.index_head_dim), jnp.float32)
  return cache


def cache_logical_axes(module) -> dict[str, tuple[str | None, ...]]:
  """Logical axis names of each cache array (the sharding rules place them on the mesh)."""
  axes = {"k": _KV_AXES, "v": _KV_AXES}
  if _sparse(module):
    axes["index_k"] = ("batch", "kv_seq", None)
  return axes


def prefill(module, x, q, k, v, positions, lengths, cache):
  """The training forward over the right-padded prompt (exact by causality: the indexer and the selection
  read keys s <= t only) and the cache of the real tokens."""
  max_len = cache["k"].shape[1]
  lengths = jnp.asarray(lengths, jnp.int32)
  dc.check_prefill(module.kind_name, q, k, lengths, max_len)
  out, _ = module(x, q, k, v, positions)  # under jit the unused KL loss is dead code
  dtype = cache["k"].dtype
  new = {"k": dc.keep_real(k.astype(dtype), lengths, max_len), "v": dc.keep_real(v.astype(dtype), lengths, max_len)}
  if "index_k" in cache:
    new["index_k"] = dc.keep_real(module.indexer(x, positions).k, lengths, max_len)
  return dc.keep_real(out, lengths), new


def decode_step(module, x_t, q_t, k_t, v_t, positions, cache):
  """One token per row: (out [B, 1, H, D] in q_t.dtype, the updated cache)."""
  dc.check_step(module.kind_name, q_t, k_t, positions)
  dsa = module.config.dsa
  positions = jnp.asarray(positions, jnp.int32)
  max_len = cache["k"].shape[1]
  cache = dict(cache, k=dc.write(cache["k"], positions, k_t[:, 0]), v=dc.write(cache["v"], positions, v_t[:, 0]))
  keys = jnp.arange(max_len)[None, :]
  visible = keys <= positions[:, None]  # [B, L]
  if not _sparse(module):
    tokens = jnp.broadcast_to(keys, visible.shape)[:, None]
    return dc.gather_attend(q_t[:, 0], cache["k"], cache["v"], tokens, visible[:, None])[:, None], cache
  features = module.indexer(x_t, positions[:, None])
  cache["index_k"] = dc.write(cache["index_k"], positions, features.k[:, 0])
  scores = dsa_indexer.tile_scores(features.q, features.weights, cache["index_k"])[:, 0]  # [B, L] f32
  if module.block:
    tokens, valid = _block_selection(scores, visible, positions, dsa.topk, dsa.block_size)
  else:
    picked = routing.masked_top_k(scores, min(dsa.topk, max_len), mask=visible)
    tokens, valid = picked.indices[:, None], picked.valid[:, None]
  return dc.gather_attend(q_t[:, 0], cache["k"], cache["v"], tokens, valid)[:, None], cache


def _block_selection(scores, visible, positions, topk: int, block_size: int):
  """dsa_block: the tokens [B, 1, n * bs] (and valid) of each row's top blocks by max-pooled score."""
  batch, max_len = scores.shape
  blocks = math.ceil(max_len / block_size)
  masked = jnp.where(visible, scores, dsa_indexer._MASKED)  # noqa: SLF001  the same stand-in for -inf
  masked = jnp.pad(masked, ((0, 0), (0, blocks * block_size - max_len)), constant_values=dsa_indexer._MASKED)  # noqa: SLF001
  pooled = masked.reshape(batch, blocks, block_size).max(-1)
  block = jnp.arange(blocks)[None, :]
  own = (positions // block_size)[:, None]
  picked = routing.masked_top_k(pooled, min(topk // block_size, blocks), mask=block * block_size <= positions[:, None],
                                forced=block == own)
  return dc.block_tokens(picked.indices[:, None], block_size, positions, max_len)
