"""Model FLOPs per token (the MFU numerator), counting only the work a layer really does."""

from sparseformer.models.config import ModelConfig


def attention_density(config: ModelConfig, layer: int, seq_len: int) -> float:
  """Fraction of the T x T score matrix a layer computes (causal dense: (T + 1) / 2T)."""
  kind = config.attention_kind(layer)
  if kind == "global":
    return (seq_len + 1) / (2 * seq_len)
  from sparseformer.layers import attention_patterns  # pylint: disable=import-outside-toplevel

  layout = attention_patterns.build_layout(kind, config.attention, seq_len=seq_len, num_heads=config.num_heads)
  return float(layout.density())


def matmul_params_per_token(config: ModelConfig) -> int:
  """Weights each token is multiplied by in a forward pass (active experts only, output head included)."""
  d, head_dim = config.d_model, config.resolved_head_dim
  attention = d * head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
  total = config.vocab_size * d  # output projection (the input embedding is a lookup, not a matmul)
  for layer in range(config.num_layers):
    total += attention
    if config.ffn_kind(layer) == "moe":
      moe = config.moe
      total += d * moe.num_experts  # router
      total += 3 * d * moe.expert_hidden * (moe.top_k + getattr(moe, "num_shared_experts", 0))
    else:
      total += 3 * d * config.resolved_mlp_hidden
  return total


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 3 x (2 x matmul weights + 4 x H x head_dim x visible keys)."""
  attention = sum(4 * config.num_heads * config.resolved_head_dim * seq_len * attention_density(config, layer, seq_len)
                  for layer in range(config.num_layers))
  return 3.0 * (2.0 * matmul_params_per_token(config) + attention)
