"""Self-attention with grouped-query heads, RoPE and a choice of dense or block-sparse kernels."""

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import rope
from sparseformer.layers import weights
from sparseformer.layers.attention import backends, kinds
from sparseformer.layers.attention import cache as cache_lib
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
    q, k, v = self._project_qkv(x, positions)
    aux = {}
    if self.kind == "global":
      out = causal_attention(q, k, v)
    elif self.routed is not None:
      out, aux = self.routed(x.astype(self.dtype), q, k, v, positions)
    else:
      out = self._sparse_attention(q, k, v)
    return self._project_out(out), aux

  def _project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H] in the compute dtype, RoPE applied to q and k (the one
    projection of __call__, prefill and decode_step)."""
    batch = x.shape[0]
    # Tokens flattened into one axis M = B * T: the weight gradients then contract a single axis, which XLA CPU
    # runs without the transposes it inserts for a (B, T) contraction (~10 % of a layer's fwd+bwd).
    tokens = einops.rearrange(x.astype(self.dtype), "B T D -> (B T) D")
    q, k, v = (einops.rearrange(jnp.einsum("MD,DNH->MNH", tokens, weights.for_matmul(w, self.dtype)),
                                "(B T) N H -> B T N H", B=batch) for w in (self.wq, self.wk, self.wv))
    q = rope.apply_rope(q, positions, theta=self.rope_theta)
    k = rope.apply_rope(k, positions, theta=self.rope_theta)
    return q, k, v

  def _project_out(self, out: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, D] through wo."""
    batch = out.shape[0]
    # Heads and head_dim contracted as one axis K = N * H: the same product, and the one form qwix can tile into
    # groups and calibrate for GPTQ (a quantized wo is stored as [K, D]).
    num_heads, head_dim = out.shape[-2:]
    out = einops.rearrange(out, "B T N H -> (B T) (N H)")
    wo = weights.for_matmul(self.wo, self.dtype).reshape(num_heads * head_dim, self.wo.shape[-1])
    return einops.rearrange(jnp.einsum("MK,KD->MD", out, wo), "(B T) D -> B T D", B=batch)

  def _sparse_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    layout = kinds.build_layout(self.kind, self.sparse_config, seq_len=q.shape[1], num_heads=self.num_heads,
                                layer=self.layer)
    return backends.attend(q, k, v, layout, backend=self.sparse_config.backend)

  # ----------------------------------------------------------------------------------------------- decode
  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """The zeroed KV cache of this layer for `batch` rows of up to `max_len` positions (cache.py says what each
    kind keeps); a routed kind's comes from its module."""
    if self.routed is not None:
      return self._routed_decoder().init_cache(batch, max_len)
    arrays, _ = cache_lib.init(self.kind, self.sparse_config, batch=batch, max_len=max_len,
                               num_kv_heads=self.num_kv_heads, head_dim=self.wk.shape[-1], dtype=self.dtype)
    return arrays

  def cache_logical_axes(self, batch: int, max_len: int) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of `init_cache`'s arrays, in the same structure (for train/sharding.py's rules).

    A routed module may define its own `cache_logical_axes(batch, max_len)`; without one, every array is named
    by rank: [B, S, K, H] -> (batch, kv_seq, kv_heads, head_dim), others (batch, None, ...)."""
    if self.routed is None:
      _, axes = cache_lib.init(self.kind, self.sparse_config, batch=batch, max_len=max_len,
                               num_kv_heads=self.num_kv_heads, head_dim=self.wk.shape[-1], dtype=self.dtype)
      return axes
    if hasattr(self.routed, "cache_logical_axes"):
      return self.routed.cache_logical_axes(batch, max_len)
    shapes = jax.eval_shape(lambda: self.init_cache(batch, max_len))
    return jax.tree.map(lambda s: cache_lib.KV_AXES if s.ndim == 4 else ("batch",) + (None,) * (s.ndim - 1),
                        shapes)

  def prefill(self, x: jax.Array, positions: jax.Array, lengths: jax.Array, cache: dict
              ) -> tuple[jax.Array, dict]:
    """Attends a right-padded prompt x [B, T, D] (positions [T] or [B, T]; row b real below lengths[b]) as
    __call__ does and writes its real positions into `cache` -> (out [B, T, D], cache). Outputs at pad positions
    are not meaningful."""
    q, k, v = self._project_qkv(x, positions)
    if self.routed is not None:
      out, cache = self._routed_decoder().prefill(x.astype(self.dtype), q, k, v, positions, lengths, cache)
      return self._project_out(out), cache
    if self.kind == "global":
      out = causal_attention(q, k, v)
    else:
      layout = cache_lib.prefill_layout(self.kind, self.sparse_config, seq_len=q.shape[1],
                                        max_len=cache["k"].shape[1], num_heads=self.num_heads, layer=self.layer)
      out = backends.attend(q, k, v, layout, backend=self.sparse_config.backend)
    return self._project_out(out), cache_lib.write_prefill(self.kind, self.sparse_config, cache, k, v, lengths)

  def decode_step(self, x_t: jax.Array, positions: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token per row, x_t [B, 1, D] at positions [B] -> (out [B, 1, D], cache with that token written)."""
    q_t, k_t, v_t = self._project_qkv(x_t, positions[:, None])
    if self.routed is not None:
      out, cache = self._routed_decoder().decode_step(x_t.astype(self.dtype), q_t, k_t, v_t, positions, cache)
      return self._project_out(out), cache
    cache = cache_lib.write_step(self.kind, self.sparse_config, cache, k_t, v_t, positions)
    out = cache_lib.read_step(self.kind, self.sparse_config, cache, q_t, positions, layer=self.layer)
    return self._project_out(out), cache

  def _routed_decoder(self) -> nnx.Module:
    if not all(hasattr(self.routed, name) for name in ("init_cache", "prefill", "decode_step")):
      raise ValueError(f"decode for attention kind {self.kind!r} is not built yet (its module has no init_cache / "
                       "prefill / decode_step); use a static kind in model.attention_pattern to decode.")
    return self.routed
