"""Dense causal attention: the CPU blocked path and the accelerator path, same function."""

import einops
import jax
import jax.numpy as jnp

CPU_BLOCK_SIZE = 128  # query rows per block of `blocked_causal_attention`; 64-256 measure alike at T = 512


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Dense causal attention, q: [B, T, N, H], k, v: [B, T, K, H] (K divides N) -> [B, T, N, H].

  On the CPU backend `blocked_causal_attention` (the T x T softmax is elementwise-bound there, and it skips the
  masked half); elsewhere `jax.nn.dot_product_attention`, the reference, whose default implementation is
  XLA's (materialised T x T scores; cuDNN only when asked for: 12 % MFU for `base` on an H200, docs/benchmarks.md).
  """
  if jax.default_backend() == "cpu":
    return blocked_causal_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int = CPU_BLOCK_SIZE
                             ) -> jax.Array:
  """`jax.nn.dot_product_attention(q, k, v, is_causal=True)` computed in query blocks.

  Query block [s, e) scores only keys [0, e), so of the T x T scores only the causal half plus the diagonal
  blocks is built (5/8 of them at T = 512, blocks of 128). Shapes as `causal_attention`; any T (the last block
  may be short); the softmax runs in f32 and the output has q's dtype.
  """
  _, seq_len, num_heads, head_dim = q.shape
  q = einops.rearrange(q * head_dim**-0.5, "B T (K G) H -> B T K G H", K=k.shape[2])
  outs = []
  for start in range(0, seq_len, block_size):
    end = min(start + block_size, seq_len)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q[:, start:end], k[:, :end], preferred_element_type=jnp.float32)
    causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
    scores = jnp.where(causal, scores, -jnp.inf)
    # Softmax is shift-invariant, so the row max needs no gradient; normalising after the product with v
    # divides [T, H] instead of [T, S] (the diagonal keeps every row's max finite).
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights.astype(v.dtype), v[:, :end], preferred_element_type=jnp.float32)
    outs.append(out / einops.rearrange(jnp.sum(weights, axis=-1), "B K G T -> B T K G 1"))
  return einops.rearrange(jnp.concatenate(outs, axis=1), "B T K G H -> B T (K G) H").astype(q.dtype)
