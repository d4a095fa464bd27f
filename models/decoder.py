"""Decoder-only language model assembled from a ModelConfig."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers.attention import Attention
from sparseformer.layers import weights
from sparseformer.layers.embedding import Embedding
from sparseformer.layers.mlp import SwiGLU
from sparseformer.layers.moe import MoEFeedForward
from sparseformer.layers.norm import RMSNorm
from sparseformer.models.config import ModelConfig


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

  def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    out_init_std = config.init_std / math.sqrt(2 * config.num_layers)
    self.ffn_kind = config.ffn_kind(layer)
    self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attention = Attention(
        dim=config.d_model, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        head_dim=config.resolved_head_dim, kind=config.attention_kind(layer), sparse_config=config.attention,
        rope_theta=config.rope_theta, init_std=config.init_std, out_init_std=out_init_std, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs, layer=layer if config.bigbird_seed_per_layer else 0)
    self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype, rngs=rngs)
    if self.ffn_kind == "moe":
      self.ffn = MoEFeedForward(config.d_model, config.moe, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.ffn = SwiGLU(config.d_model, config.resolved_mlp_hidden, init_std=config.init_std,
                        out_init_std=out_init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-> (x, aux): aux["aux_loss"] sums the attention's and the FFN's weighted losses; every other entry is a
    metric named `attention/{name}` or `{ffn_kind}/{name}`."""
    attended, attention_aux = self.attention(self.attention_norm(x), positions)
    x = x + attended
    if self.ffn_kind == "moe":
      y, ffn_aux = self.ffn(self.ffn_norm(x))
    else:
      y, ffn_aux = self.ffn(self.ffn_norm(x)), {}
    aux = {}
    for prefix, part in (("attention", attention_aux), (self.ffn_kind, ffn_aux)):
      for name, value in part.items():
        if name == "aux_loss":
          aux["aux_loss"] = aux["aux_loss"] + value if "aux_loss" in aux else value
        else:
          aux[f"{prefix}/{name}"] = value
    return x + y, aux

  def prefill(self, x: jax.Array, positions: jax.Array, lengths: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """__call__ over a right-padded prompt that also fills this block's KV cache (Attention.prefill); an MoE
    feed-forward runs its inference path (`MoEFeedForward.infer`: dropless, no aux)."""
    attended, cache = self.attention.prefill(self.attention_norm(x), positions, lengths, cache)
    x = x + attended
    return x + self._ffn_infer(self.ffn_norm(x)), cache

  def decode_step(self, x_t: jax.Array, positions: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token per row: x_t [B, 1, D] at positions [B] -> (x_t, cache)."""
    attended, cache = self.attention.decode_step(self.attention_norm(x_t), positions, cache)
    x_t = x_t + attended
    return x_t + self._ffn_infer(self.ffn_norm(x_t)), cache

  def _ffn_infer(self, x: jax.Array) -> jax.Array:
    return self.ffn.infer(x) if self.ffn_kind == "moe" else self.ffn(x)


class DecoderLM(nnx.Module):
  """tokens [B, T] -> (logits [B, T, V] f32, aux).

  `aux["aux_loss"]` is the sum of the layers' auxiliary losses (already weighted; add it to the LM loss);
  every other entry is a per-layer metric named `layer{i}/{ffn_kind}/{name}` (MoE) or `layer{i}/attention/{name}`
  (content-routed attention).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embedding = Embedding(config.vocab_size, config.d_model, init_std=config.init_std, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, layer, rngs=rngs) for layer in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=param_dtype, rngs=rngs)
    if not config.tie_embeddings:
      head = nnx.initializers.normal(config.init_std)(rngs.params(), (config.d_model, config.vocab_size),
                                                      param_dtype)
      self.lm_head = nnx.Param(head, logical_axes=("embed", "vocab"))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, return_hidden: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """return_hidden=True adds a third output: the residual stream after each block, [B, T, D] per layer."""
    config = self.config
    if positions is None:
      positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = self.embedding(tokens)
    aux_loss = jnp.zeros((), jnp.float32)
    metrics, hidden = {}, []
    for layer, block in enumerate(self.blocks):
      call = nnx.remat(type(block).__call__) if config.remat else type(block).__call__
      x, block_aux = call(block, x, positions)
      hidden.append(x)
      for name, value in block_aux.items():
        if name == "aux_loss":
          aux_loss = aux_loss + value
        else:
          metrics[f"layer{layer}/{name}"] = value
    logits = self._logits(x)
    if return_hidden:
      return logits, {"aux_loss": aux_loss, **metrics}, hidden
    return logits, {"aux_loss": aux_loss, **metrics}

  # ----------------------------------------------------------------------------------------------- decode
  # The entry points with checks, jit and caching are models/decode.py; these are the traced bodies.
  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """tokens int32 [B, T] right-padded (row b real below lengths[b]) -> (logits f32 [B, V] at lengths - 1, cache
    holding positions 0..lengths[b]-1 with cache["lengths"] = lengths)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = self.embedding(tokens)
    cache = dict(cache)
    for layer, block in enumerate(self.blocks):
      x, cache[f"layer{layer}"] = block.prefill(x, positions, lengths, cache[f"layer{layer}"])
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)  # [B, 1, D]
    cache["lengths"] = lengths.astype(jnp.int32)
    return self._logits(last)[:, 0], cache

  def decode_step(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """tokens int32 [B], row b at position cache["lengths"][b] -> (logits f32 [B, V], cache one longer)."""
    positions = cache["lengths"]
    x = self.embedding(tokens[:, None])
    cache = dict(cache)
    for layer, block in enumerate(self.blocks):
      x, cache[f"layer{layer}"] = block.decode_step(x, positions, cache[f"layer{layer}"])
    cache["lengths"] = positions + 1
    return self._logits(x)[:, 0], cache

  def _logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output projection: [B, T, D] -> f32 [B, T, V]."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      return self.embedding.attend(x)  # f32 already
    return jnp.einsum("BTD,DV->BTV", x, weights.for_matmul(self.lm_head, x.dtype),
                      preferred_element_type=jnp.float32)
