"""Token embedding with an optional tied output projection."""

import jax
import jax.numpy as jnp
from flax import nnx


class Embedding(nnx.Module):
  """Table [V, D] with logical axes ("vocab", "embed")."""

  def __init__(self, vocab_size: int, dim: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    table = nnx.initializers.normal(init_std)(rngs.params(), (vocab_size, dim), param_dtype)
    self.table = nnx.Param(table, logical_axes=("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, D] in the compute dtype."""
    return jnp.take(self.table[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: [B, T, D] -> logits [B, T, V] in f32."""
    return jnp.einsum("BTD,VD->BTV", x, self.table[...].astype(self.dtype), preferred_element_type=jnp.float32)
