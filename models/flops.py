"""Model FLOPs per token (the MFU numerator), counting only the work a layer really does."""

import numpy as np

from sparseformer.layers.attention import kinds
from sparseformer.layers.attention.routed import ROUTED_KINDS
from sparseformer.models.config import ModelConfig


def attention_density(config: ModelConfig, layer: int, seq_len: int) -> float:
  """Fraction of the T x T score matrix a layer computes (causal dense: (T + 1) / 2T)."""
  kind = config.attention_kind(layer)
  if kind == "global":
    return (seq_len + 1) / (2 * seq_len)
  if kind in ROUTED_KINDS:
    return routed_density(config, kind, seq_len)
  # The layer's own layout, as the decoder builds it (bigbird draws its random blocks per layer).
  layout = kinds.build_layout(kind, config.attention, seq_len=seq_len, num_heads=config.num_heads,
                              layer=layer if config.bigbird_seed_per_layer else 0)
  return allowed_pair_fraction(layout)


def routed_density(config: ModelConfig, kind: str, seq_len: int) -> float:
  """Expected fraction of the T x T scores a content-routed layer computes, from its fields (selections are
  data-dependent, their sizes are not): the keys each query t attends, summed over t, over T^2.

  moba       own block up to t + min(topk - 1, past blocks) whole blocks (exact: every slot is filled).
  nsa        its branches (nsa.branches) add: visible compressed keys floor((t + 1 - l) / d) + 1; selected keys
             (all t + 1 while at most n blocks are visible, else n - 1 whole blocks + the own block up to t);
             window min(w, t + 1).
  dsa        min(topk, t + 1) keys (all t + 1 in the warm-up stage) ...
  dsa_block  ... or, per token, its own block up to t + min(topk // block - 1, past blocks) whole blocks;
             both plus the indexer's scores of all t + 1 keys at H_I * d_I / (2 * H * head_dim) of an
             attention pair's cost (one product per pair, not two).
  """
  t = np.arange(seq_len, dtype=np.float64)
  sparse = config.attention

  def own_and_past_blocks(block: int, slots: int) -> np.ndarray:
    own = t // block
    return (t - own * block + 1) + np.minimum(slots - 1, own) * block

  if kind == "moba":
    keys = own_and_past_blocks(sparse.moba.block_size, sparse.moba.topk)
  elif kind == "nsa":
    nsa = sparse.nsa
    keys = np.zeros_like(t)
    if "compressed" in nsa.branches:
      keys += np.maximum(np.floor((t + 1 - nsa.compress_block) / nsa.compress_stride) + 1, 0)
    if "selected" in nsa.branches:
      visible_blocks = t // nsa.select_block + 1
      keys += np.where(visible_blocks <= nsa.num_selected, t + 1,
                       (nsa.num_selected - 1) * nsa.select_block + t % nsa.select_block + 1)
    if "window" in nsa.branches:
      keys += np.minimum(nsa.window, t + 1)
  else:
    dsa = sparse.dsa
    if dsa.stage == "warmup":
      keys = t + 1
    elif kind == "dsa":
      keys = np.minimum(dsa.topk, t + 1)
    else:
      keys = own_and_past_blocks(dsa.block_size, dsa.topk // dsa.block_size)
    keys = keys + (t + 1) * dsa.index_heads * dsa.index_head_dim / (2 * config.num_heads * config.resolved_head_dim)
  return float(keys.sum()) / seq_len**2


def allowed_pair_fraction(layout) -> float:
  """Allowed (query, key) token pairs / (Hl x seq_q x seq_kv): `to_token_mask().mean()` in O(blocks), not O(T^2).

  Only real tokens count: the padded query rows of the last query block (which copy the last real
  row) and the padded key columns of the last key block are left out.
  """
  valid = np.arange(layout.max_kv) < layout.kv_count[..., None]
  _, q_block, _ = np.nonzero(valid)
  kv_block, mask_ids = layout.kv_index[valid], layout.kv_mask_id[valid]
  real_rows = np.minimum(layout.block_q, layout.seq_q - q_block * layout.block_q)
  real_cols = np.minimum(layout.block_kv, layout.seq_kv - kv_block * layout.block_kv)
  # Summed-area table per partial tile: [p, r, c] = allowed pairs among its first r rows and c columns.
  corner_sums = np.zeros((len(layout.partial_masks), layout.block_q + 1, layout.block_kv + 1), np.int64)
  corner_sums[:, 1:, 1:] = layout.partial_masks.cumsum(axis=1).cumsum(axis=2)
  partial_pairs = corner_sums[np.maximum(mask_ids, 0), real_rows, real_cols]
  allowed = np.where(mask_ids < 0, real_rows.astype(np.int64) * real_cols, partial_pairs).sum()
  return float(allowed) / (layout.num_heads * layout.seq_q * layout.seq_kv)


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
