"""Sparse-attention ablation: the same 4-layer byte-level LM at sequence 512 with each attention kind.

    sparseformer train --experiment sparse_attention_ablation --variant local
    sparseformer experiments      # lists the variants: global, local, local_global, strided, fixed,
                                  # bigbird, longformer, chunked, sinks

How to read it: compare `eval/bits_per_byte` in each run's metrics.jsonl at equal steps. What to expect (from
the literature, not yet measured at this scale here): windows of 128 tokens cost little on code (most
byte-level context is local), so `local`, `longformer`, `bigbird` and `sinks` should land within a few
hundredths of a bit per byte of `global` while their attention FLOPs (logged `train/mfu` counts only visited
keys) fall to ~30-40 % at T = 512; `chunked` pays at chunk borders; `strided` alone is the weakest.
Each run takes ~10 minutes on 2 CPU cores.
"""

import dataclasses

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models import presets
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig

VARIANTS = {
    "global": ["model.attention_pattern=('global',)"],
    "local": ["model.attention_pattern=('local',)"],
    "local_global": ["model.attention_pattern=('local','local','local','global')"],
    "strided": ["model.attention_pattern=('strided',)"],
    "fixed": ["model.attention_pattern=('fixed',)"],
    "bigbird": ["model.attention_pattern=('bigbird',)"],
    "longformer": ["model.attention_pattern=('longformer',)"],
    "chunked": ["model.attention_pattern=('chunked',)"],
    "sinks": ["model.attention_pattern=('sinks',)"],
}


def config() -> RunConfig:
  attention = SparseAttentionConfig(block_size=32, window=128, stride=64, summary_tokens=8, num_global=32,
                                    num_random_blocks=1, chunk_size=128, num_sinks=4)
  model = dataclasses.replace(presets.quickstart(), max_seq_len=512, attention=attention)
  return RunConfig(name="sparse_attention_ablation", model=model,
                   data=DataConfig(seq_len=512, batch_size=8, num_val_batches=8),
                   train=TrainConfig(steps=1000, learning_rate=3e-3, warmup_steps=100, log_every=20, eval_every=250,
                                     checkpoint_every=250, sample_tokens=200))
