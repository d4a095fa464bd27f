"""Token embedding with an optional tied output projection."""

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import weights


class Embedding(nnx.Module):
  """Table [V, D] with logical axes ("vocab", "embed")."""

  def __init__(self, vocab_size: int, dim: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    table = nnx.initializers.normal(init_std)(rngs.params(), (vocab_size, dim), param_dtype)
    self.table = nnx.Param(table, logical_axes=("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, D] in the compute dtype."""
    if weights.is_quantized(self.table[...]):  # a quantized tied table (qwix PTQ): look rows up dequantized
      return jnp.take(weights.dequantized(self.table, self.dtype), tokens, axis=0)
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: [B, T, D] -> logits [B, T, V] in f32."""
    return jnp.einsum("BTD,VD->BTV", x, weights.for_matmul(self.table, self.dtype), preferred_element_type=jnp.float32)
