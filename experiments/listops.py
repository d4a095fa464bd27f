"""ListOps (Long Range Arena): dense, local, BigBird and Longformer attention, scaled from 2K to 512 tokens on CPU.

    sparseformer train --experiment listops --variant global   # one run of the study
    sparseformer sweep run --experiment listops --out sweeps/listops --parallel 2
    sparseformer sweep report sweeps/listops

Published: the LRA table (Tay et al. 2021, "Long Range Arena", arXiv:2011.04006, Table 1; ListOps at up to
2K tokens, 10-way accuracy %): Transformer 36.37, BigBird 36.05, Longformer 35.63, Local Attention 15.82.
FlashAttention (Dao et al. 2022, arXiv:2205.14135, Table 3) re-tuned the baselines: Transformer 36.0, local
attention 36.1, so the LRA gap of local attention came from tuning / a data bug (brackets stripped, fixed in
LRA commit c209b2a), not from the pattern. LRA's config: 4 layers, emb 512, 8 heads, MLP 1024, batch 32,
5,000 steps, lr 0.05, bidirectional encoder with pooled classification.

Here: a causal decoder reads the prefix expression and predicts its value at the final "]" (the only labelled
position, train/tasks/listops.py), so every kind must carry the tree's value forward to the last token; 4 layers
x 128, two 64-wide heads, vocabulary 16. Scaled: sequences of 128-512 tokens (LRA: 500-2000, a quarter),
depth <= 10 and <= 10 arguments as LRA; batch 16; 700 steps (11 K examples against LRA's 160 K); one learning
rate (1e-3), one seed. Kinds at T = 512, blocks of 32: local window 128 (4 layers reach 512 tokens back, so
the whole expression is within its receptive field: a weaker test than LRA's), bigbird window 96 + 32 global + 2
random blocks, longformer window 128 + 32 global. In a causal layer the leading global tokens see only what is
before them, so they help less than in LRA's encoder.
On a GPU (15 minutes), the LRA length:
    sparseformer sweep run --experiment listops --out sweeps/listops_2k --parallel 1 \
      --set data.seq_len=2000 --set model.max_seq_len=2000 --set data.listops.min_length=500 \
      --set data.listops.max_length=2000 --set model.attention.window=512 --set model.d_model=512 \
      --set model.num_heads=8 --set model.num_kv_heads=8 --set model.mlp_hidden=1024 --set data.batch_size=32 \
      --set train.steps=5000

Metric: eval/token_accuracy (= accuracy: one label per example); chance is 10 %, and always answering the
most frequent value scores ~17-20 % (LRA's failing models sit at 15-18 %).
Size (4 variants x 1 x 1 = 4 runs of 700 steps). NOT probed (cut for time): estimated from the quickstart's quiet
0.6 s per 16 x 256 step, doubled for 16 x 512 tokens, ~1.3 s quiet per step; 4 runs x 700 steps x 1.3 s + 4 x
~30 s start-up / 2 at once ~= 62 min quiet at --parallel 2. Probe a variant (docs/results/README.md) before the
run and adjust train.steps.

Expect (LRA / FlashAttention): dense, bigbird and longformer together; local either far below (LRA) or with
them (FlashAttention re-tune). At 700 CPU steps every kind may still sit near the majority-class ~17-20 %:
that is a "not learned yet", not an ordering; report which of the two published orderings we see, if either.
"""

import dataclasses

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models import presets
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.tasks.config import ListOpsConfig

SEQ_LEN = 512

VARIANTS = {
    "global": ["model.attention_pattern=('global',)"],
    "local": ["model.attention_pattern=('local',)"],
    "bigbird": ["model.attention_pattern=('bigbird',)", "model.attention.window=96"],
    "longformer": ["model.attention_pattern=('longformer',)"],
}

SWEEP = dict(
    variants=VARIANTS,
    learning_rates=[1e-3],
    seeds=[0],
    select="eval/token_accuracy",
    select_mode="max",
    compare_at="steps",
)

STEP_SECONDS_QUIET = {}  # not probed yet (see Size above)


def config() -> RunConfig:
  attention = SparseAttentionConfig(block_size=32, window=128, num_global=32, num_random_blocks=2)
  model = dataclasses.replace(presets.quickstart(), vocab_size=16, max_seq_len=SEQ_LEN, attention=attention)
  data = DataConfig(source="task", task="listops", seq_len=SEQ_LEN, batch_size=16, num_val_batches=8,
                    listops=ListOpsConfig(min_length=128, max_length=SEQ_LEN))
  return RunConfig(name="listops", model=model, data=data,
                   train=TrainConfig(steps=700, learning_rate=1e-3, warmup_steps=70, weight_decay=0.1, log_every=25,
                                     eval_every=100, checkpoint_every=350, sample_tokens=0, progress_bar=False))
