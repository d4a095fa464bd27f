"""Tests of models/flops.py: the allowed-pair count behind the attention FLOPs (and so MFU)."""

import dataclasses

import numpy as np
import pytest

from sparseformer.layers.attention import builders, layouts
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models import flops
from sparseformer.models.config import ModelConfig

# (name, builder(seq, block_q, block_kv)): unaligned lengths leave padded rows and columns in the last blocks.
BUILDERS = {
    "causal": lambda seq, bq, bk: builders.dense(seq, block_q=bq, block_kv=bk),
    "bidirectional": lambda seq, bq, bk: builders.dense(seq, block_q=bq, block_kv=bk, causal=False),
    "window": lambda seq, bq, bk: builders.sliding_window(seq, block_q=bq, block_kv=bk, left=11, right=3),
    "bigbird": lambda seq, bq, bk: builders.bigbird(seq, block_q=bq, block_kv=bk, left=7, num_global=3,
                                                    num_random_blocks=2, seed=5, num_heads=3),
    "strided": lambda seq, bq, bk: builders.strided(seq, block_q=bq, block_kv=bk, stride=6),
    "fixed": lambda seq, bq, bk: builders.fixed(seq, block_q=bq, block_kv=bk, stride=8, summary=2),
}


def _token_fraction(layout) -> float:
  mask = layout.to_token_mask()  # [Hl, seq_q, seq_kv]
  assert mask.shape == (layout.num_heads, layout.seq_q, layout.seq_kv)
  return float(mask.mean())


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("seq,block_q,block_kv", [(37, 16, 16), (37, 8, 16), (45, 16, 4), (64, 16, 16), (1, 4, 4)])
def test_allowed_pair_fraction_equals_token_mask_mean(name, seq, block_q, block_kv):
  layout = BUILDERS[name](seq, block_q, block_kv)
  got = flops.allowed_pair_fraction(layout)
  want = _token_fraction(layout)
  assert np.isfinite(got) and not np.isnan(got)
  assert abs(got - want) < 1e-12, (layout, got, want)


def test_allowed_pair_fraction_rectangular_query_and_key_lengths():
  table = np.full((3, 2), layouts.FULL)  # 3 query blocks x 2 key blocks of a 21 x 13 cross-attention
  layout = layouts.from_block_table(table, np.ones((1, 8, 8), bool), seq_q=21, seq_kv=13, block_q=8, block_kv=8)
  assert flops.allowed_pair_fraction(layout) == 1.0
  upper = np.triu(np.ones((8, 8), bool))
  table = np.asarray([[0, layouts.EMPTY], [layouts.FULL, 0], [0, layouts.FULL]])
  layout = layouts.from_block_table(table, upper[None], seq_q=21, seq_kv=13, block_q=8, block_kv=8)
  assert abs(flops.allowed_pair_fraction(layout) - _token_fraction(layout)) < 1e-12


@pytest.mark.parametrize("seq,block,want", [(37, 16, 0.5135), (300, 128, 0.5017)])
def test_causal_fraction_at_unaligned_lengths_is_about_a_half(seq, block, want):
  """The reviewer's cases: 0.81 and 0.78 when the padded rows of the last block were counted."""
  got = flops.allowed_pair_fraction(builders.dense(seq, block_q=block))
  assert abs(got - (seq + 1) / (2 * seq)) < 1e-12 and abs(got - want) < 1e-4


def test_attention_density_of_sparse_kinds_at_unaligned_length():
  attention = SparseAttentionConfig(backend="xla", block_size=16, window=12, num_global=4, num_random_blocks=1,
                                    stride=8, summary_tokens=2)
  config = ModelConfig(num_layers=3, d_model=32, num_heads=2, num_kv_heads=2, max_seq_len=64,
                       attention_pattern=("local", "bigbird", "strided"), attention=attention)
  seq = 41
  for layer, build in enumerate([
      lambda: builders.sliding_window(seq, block_q=16, left=11),
      lambda: builders.bigbird(seq, block_q=16, left=11, num_global=4, num_random_blocks=1, seed=attention.seed + 1),
      lambda: builders.strided(seq, block_q=16, stride=8)]):
    assert abs(flops.attention_density(config, layer, seq) - _token_fraction(build())) < 1e-12
  dense = dataclasses.replace(config, attention_pattern=("global",))
  assert flops.attention_density(dense, 0, seq) == pytest.approx((seq + 1) / (2 * seq))


def test_attention_density_reads_each_layers_own_bigbird_blocks():
  """Bigbird layer i draws with seed + i. Bidirectional, so a random block may be the short last key block
  and the density depends on the draw (seeds 0 and 1 differ at 100 tokens)."""
  attention = SparseAttentionConfig(backend="xla", block_size=16, window=12, num_global=4, num_random_blocks=1,
                                    causal=False)
  config = ModelConfig(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, max_seq_len=128,
                       attention_pattern=("bigbird",), attention=attention, allow_bidirectional_attention=True)
  seq = 100
  want = [_token_fraction(builders.bigbird(seq, block_q=16, left=11, num_global=4, num_random_blocks=1,
                                           seed=attention.seed + layer, causal=False)) for layer in range(2)]
  assert want[0] != want[1]
  got = [flops.attention_density(config, layer, seq) for layer in range(2)]
  assert np.isfinite(got).all() and abs(got[0] - want[0]) < 1e-12 and abs(got[1] - want[1]) < 1e-12
  shared_seed = dataclasses.replace(config, bigbird_seed_per_layer=False)
  assert abs(flops.attention_density(shared_seed, 1, seq) - want[0]) < 1e-12
