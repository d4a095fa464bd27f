"""MQAR (multi-query associative recall): Zoology's Figure 2 setting, scaled for CPU, over attention kinds.

    sparseformer train --experiment mqar --variant global          # one run: d_model 64, (seq_len 64, 4 pairs)
    sparseformer sweep run --experiment mqar --out sweeps/mqar --parallel 2   # the full SWEEP (GPU): see below
    sparseformer sweep report sweeps/mqar

The CPU study (docs/results/mqar.md): one grid point, d_model 64 at (64, 4), 10 kinds x 1 learning rate x 1 seed,
4,000 steps, every kind on the reference backend (dense masked math over each kind's own selection; the xla paths
are tested equal to it, and at T = 64 it is the faster one: moba 0.16 / 0.26 s a step, nsa 0.24 / 0.58 on one core):
    sparseformer sweep run --experiment mqar --out sweeps/mqar_cpu --parallel 2 --set model.d_model=64 \
      --set data.seq_len=64 --set train.steps=4000 --set model.attention.backend=reference --seeds 0 \
      --learning-rates 2.2e-3
    sparseformer sweep report sweeps/mqar_cpu
Quiet 2-core Intel Xeon, one core a run: 11-13 min a run, nsa 20, nsa_b16 18, dsa 39, dsa_b16 19; 63 min for the
first seven kinds + 31 for the b16 slice (the 2026-12-03 run packed them as one-core sweeps, two at a time;
docs/results/mqar/combine_parts.py): over the 60-minute budget with all ten kinds.
The full SWEEP is Zoology's grid, 10 kinds x 3 widths x 3 lengths x 4 LRs x 3 seeds = 1,080 runs: a GPU job
(add --set train.steps=... to fit the time there).

Zoology (Arora et al. 2023, arXiv:2312.04927, Figure 2) trains 2-layer models of width 64..512 on MQAR at
(seq_len, kv pairs) = (64, 4), (128, 8), (256, 16) (and 512, 64), vocabulary 8192, best of 4 learning rates
(np.logspace(-4, -2, 4)); dense attention solves every setting at every width (>= 99 % accuracy) while
gated-convolution and other fixed-state models fall off as the sequence and the number of pairs grow.
Sliding windows fail where a query's pair lies beyond their reach.

Here: 2 layers, one head, d_model 64 / 128 / 256; vocabulary 1024 instead of 8192 (the embedding and output
matmul over 8192 ids would dominate a CPU step ~8x; 511 possible keys still dwarf 16 pairs, so memorising
keys cannot replace recall); 4,000 steps of 64 examples at learning rates np.logspace(-4, -2, 4), 3 seeds.
Attention kinds (block size 16), keys visited per query in brackets, budget-matched in pairs:
  global     dense causal [up to T]
  local_w16  sliding window of 16 [16]: shorter than most recall distances (the pairs fill the first 2N
             tokens, the queries follow at power-law gaps), so it should fail, worse as (T, N) grow
  local_w48  sliding window of 48 [48]: reaches most pairs at (64, 4), fewer at (256, 16)
  bigbird    window 16 + 16 global tokens + 1 random block of 16 [48, as local_w48]: the global tokens
             hold the first pairs, the window and random block the rest only by chance
  moba       MoBA, key blocks of 8, top-6 counting the own block [48 at the last position: own block up to t
             + 5 chosen whole blocks; block 8, not the layout's 16: with blocks of 16 a (64, 4) example has 4
             blocks and top-3 would leave at most one block unchosen, no real choice; with 8 it picks 5 of up
             to 7 past blocks at T = 64, 5 of 31 at T = 256]
  nsa        NSA, l = d = l' = 8 (compressed blocks of 8 at stride 8; selection blocks of 8), n = 4 selected
             counting the own block (init_blocks 0, local_blocks 1: 3 chosen freely), window 8 [T/8 compressed
             + 32 selected + 8 window = 48 at T = 64, 56 at 128, 72 at 256: the compressed branch grows with T
             by design (NSA eq. 7), so NSA's budget is matched at (64, 4) only]
  dsa        DSA, a 2 x 16 lightning indexer (RoPE on 8 of its dims) picking the top-48 keys per query (token
             level), sparse stage from step 0 with the indexer KL loss [48, plus the indexer's score of every
             past key at 2 x 16 / (2 x 1 x head_dim) of a pair's attention cost]
  moba_b16, nsa_b16, dsa_b16: the routed kinds at local_w16's budget [mean 11.5 / 15.7 / 14.1 keys at T = 64
             against local_w16's 14.1]: MoBA top-2 (own block + one chosen block of 8); NSA one freely chosen
             block of 8 (no forced blocks) + window 8 + the T/8 compressed keys; DSA top-16 tokens
The budgets are keys visited per query from each kind's fields (models/flops.py routed_density gives the mean
over positions; tests/experiments/test_studies.py holds moba and dsa at local_w48's mean within 10 %, dsa_b16
at local_w16's).
No MQAR results are published for MoBA, NSA or DSA: ours would be the first.
Expect (Zoology): global >= 99 % eval/example_accuracy at every size once trained long enough; local_w16 far
below at every size; local_w48 near global at (64, 4), falling with length; bigbird between the windows; the
routed kinds (no published anchor) can reach any pair if their router learns to find the key's block, so
they could match global where local_w48 falls off, or stay at the windows' level if routing is not learned.
Measured (docs/results/mqar.md, 2026-12-03, the CPU command above, eval token accuracy at step 4,000, 1 seed):
global 100.0 %, local_w48 99.8 %, moba 73.6 %, dsa 73.3 %, bigbird 72.4 %, local_w16 58.8 %, nsa 25.0 % (the 1 / N
plateau throughout); at local_w16's budget moba_b16 89.4 %, nsa_b16 80.0 %, dsa_b16 72.8 %. Global leaves the
plateau near step 800 (98 % at 1,000). Probes: with 2,000 steps (its cosine decay twice as fast) global was at 53 %
at step 2,000 (lr 2.2e-3) and 40 % (1e-2); seed 1 at 3,000 steps at 71 % by step 2,500: when the jump comes varies
a lot with seed and schedule.
Metrics: `eval/token_accuracy` (labelled positions) and `eval/example_accuracy` (every query of an example right);
add length-generalisation mixes with e.g. `--set "data.mqar.eval_mixes=('long:8:128',)" --set
model.max_seq_len=128`, reported as eval/long/*. The SWEEP selects learning rates by token accuracy over the queried
positions (the accuracy Zoology reports: example accuracy stays 0 on the plateau and cannot rank them).
Worked example, a 16-run slice at 300 steps: docs/results/mqar_worked_example.md.
"""

