"""Named model presets. `--set model.<field>=...` adjusts any of them; experiments pick one by name."""

import dataclasses
from typing import Callable

from sparseformer.layers.moe import config as moe_config
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.routed.config import DSAConfig, MoBAConfig, NSAConfig
from sparseformer.models.config import ModelConfig

_SMALL = dict(num_layers=4, d_model=512, num_heads=8, num_kv_heads=8, max_seq_len=512)


def tiny() -> ModelConfig:
  """2 x 64: unit tests and smoke runs."""
  return ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, max_seq_len=256)


def quickstart() -> ModelConfig:
  """4 x 128, two 64-wide heads: the CPU quickstart (narrow heads cost more time per FLOP on CPU)."""
  return ModelConfig(num_layers=4, d_model=128, num_heads=2, num_kv_heads=2, max_seq_len=256)


def small() -> ModelConfig:
  """4 x 512 dense, sequence 512: the CPU throughput reference (benchmarks/train_throughput.py)."""
  return ModelConfig(**_SMALL)


def base() -> ModelConfig:
  """12 x 768 dense with GQA, sequence 2048: GPU / TPU scale."""
  return ModelConfig(num_layers=12, d_model=768, num_heads=12, num_kv_heads=4, max_seq_len=2048, dtype="bfloat16")


def all_local() -> ModelConfig:
  """Every layer a 256-token sliding window (Mistral-style)."""
  return ModelConfig(**_SMALL | dict(max_seq_len=2048), attention_pattern=("local",),
                     attention=SparseAttentionConfig(window=256, block_size=64))


def local_global_5to1() -> ModelConfig:
  """Gemma-3 schedule: five sliding-window layers, then one global layer."""
  return ModelConfig(**_SMALL | dict(num_layers=6, max_seq_len=2048),
                     attention_pattern=("local",) * 5 + ("global",),
                     attention=SparseAttentionConfig(window=512, block_size=64))


def chunked_3to1() -> ModelConfig:
  """Llama-4 schedule: three chunked-causal layers, then one global layer."""
  return ModelConfig(**_SMALL | dict(max_seq_len=2048), attention_pattern=("chunked",) * 3 + ("global",),
                     attention=SparseAttentionConfig(chunk_size=512, block_size=64))


def bigbird() -> ModelConfig:
  """BigBird (Zaheer et al., 2020): window + global + random blocks in every layer."""
  return ModelConfig(**_SMALL | dict(max_seq_len=2048), attention_pattern=("bigbird",),
                     attention=SparseAttentionConfig(window=192, num_global=64, num_random_blocks=3, block_size=64))


def longformer() -> ModelConfig:
  """Longformer (Beltagy et al., 2020): sliding window + global tokens."""
  return ModelConfig(**_SMALL | dict(max_seq_len=2048), attention_pattern=("longformer",),
                     attention=SparseAttentionConfig(window=256, num_global=64, block_size=64))


def moba_small() -> ModelConfig:
  """MoBA (Lu et al., 2025) in every layer, at 2K the paper's 8K geometry: 16 blocks per sequence (128 tokens
  each), top-3 counting the own block (density about 0.3 of causal)."""
  return ModelConfig(**_SMALL | dict(max_seq_len=2048), attention_pattern=("moba",),
                     attention=SparseAttentionConfig(block_size=64, moba=MoBAConfig(block_size=128, topk=3)))


def nsa_small() -> ModelConfig:
  """NSA (Yuan et al., 2025) in every layer with GQA (4 query heads per selection group): the paper's
  l / d / l' / n / w = 32 / 16 / 64 / 16 / 512 (for 8K-64K) scaled down for 2K sequences to 16 / 8 / 32 / 8 / 128,
  one initial and two local blocks forced (the three branches together about 0.5 of causal)."""
  nsa = NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=8, window=128)
  return ModelConfig(**_SMALL | dict(max_seq_len=2048, num_kv_heads=2), attention_pattern=("nsa",),
                     attention=SparseAttentionConfig(block_size=32, nsa=nsa))


def dsa_small() -> ModelConfig:
  """DeepSeek Sparse Attention in every layer: a 4-head, 32-wide lightning indexer (the paper's 64 x 128 is sized
  for a 128-head model), top-256 keys of 2K (the paper's 2048 of 128K is sparser), sparse stage."""
  dsa = DSAConfig(index_heads=4, index_head_dim=32, topk=256, rope_dim=16, key_chunk=512)
  return ModelConfig(**_SMALL | dict(max_seq_len=2048), attention_pattern=("dsa",),
                     attention=SparseAttentionConfig(block_size=64, dsa=dsa))


def moe_mixtral_small() -> ModelConfig:
  """Top-2 of 8 dropless experts in every other layer (Mixtral routing), equal active FLOPs to `small`."""
  return ModelConfig(**_SMALL, ffn_pattern=("dense", "moe"),
                     moe=moe_config.mixtral(num_experts=8, expert_hidden=704))


def moe_switch_small() -> ModelConfig:
  """Switch Transformer: top-1 of 16 experts with capacity 1.25 in every layer."""
  return ModelConfig(**_SMALL, ffn_pattern=("moe",), moe=moe_config.switch(num_experts=16, expert_hidden=1408))


def moe_deepseek_small() -> ModelConfig:
  """DeepSeek-V3 recipe at small scale: first layer dense, then fine-grained sigmoid experts + 1 shared
  expert with auxiliary-loss-free bias balancing."""
  return ModelConfig(**_SMALL | dict(num_layers=4), ffn_pattern=("dense", "moe", "moe", "moe"),
                     moe=moe_config.deepseek_v3(num_experts=16, top_k=2, expert_hidden=512, n_groups=4,
                                                topk_groups=2))


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    fn.__name__: fn for fn in (tiny, quickstart, small, base, all_local, local_global_5to1, chunked_3to1, bigbird,
                               longformer, moba_small, nsa_small, dsa_small, moe_mixtral_small, moe_switch_small, moe_deepseek_small)
}


def get(name: str, **changes) -> ModelConfig:
  """Preset `name` with optional field changes, e.g. get("small", dtype="bfloat16")."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[name](), **changes)
