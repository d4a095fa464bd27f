"""Causal self-attention with grouped-query heads, RoPE and a choice of dense or block-sparse kernels."""

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import rope
from sparseformer.layers.attention_config import SparseAttentionConfig


class Attention(nnx.Module):
  """Multi-head causal attention; `num_kv_heads < num_heads` gives GQA (Ainslie et al., 2023).

  `kind == "global"` is dense causal attention (`causal_attention`); every other kind builds a static
  `BlockLayout` for the sequence length at trace time and runs `sparse_attention.attend`.
  """

  def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, kind: str,
               sparse_config: SparseAttentionConfig, rope_theta: float, init_std: float, out_init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.kind = kind
    self.sparse_config = sparse_config
    self.rope_theta = rope_theta
    self.dtype = dtype
    normal = nnx.initializers.normal
    self.wq = nnx.Param(normal(init_std)(rngs.params(), (dim, num_heads, head_dim), param_dtype),
                        logical_axes=("embed", "heads", "head_dim"))
    self.wk = nnx.Param(normal(init_std)(rngs.params(), (dim, num_kv_heads, head_dim), param_dtype),
                        logical_axes=("embed", "kv_heads", "head_dim"))
    self.wv = nnx.Param(normal(init_std)(rngs.params(), (dim, num_kv_heads, head_dim), param_dtype),
                        logical_axes=("embed", "kv_heads", "head_dim"))
    self.wo = nnx.Param(normal(out_init_std)(rngs.params(), (num_heads, head_dim, dim), param_dtype),
                        logical_axes=("heads", "head_dim", "embed"))

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [B, T, D], positions: [B, T] or [T] -> [B, T, D] in the compute dtype."""
    batch = x.shape[0]
    # Tokens flattened into one axis M = B * T: the weight gradients then contract a single axis, which XLA CPU
    # runs without the transposes it inserts for a (B, T) contraction (~10 % of a layer's fwd+bwd).
    tokens = einops.rearrange(x.astype(self.dtype), "B T D -> (B T) D")
    q, k, v = (einops.rearrange(jnp.einsum("MD,DNH->MNH", tokens, w[...].astype(self.dtype)), "(B T) N H -> B T N H",
                                B=batch) for w in (self.wq, self.wk, self.wv))
    q = rope.apply_rope(q, positions, theta=self.rope_theta)
    k = rope.apply_rope(k, positions, theta=self.rope_theta)
    if self.kind == "global":
      out = causal_attention(q, k, v)
    else:
      out = self._sparse_attention(q, k, v)
    out = einops.rearrange(out, "B T N H -> (B T) N H")
    return einops.rearrange(jnp.einsum("MNH,NHD->MD", out, self.wo[...].astype(self.dtype)), "(B T) D -> B T D",
                            B=batch)

  def _sparse_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    # Imported here so the dense model does not pay for the layout machinery.
    from sparseformer.layers import attention_patterns, sparse_attention

    layout = attention_patterns.build_layout(self.kind, self.sparse_config, seq_len=q.shape[1],
                                             num_heads=self.num_heads)
    return sparse_attention.attend(q, k, v, layout, backend=self.sparse_config.backend)


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
