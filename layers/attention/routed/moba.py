"""MoBA: Mixture of Block Attention (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs").

    out, aux = moba_attention(q, k, v, block_size=512, topk=3, block_q=64, backend="xla")

§2.2 (eq. 3-6): the keys are split into blocks of `block_size` tokens (the last one may be short); query t
scores block i by s_i = <q_t, mean_pool(K[I_i])> (f32, no softmax scale, no parameters), the gate keeps the
top-k scores and q_t attends the union of its gated blocks in one softmax. Causality (§2.2): blocks after the
query's own block are never chosen, the own block is always chosen, counts in `topk` and is attended
causally. Selection carries no gradient (the gate only picks indices); GQA selects per query head, query head
h reading kv head h // (H // KVH). Ties go to the lower block index. Scores are [B, H, T, T / block_size],
never [T, T].

Two exact schemes:
  union     `selection.attend_selected`: a query block of `block_q` tokens visits the union of its tokens'
            blocks (width min(visible blocks, block_q * (topk - 1) + own blocks)); any backend.
  kv_major  per key block, the (head, token) queries that chose it, attended in tiles and merged by log-sum-exp
            with the causal own block (MoBA's efficient form; `moba_kv_major.py`); the xla fast path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.layers import routing
from sparseformer.layers.attention import backends
from sparseformer.layers.attention.routed import decode_moba, moba_kv_major, selection


def block_scores(q: jax.Array, k: jax.Array, block_size: int) -> jax.Array:
  """s[b, h, t, i] = q[b, t, h] . mean(k[b, block i, h // G]) in f32 (MoBA §2.2, the gate's score): [B, H, T, nk]."""
  batch, seq, kv_heads, dim = k.shape
  num_blocks = math.ceil(seq / block_size)
  padded = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, num_blocks * block_size - seq), (0, 0), (0, 0)))
  sizes = jnp.minimum(block_size, seq - jnp.arange(num_blocks) * block_size).astype(jnp.float32)
  means = padded.reshape(batch, num_blocks, block_size, kv_heads, dim).sum(2) / sizes[:, None, None]
  group = q.shape[2] // kv_heads
  q32 = q.astype(jnp.float32).reshape(batch, seq, kv_heads, group, dim)
  return jnp.einsum("btkgd,bnkd->bkgtn", q32, means).reshape(batch, kv_heads * group, seq, num_blocks)


def select_blocks(q: jax.Array, k: jax.Array, block_size: int, topk: int) -> jax.Array:
  """Each query's key blocks: int32 [B, H, T, min(topk, nk)], the own block first, then by decreasing score;
  -1 where fewer blocks are visible than slots (early queries)."""
  seq = q.shape[1]
  scores = block_scores(q, k, block_size)
  own = (jnp.arange(seq) // block_size)[:, None]
  blocks = jnp.arange(scores.shape[-1])[None, :]
  picked = routing.masked_top_k(scores, min(topk, scores.shape[-1]), mask=blocks < own, forced=blocks == own)
  return picked.indices


def union_width(seq_len: int, block_q: int, block_size: int, topk: int) -> int:
  """Static bound on the blocks a query block of the union scheme visits."""
  starts = np.arange(0, seq_len, block_q)
  own_blocks = int(((np.minimum(starts + block_q, seq_len) - 1) // block_size - starts // block_size).max()) + 1
  return max(1, min(math.ceil(seq_len / block_size), block_q * (topk - 1) + own_blocks))


def density(block_index: jax.Array, block_size: int) -> jax.Array:
  """Attended keys / causal keys (f32 scalar) of MoBA selections [B, H, T, S] (the own block first)."""
  seq = block_index.shape[2]
  position = jnp.arange(seq)
  own_keys = position - (position // block_size) * block_size + 1  # causal part of the own block
  past = jnp.sum(block_index[..., 1:] >= 0, axis=-1)  # past blocks are whole
  attended = jnp.sum(own_keys[None, None] + past * block_size)
  return (attended / (block_index.shape[0] * block_index.shape[1] * seq * (seq + 1) / 2)).astype(jnp.float32)


def moba_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, topk: int, block_q: int = 64,
                   backend: str = "auto", scheme: str = "kv_major", kv_major_tile: int = 128
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoBA over q [B, T, H, D], k, v [B, T, KVH, D] (after RoPE) -> (out [B, T, H, D] in q.dtype, {"density"}).

  One attention layer's routed part end to end: block scores, top-k, then the union layout on `backend`, or
  the kv-major fast path where `scheme == "kv_major"` and `backend` resolves to xla.
  """
  if scheme not in ("union", "kv_major"):
    raise ValueError(f"attention.moba.scheme={scheme!r} is unknown; choose 'union' or 'kv_major'.")
  block_q = min(block_q, block_size)
  block_index = select_blocks(q, k, block_size, topk)
  geometry = type("Blocks", (), {"block_q": block_q, "block_kv": block_size})
  resolved = backends.resolve_backend(backend, q, geometry)
  if scheme == "kv_major" and resolved == "xla":
    out = moba_kv_major.attend(q, k, v, block_index, block_size=block_size, tile=kv_major_tile)
  else:
    width = union_width(q.shape[1], block_q, block_size, block_index.shape[-1])
    out = selection.attend_selected(q, k, v, block_index, block_q=block_q, block_kv=block_size, backend=resolved,
                                    width=width)
  return out, {"density": density(block_index, block_size)}


class MoBAAttention(nnx.Module):
  """The `moba` attention kind: no parameters of its own (`attention.moba.*` and attention.block_size,
  attention.backend configure it)."""

  def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, config, rope_theta: float,
               init_std: float, dtype, param_dtype, rngs: nnx.Rngs, layer: int = 0):
    del dim, num_heads, rope_theta, init_std, param_dtype, rngs, layer
    self.config = config
    self.dtype = dtype
    self.num_kv_heads, self.head_dim = num_kv_heads, head_dim  # the decode cache's shape

  def __call__(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causality follows token order (index t), as for every kind; x and positions are not read."""
    del x, positions
    moba = self.config.moba
    return moba_attention(q, k, v, block_size=moba.block_size, topk=moba.topk, block_q=self.config.block_size,
                          backend=self.config.backend, scheme=moba.scheme, kv_major_tile=moba.kv_major_tile)

  # Cached decode (issue 13; decode_moba.py): sparse, beyond the paper, which decodes densely.
  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    return decode_moba.init_cache(self, batch, max_len)

  def cache_logical_axes(self, batch: int | None = None, max_len: int | None = None
                         ) -> dict[str, tuple[str | None, ...]]:
    del batch, max_len  # the names do not depend on the sizes
    return decode_moba.cache_logical_axes()

  def prefill(self, x, q, k, v, positions, lengths, cache):
    return decode_moba.prefill(self, x, q, k, v, positions, lengths, cache)

  def decode_step(self, x_t, q_t, k_t, v_t, positions, cache):
    return decode_moba.decode_step(self, x_t, q_t, k_t, v_t, positions, cache)
