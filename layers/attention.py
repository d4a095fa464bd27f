"""Causal self-attention with grouped-query heads, RoPE and a choice of dense or block-sparse kernels."""

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import rope
from sparseformer.layers.attention_config import SparseAttentionConfig


class Attention(nnx.Module):
  """Multi-head causal attention; `num_kv_heads < num_heads` gives GQA (Ainslie et al., 2023).

  `kind == "global"` is dense causal attention (`jax.nn.dot_product_attention`); every other kind builds a
  static `BlockLayout` for the sequence length at trace time and runs `sparse_attention.attend`.
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
    x = x.astype(self.dtype)
    q = jnp.einsum("BTD,DNH->BTNH", x, self.wq[...].astype(self.dtype))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.wk[...].astype(self.dtype))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.wv[...].astype(self.dtype))
    q = rope.apply_rope(q, positions, theta=self.rope_theta)
    k = rope.apply_rope(k, positions, theta=self.rope_theta)
    if self.kind == "global":
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:
      out = self._sparse_attention(q, k, v)
    return jnp.einsum("BTNH,NHD->BTD", out, self.wo[...].astype(self.dtype))

  def _sparse_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    # Imported here so the dense model does not pay for the layout machinery.
    from sparseformer.layers import attention_patterns, sparse_attention

    layout = attention_patterns.build_layout(self.kind, self.sparse_config, seq_len=q.shape[1],
                                             num_heads=self.num_heads)
    return sparse_attention.attend(q, k, v, layout, backend=self.sparse_config.backend)
