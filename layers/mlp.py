"""SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer")."""

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import weights


class SwiGLU(nnx.Module):
  """y = (silu(x W_gate) * (x W_up)) W_down with hidden size `hidden`."""

  def __init__(self, dim: int, hidden: int, *, init_std: float, out_init_std: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    normal = nnx.initializers.normal
    self.w_gate = nnx.Param(normal(init_std)(rngs.params(), (dim, hidden), param_dtype), logical_axes=("embed", "mlp"))
    self.w_up = nnx.Param(normal(init_std)(rngs.params(), (dim, hidden), param_dtype), logical_axes=("embed", "mlp"))
    self.w_down = nnx.Param(normal(out_init_std)(rngs.params(), (hidden, dim), param_dtype),
                            logical_axes=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D] in the compute dtype."""
    # One token axis M = B * T, as in Attention: XLA CPU transposes activations for a (B, T) weight gradient.
    tokens = einops.rearrange(x.astype(self.dtype), "B T D -> (B T) D")
    gate = jnp.einsum("MD,DF->MF", tokens, weights.for_matmul(self.w_gate, self.dtype))
    up = jnp.einsum("MD,DF->MF", tokens, weights.for_matmul(self.w_up, self.dtype))
    out = jnp.einsum("MF,FD->MD", jax.nn.silu(gate) * up, weights.for_matmul(self.w_down, self.dtype))
    return einops.rearrange(out, "(B T) D -> B T D", B=x.shape[0])
