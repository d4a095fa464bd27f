"""Sparse attention on language modelling: every attention kind on the stdlib corpus, bits per byte vs FLOPs.

    sparseformer train --experiment sparse_lm --variant global   # one run of the study
    sparseformer sweep run --experiment sparse_lm --out sweeps/sparse_lm --parallel 2
    sparseformer sweep report sweeps/sparse_lm
    python -m sparseformer.experiments.sparse_lm sweeps/sparse_lm   # the frontier table: bpb vs attention FLOPs

Published anchors: Sparse Transformer (Child et al. 2019, arXiv:1904.10509, Table 2 / §7): the fixed pattern
0.99 bits per byte on enwik8 against 1.00 for dense attention at the same setting (12,288 context), strided
worse on text. MoBA (Lu et al. 2025, arXiv:2502.13189, Figure 3 / §3.1 scaling law, 545M-2.1B, 8K context,
block 512, top-3): LM loss 2.625 C^-0.063 against 2.622 C^-0.063 for full attention, within 1e-3.

Here: a 6-layer x 128 byte-level decoder (two 64-wide heads, SwiGLU 384) on the stdlib corpus at T = 1,024,
batch 4 (4,096 tokens a step, as the quickstart), 150 steps, one learning rate (3e-3), one seed; every kind in
every layer except local_global (five local layers, then one global: Gemma 3's 5:1). Kind settings at T = 1K
(block 64): window 256 (local, sinks, longformer), stride 64 + 16 summary tokens (strided, fixed: the Sparse
Transformer's l ~ sqrt(T) rounded to the block, c = 16), bigbird window 192 + 64 global + 1 random block,
longformer 64 global, chunked 256, sinks 4; moba blocks of 128, top-3 (the paper's 8K geometry at 1K: 8 blocks);
nsa l / d / l' / n / w = 16 / 8 / 32 / 8 / 128 (models/presets.nsa_small); dsa a 2 x 32 indexer (a quarter
of a 2 x 64 attention pair's cost per key), top-256 keys.
Scaled down: enwik8 at 12K context and 95M parameters becomes the stdlib corpus at 1K and ~1.2 M parameters,
150 steps (0.6 M tokens); at this length and size all kinds are far from converged, so the comparison is of
early learning speed per FLOP, not of final quality.
On a GPU (15 minutes), T = 2K and a larger model:
    sparseformer sweep run --experiment sparse_lm --out sweeps/sparse_lm_2k --parallel 1 \
      --set data.seq_len=2048 --set model.max_seq_len=2048 --set model.d_model=512 --set model.num_heads=8 \
      --set model.num_kv_heads=8 --set model.mlp_hidden=1536 --set data.batch_size=8 --set train.steps=2000 --set train.eval_every=250 \
      --set model.attention.window=512 --set model.attention.stride=128 --set model.attention.chunk_size=512 \
      --set model.attention.moba.block_size=256 --set model.attention.nsa.window=256

Metric: eval/bits_per_byte at equal steps. Attention FLOPs per token are a function of the config
(`attention_flops_per_token`, models/flops.py; routed kinds at their expected density); `sweep report` draws
no metric-vs-FLOPs plot (its plots are against grid fields and learning rate), so the frontier is the table
this module's `python -m` entry prints from DIR/results.csv.

Size (12 variants x 1 x 1 = 12 runs of 150 steps). Only `global` was probed (12 steps, docs/results/README.md;
2 x86-64 cores shared with 6 other helpers, load average 8-9, a second probe running): 7.25 s per step, ~1.96 s
quiet after the ~3.7x load factor of a quickstart probe. Estimate, assuming every kind steps as fast as global:
12 runs x 150 steps x 1.96 s + 12 x ~30 s start-up / 2 at once ~= 62 min quiet at --parallel 2. NOT measured for
the other kinds (the probes were cut short for time); the routed kinds may step slower than global on CPU at
T = 1K: probe them (`--variant moba|nsa|dsa`) before the run and lower train.steps if needed.

Measured (2026-12-02, docs/results/sparse_lm.md; seed 0 of all 12 kinds, seed 1 of 5): all kinds 3.09-3.37 bpb
at 150 steps with a seed spread of 0.01-0.08: too early to rank them (dense 3.241 +- 0.056); 600+ steps needed.
Expect: global lowest bits per byte at the highest attention FLOPs; local / sinks / longformer / bigbird /
local_global within a few hundredths of a bit (most byte-level context is local); fixed about equal to dense
(Sparse Transformer), strided behind it; chunked paying at chunk borders; moba within ~0.01 of dense (MoBA),
nsa and dsa near dense at a fraction of its attention FLOPs.
"""

