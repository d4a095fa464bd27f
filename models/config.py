"""ModelConfig: the typed, frozen description of a decoder language model."""

import dataclasses

from sparseformer.layers.attention import kinds
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.moe.config import MoEConfig

DTYPES = ("float32", "bfloat16")
FFN_KINDS = ("dense", "moe")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A pre-norm decoder LM. Layer i uses attention_pattern[i % len] and ffn_pattern[i % len]."""

  vocab_size: int = 259  # byte tokenizer: 256 bytes + PAD, BOS, EOS
  num_layers: int = 4  # transformer blocks
  d_model: int = 256  # residual stream width
  num_heads: int = 4  # query heads
  num_kv_heads: int = 4  # key/value heads; < num_heads gives grouped-query attention
  head_dim: int = 0  # per-head width; 0 = d_model // num_heads
  mlp_hidden: int = 0  # SwiGLU hidden size; 0 = 8/3 * d_model rounded up to a multiple of 64
  max_seq_len: int = 256  # longest sequence the model is trained or sampled at
  tie_embeddings: bool = True  # reuse the input embedding as the output projection
  rope_theta: float = 10_000.0  # RoPE base
  norm_eps: float = 1e-6  # RMSNorm epsilon
  init_std: float = 0.02  # std of weight init; output projections use init_std / sqrt(2 * num_layers)
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"  # parameter (and optimizer state) dtype
  remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
  attention_pattern: tuple[str, ...] = ("global",)  # attention kind per layer, cycled
  ffn_pattern: tuple[str, ...] = ("dense",)  # "dense" or "moe" per layer, cycled
  attention: SparseAttentionConfig = SparseAttentionConfig()  # parameters of the sparse attention kinds
  moe: MoEConfig = MoEConfig()  # parameters of the MoE layers (used where ffn_pattern says "moe")
  allow_bidirectional_attention: bool = False  # allow attention.causal=False: sparse kinds then see future tokens
  bigbird_seed_per_layer: bool = True  # bigbird layer i draws its random blocks with attention.seed + i

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                       f"({self.num_kv_heads}); pick num_kv_heads among the divisors of num_heads.")
    if self.head_dim == 0 and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model ({self.d_model}) is not divisible by model.num_heads ({self.num_heads}); "
                       "change one of them or set model.head_dim explicitly.")
    if self.resolved_head_dim % 2:
      raise ValueError(f"RoPE needs an even head size, got {self.resolved_head_dim}; change model.head_dim.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name} must be one of {DTYPES}, got {getattr(self, name)!r}.")
    if not self.attention_pattern or not self.ffn_pattern:
      raise ValueError("model.attention_pattern and model.ffn_pattern need at least one entry, e.g. ('global',).")
    for kind in self.ffn_pattern:
      if kind not in FFN_KINDS:
        raise ValueError(f"model.ffn_pattern has unknown kind {kind!r}; choose from {FFN_KINDS}.")
    for kind in set(self.attention_pattern) - {"global"}:
      kinds.validate_kind(kind, self.attention)
    if not self.attention.causal and not self.allow_bidirectional_attention:
      raise ValueError("model.attention.causal=False makes the sparse attention kinds see future tokens (global "
                       "layers stay causal), so the LM would learn from the tokens it predicts; set "
                       "model.attention.causal=True, or model.allow_bidirectional_attention=True to study it anyway.")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def resolved_mlp_hidden(self) -> int:
    return self.mlp_hidden or -(-8 * self.d_model // 3 // 64) * 64

  def attention_kind(self, layer: int) -> str:
    return self.attention_pattern[layer % len(self.attention_pattern)]

  def ffn_kind(self, layer: int) -> str:
    return self.ffn_pattern[layer % len(self.ffn_pattern)]
