"""Cached decode for MoBA (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs").

Beyond the paper: MoBA decodes densely ("MoBA is used for prefill only, while we switch to full attention
during generation"; the released wrapper calls dense flash attention when q_len != kv_len). Here decode is
sparse too, and equals the training forward (moba.py, §2.2 eq. 3-6) at every position:

  cache   k, v [B, max_len, KVH, D] (selected blocks can lie anywhere in the past) and block_sum f32
          [B, ceil(max_len / block_size), KVH, D], the running sum of each key block's keys, the current
          partial block included. A block's count is not stored: complete past blocks hold block_size keys,
          and the own block's score is never read (it is forced).
  step    write k_t, v_t at the row's position p and add k_t to block p // block_size; score every block
          by q_t . block_sum / block_size in f32 per query head (the gate of eq. 4); masked_top_k with the
          own block forced and counted in topk, blocks after it excluded, ties to the lower index, no
          gradient; then gather only the selected blocks' K/V (tokens <= p) and attend them in one softmax.

Training's slot count is min(topk, blocks in T) and decode's min(topk, blocks in max_len); both keep the
top min(topk, visible blocks), so the selected sets are equal.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparseformer.layers import routing
from sparseformer.layers.attention.routed import decode_common as dc


def init_cache(module, batch: int, max_len: int) -> dict[str, jax.Array]:
  """Zero cache of one MoBA layer for `batch` rows of up to `max_len` tokens."""
  blocks = math.ceil(max_len / module.config.moba.block_size)
  kv_shape = (batch, max_len, module.num_kv_heads, module.head_dim)
  return {"k": jnp.zeros(kv_shape, module.dtype), "v": jnp.zeros(kv_shape, module.dtype),
          "block_sum": jnp.zeros((batch, blocks, module.num_kv_heads, module.head_dim), jnp.float32)}


def cache_logical_axes() -> dict[str, tuple[str, ...]]:
  """Logical axis names of each cache array (the sharding rules place them on the mesh)."""
  kv = ("batch", "kv_seq", "kv_heads", "head_dim")
  return {"k": kv, "v": kv, "block_sum": ("batch", "kv_blocks", "kv_heads", "head_dim")}


def prefill(module, x, q, k, v, positions, lengths, cache):
  """The training forward over the right-padded prompt (exact by causality: real tokens never read padding),
  and the cache of the real tokens: K/V and the block sums of keys t < lengths[b]."""
  max_len, block = cache["k"].shape[1], module.config.moba.block_size
  lengths = jnp.asarray(lengths, jnp.int32)
  dc.check_prefill("moba", q, k, lengths, max_len)
  out, _ = module(x, q, k, v, positions)
  out = dc.keep_real(out, lengths)
  k_real = dc.keep_real(k.astype(cache["k"].dtype), lengths, max_len)
  blocks = cache["block_sum"].shape[1]
  padded = jnp.pad(k_real.astype(jnp.float32), ((0, 0), (0, blocks * block - max_len), (0, 0), (0, 0)))
  block_sum = padded.reshape(k.shape[0], blocks, block, *k.shape[2:]).sum(2)
  return out, {"k": k_real, "v": dc.keep_real(v.astype(cache["v"].dtype), lengths, max_len), "block_sum": block_sum}


def decode_step(module, x_t, q_t, k_t, v_t, positions, cache):
  """One token per row: (out [B, 1, H, D] in q_t.dtype, the updated cache)."""
  del x_t
  dc.check_step("moba", q_t, k_t, positions)
  moba = module.config.moba
  positions = jnp.asarray(positions, jnp.int32)
  max_len, blocks = cache["k"].shape[1], cache["block_sum"].shape[1]
  own = positions // moba.block_size
  cache = {"k": dc.write(cache["k"], positions, k_t[:, 0]), "v": dc.write(cache["v"], positions, v_t[:, 0]),
           "block_sum": cache["block_sum"].at[jnp.arange(q_t.shape[0]), own].add(
               k_t[:, 0].astype(jnp.float32), mode="drop")}
  batch, _, heads, dim = q_t.shape
  kv_heads = k_t.shape[2]
  means = cache["block_sum"] / moba.block_size  # exact for the complete past blocks, the only ones ranked
  q32 = q_t[:, 0].astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum("bkgd,bnkd->bkgn", q32, means).reshape(batch, heads, blocks)
  block = jnp.arange(blocks)[None, None, :]
  picked = routing.masked_top_k(scores, min(moba.topk, blocks), mask=block < own[:, None, None],
                                forced=block == own[:, None, None])
  tokens, valid = dc.block_tokens(picked.indices, moba.block_size, positions, max_len)  # [B, H, S * bs]
  out = dc.gather_attend(q_t[:, 0], cache["k"], cache["v"], tokens, valid)
  return out[:, None], cache