import csv
import dataclasses
import sys

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.routed.config import DSAConfig, MoBAConfig, NSAConfig
from sparseformer.models import presets
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig

SEQ_LEN = 1024
NUM_LAYERS = 6

VARIANTS = {
    "global": ["model.attention_pattern=('global',)"],
    "local": ["model.attention_pattern=('local',)"],
    "local_global": ["model.attention_pattern=('local','local','local','local','local','global')"],
    "strided": ["model.attention_pattern=('strided',)"],
    "fixed": ["model.attention_pattern=('fixed',)"],
    "bigbird": ["model.attention_pattern=('bigbird',)", "model.attention.window=192"],
    "longformer": ["model.attention_pattern=('longformer',)"],
    "chunked": ["model.attention_pattern=('chunked',)"],
    "sinks": ["model.attention_pattern=('sinks',)"],
    "moba": ["model.attention_pattern=('moba',)"],
    "nsa": ["model.attention_pattern=('nsa',)"],
    "dsa": ["model.attention_pattern=('dsa',)"],
}

SWEEP = dict(
    variants=VARIANTS,
    learning_rates=[3e-3],
    seeds=[0, 1],
    select="eval/bits_per_byte",
    compare_at="steps",
    report=dict(frontier_x="sparseformer.experiments.sparse_lm:attention_flops_per_token"),
)

STEP_SECONDS_QUIET = {"global": 1.96}  # probe step time / 3.7; the other kinds not probed yet


def config() -> RunConfig:
  attention = SparseAttentionConfig(
      block_size=64, window=256, stride=64, summary_tokens=16, num_global=64, num_random_blocks=1, chunk_size=256,
      num_sinks=4, moba=MoBAConfig(block_size=128, topk=3),
      nsa=NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=8, window=128),
      dsa=DSAConfig(index_heads=2, index_head_dim=32, topk=256, rope_dim=16, key_chunk=512))
  model = dataclasses.replace(presets.quickstart(), num_layers=NUM_LAYERS, max_seq_len=SEQ_LEN, attention=attention)
  return RunConfig(name="sparse_lm", model=model, data=DataConfig(seq_len=SEQ_LEN, batch_size=4, num_val_batches=8),
                   train=TrainConfig(steps=150, learning_rate=3e-3, warmup_steps=15, log_every=10, eval_every=50,
                                     checkpoint_every=150, sample_tokens=0, progress_bar=False))


def attention_flops_per_token(variant: str, overrides: list[str] = ()) -> float:
  """Forward + backward attention FLOPs per token of `variant` (models/flops.py: 3 x 4 x H x head_dim x visited
  keys, summed over layers; content-routed kinds at their expected density, DSA's indexer included)."""
  from sparseformer import experiments  # pylint: disable=import-outside-toplevel
  from sparseformer.models import flops  # pylint: disable=import-outside-toplevel
  from sparseformer.train import overrides as overrides_lib  # pylint: disable=import-outside-toplevel
  run = overrides_lib.apply_overrides(experiments.get("sparse_lm", variant), list(overrides))
  model, seq_len = run.model, run.data.seq_len
  return 3.0 * sum(4 * model.num_heads * model.resolved_head_dim * seq_len *
                   flops.attention_density(model, layer, seq_len) for layer in range(model.num_layers))


def frontier(results_csv: str) -> list[tuple[str, float, float]]:
  """[(variant, attention FLOPs per token, mean final eval/bits_per_byte over its done runs)] from a sweep's
  results.csv, by FLOPs; the Pareto-optimal rows are those no cheaper row beats."""
  by_variant = {}
  with open(results_csv, encoding="utf-8") as file:
    for row in csv.DictReader(file):
      if row["status"] == "done" and row.get("final/eval/bits_per_byte"):
        by_variant.setdefault(row["variant"], []).append(float(row["final/eval/bits_per_byte"]))
  rows = [(variant, attention_flops_per_token(variant), sum(values) / len(values))
          for variant, values in by_variant.items()]
  return sorted(rows, key=lambda row: row[1])


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print("usage: python -m sparseformer.experiments.sparse_lm SWEEP_DIR", file=sys.stderr)
    return 2
  best = float("inf")
  print("| variant | attention MFLOPs / token | eval bits per byte | on the frontier |\n|---|---|---|---|")
  for variant, attention, bpb in frontier(f"{argv[0]}/results.csv"):
    print(f"| {variant} | {attention / 1e6:.3f} | {bpb:.4f} | {'yes' if bpb < best else ''} |")
    best = min(best, bpb)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