import dataclasses

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models.config import ModelConfig
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.tasks.config import MQARConfig

VOCAB_SIZE = 1024

VARIANTS = {
    "global": ["model.attention_pattern=('global',)"],
    "local_w16": ["model.attention_pattern=('local',)", "model.attention.window=16"],
    "local_w48": ["model.attention_pattern=('local',)", "model.attention.window=48"],
    "bigbird": ["model.attention_pattern=('bigbird',)", "model.attention.window=16", "model.attention.num_global=16",
                "model.attention.num_random_blocks=1"],
    "moba": ["model.attention_pattern=('moba',)", "model.attention.moba.block_size=8", "model.attention.moba.topk=6"],
    "nsa": ["model.attention_pattern=('nsa',)", "model.attention.nsa.compress_block=8",
            "model.attention.nsa.compress_stride=8", "model.attention.nsa.select_block=8",
            "model.attention.nsa.num_selected=4", "model.attention.nsa.init_blocks=0",
            "model.attention.nsa.local_blocks=1", "model.attention.nsa.window=8"],
    "dsa": ["model.attention_pattern=('dsa',)", "model.attention.dsa.index_heads=2",
            "model.attention.dsa.index_head_dim=16", "model.attention.dsa.rope_dim=8", "model.attention.dsa.topk=48",
            "model.attention.dsa.key_chunk=64", "model.attention.dsa.query_chunk=64"],
}
# The routed kinds again at local_w16's budget (~16 keys per query), where a window cannot reach most pairs.
VARIANTS.update({
    "moba_b16": ["model.attention_pattern=('moba',)", "model.attention.moba.block_size=8",
                 "model.attention.moba.topk=2"],
    "nsa_b16": ["model.attention_pattern=('nsa',)", "model.attention.nsa.compress_block=8",
                "model.attention.nsa.compress_stride=8", "model.attention.nsa.select_block=8",
                "model.attention.nsa.num_selected=1", "model.attention.nsa.init_blocks=0",
                "model.attention.nsa.local_blocks=0", "model.attention.nsa.window=8"],
    "dsa_b16": ["model.attention_pattern=('dsa',)", "model.attention.dsa.index_heads=2",
                "model.attention.dsa.index_head_dim=16", "model.attention.dsa.rope_dim=8",
                "model.attention.dsa.topk=16", "model.attention.dsa.key_chunk=64",
                "model.attention.dsa.query_chunk=64"],
})

SWEEP = dict(
    variants=VARIANTS,
    grid={"model.d_model": [64, 128, 256],
          ("data.seq_len", "data.mqar.num_kv_pairs", "model.max_seq_len"): [(64, 4, 64), (128, 8, 128),
                                                                             (256, 16, 256)]},
    learning_rates=[1e-4, 4.6e-4, 2.2e-3, 1e-2],  # np.logspace(-4, -2, 4), as Zoology
    seeds=[0, 1, 2],  # -> train.seed and data.seed
    select="eval/token_accuracy",  # Zoology reports accuracy over the queried positions
    select_mode="max",
    compare_at="steps",
)


def config() -> RunConfig:
  attention = SparseAttentionConfig(block_size=16, window=16, num_global=16, num_random_blocks=1)
  model = ModelConfig(vocab_size=VOCAB_SIZE, num_layers=2, d_model=64, num_heads=1, num_kv_heads=1, max_seq_len=64,
                      attention=attention)
  data = DataConfig(source="task", task="mqar", seq_len=64, batch_size=64, num_val_batches=4,
                    mqar=MQARConfig(num_kv_pairs=4, vocab_size=VOCAB_SIZE))
  train = TrainConfig(steps=4000, learning_rate=2.2e-3, warmup_steps=100, weight_decay=0.1, log_every=50,
                      eval_every=500, checkpoint_every=1000, sample_tokens=0)
  return dataclasses.replace(RunConfig(), name="mqar", model=model, data=data, train=train)
