"""Self-attention with grouped-query heads, RoPE and a choice of dense or block-sparse kernels."""

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import rope
from sparseformer.layers.attention import backends, kinds
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.dense import causal_attention
from sparseformer.layers.attention.routed import ROUTED_KINDS, make_routed


class Attention(nnx.Module):
  """Multi-head attention; `num_kv_heads < num_heads` gives GQA (Ainslie et al., 2023).

  `kind == "global"` is dense causal attention (`causal_attention`); every other kind builds a static
  `BlockLayout` for the sequence length at trace time and runs `backends.attend` (bidirectional where
  `sparse_config.causal=False`). `layer` goes to `kinds.build_layout`: bigbird seeds its random blocks with
  `sparse_config.seed + layer`. Content-routed kinds (ROUTED_KINDS) hand q, k, v after RoPE and the input x
  to their own module (`routed.make_routed`, which owns its extra parameters) and return its aux.
  """

  def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, kind: str,
               sparse_config: SparseAttentionConfig, rope_theta: float, init_std: float, out_init_std: float,
               dtype, param_dtype, rngs: nnx.Rngs, layer: int = 0):
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.kind = kind
    self.layer = layer
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
    self.routed = make_routed(kind, dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              config=sparse_config, rope_theta=rope_theta, init_std=init_std, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs, layer=layer) if kind in ROUTED_KINDS else None

  def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [B, T, D], positions: [B, T] or [T] -> (out [B, T, D] in the compute dtype, aux).

    aux: {} for the static kinds; a routed kind's f32 scalars ("aux_loss", already weighted, and metrics).
    """
    batch = x.shape[0]
    # Tokens flattened into one axis M = B * T: the weight gradients then contract a single axis, which XLA CPU
    # runs without the transposes it inserts for a (B, T) contraction (~10 % of a layer's fwd+bwd).
    tokens = einops.rearrange(x.astype(self.dtype), "B T D -> (B T) D")
    q, k, v = (einops.rearrange(jnp.einsum("MD,DNH->MNH", tokens, w[...].astype(self.dtype)), "(B T) N H -> B T N H",
                                B=batch) for w in (self.wq, self.wk, self.wv))
    q = rope.apply_rope(q, positions, theta=self.rope_theta)
    k = rope.apply_rope(k, positions, theta=self.rope_theta)
    aux = {}
    if self.kind == "global":
      out = causal_attention(q, k, v)
    elif self.routed is not None:
      out, aux = self.routed(x.astype(self.dtype), q, k, v, positions)
    else:
      out = self._sparse_attention(q, k, v)
    out = einops.rearrange(out, "B T N H -> (B T) N H")
    out = einops.rearrange(jnp.einsum("MNH,NHD->MD", out, self.wo[...].astype(self.dtype)), "(B T) D -> B T D",
                           B=batch)
    return out, aux

  def _sparse_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    layout = kinds.build_layout(self.kind, self.sparse_config, seq_len=q.shape[1], num_heads=self.num_heads,
                                layer=self.layer)
    return backends.attend(q, k, v, layout, backend=self.sparse_config.backend)
