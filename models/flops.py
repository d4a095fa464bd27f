"""Model FLOPs per token (the MFU numerator), counting only the work a layer really does."""

import numpy as np

from sparseformer.layers.attention import kinds
from sparseformer.models.config import ModelConfig


def attention_density(config: ModelConfig, layer: int, seq_len: int) -> float:
  """Fraction of the T x T score matrix a layer computes (causal dense: (T + 1) / 2T)."""
  kind = config.attention_kind(layer)
  if kind == "global":
    return (seq_len + 1) / (2 * seq_len)
  layout = kinds.build_layout(kind, config.attention, seq_len=seq_len, num_heads=config.num_heads)
  return allowed_pair_fraction(layout)


def allowed_pair_fraction(layout) -> float:
  """Allowed (query, key) token pairs / (seq_q x seq_kv), from the block lists in O(blocks), not O(T^2)."""
  valid = np.arange(layout.kv_index.shape[-1]) < layout.kv_count[..., None]
  mask_ids = layout.kv_mask_id[valid]
  pairs_per_mask = layout.partial_masks.reshape(layout.partial_masks.shape[0], -1).sum(axis=1)
  full_pairs = layout.block_q * layout.block_kv
  allowed = np.where(mask_ids < 0, full_pairs, pairs_per_mask[np.maximum(mask_ids, 0)]).sum()
  return float(allowed) / (layout.kv_count.shape[0] * layout.seq_q * layout.seq_kv)


def matmul_params_per_token(config: ModelConfig) -> int:
  """Weights each token is multiplied by in a forward pass (active experts only, output head included)."""
  d, head_dim = config.d_model, config.resolved_head_dim
  attention = d * head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
  total = config.vocab_size * d  # output projection (the input embedding is a lookup, not a matmul)
  for layer in range(config.num_layers):
    total += attention
    if config.ffn_kind(layer) == "moe":
      moe = config.moe
      total += d * moe.routed_experts  # router
      total += 3 * d * (moe.routed_hidden * moe.routed_top_k + moe.shared_hidden)
    else:
      total += 3 * d * config.resolved_mlp_hidden
  return total


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 3 x (2 x matmul weights + 4 x H x head_dim x visible keys)."""
  attention = sum(4 * config.num_heads * config.resolved_head_dim * seq_len * attention_density(config, layer, seq_len)
                  for layer in range(config.num_layers))
  return 3.0 * (2.0 * matmul_params_per_token(config) + attention)
