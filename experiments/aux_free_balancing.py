"""Auxiliary-loss-free load balancing (Wang et al. 2024, DeepSeek): no balancing, the Switch aux loss, bias balancing.

    sparseformer train --experiment aux_free_balancing --variant bias   # one run of the study
    sparseformer sweep run --experiment aux_free_balancing --out sweeps/aux_free_balancing --parallel 2
    sparseformer sweep report sweeps/aux_free_balancing

Published (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
arXiv:2408.15664, Table 2): with sigmoid gating, bias balancing (b_i += u * sign(mean load - load_i) after
each step, u = 1e-3, the bias used for selection only) against an auxiliary loss: 1B model / 100B tokens,
perplexity 9.56 -> 9.50 and MaxVio_global 0.72 -> 0.04; 3B / 200B tokens, 7.97 -> 7.92 and 0.52 -> 0.04.
(The paper's loss-controlled baseline uses alpha = 0.001 in its main table; the issue asks for the Switch
alpha = 0.01, which balances harder and costs more perplexity.) MaxVio = max_i load_i / mean load - 1.

Here: the quickstart model (4 layers x 128, two 64-wide heads) on the stdlib corpus (bytes), sequence 256,
batch 16; layers 1 and 3 are MoE (`ffn_pattern=('dense','moe')`) with 16 routed experts of hidden 256, top-2,
sigmoid scores with the gates renormalised over the picked two (the paper's gating), dropless dispatch (no
token is dropped, so MaxVio measures routing imbalance alone). Variants:
  none      aux_loss_alpha = 0, no bias
  aux_loss  Switch load-balance loss, alpha = 0.01
  bias      aux_loss_alpha = 0, selection_bias = True, bias_update_rate u = 1e-3
Scaled down: 1B parameters / 100B tokens become ~1 M / 3.3 M tokens (750 steps of 4,096); one learning rate
(3e-3, the quickstart's), 2 seeds.

Metrics: eval/loss and eval/bits_per_byte, and per MoE layer `train/layer1/moe/max_violation` and
`train/layer3/moe/max_violation` (MaxVio over each training batch, i.e. the paper's MaxVio_batch, logged every
log_every steps), tabulated over training (mean, last 10 %, final, max) and plotted by `sweep report` through the
SWEEP's `report` dict (the paper's global MaxVio over the validation set is not logged).

Size: 3 variants x 1 learning rate x 2 seeds = 6 runs of 750 steps, 25.6 min measured at --parallel 2 on a 2-core
CPU (499-512 s per run).
Measured (2026-12-02, docs/results/aux_free_balancing.md): final MaxVio_batch bias 0.21 / 0.24 (layers 1 / 3),
aux_loss 0.66 / 0.31, none 5.2 / 6.6; eval loss none 1.220 +- 0.021, aux_loss 1.244 +- 0.036, bias 1.252 +- 0.041
(2 seeds: the balancers' losses are not separated; no balancing was best at this size).
GPU (15 minutes): add `--set model.d_model=512 --set model.num_heads=8 --set model.num_kv_heads=8
--set model.moe.expert_hidden=1024 --set data.batch_size=32 --set data.seq_len=512 --set model.max_seq_len=512
--set train.steps=3000`.

Expect (Wang et al.): MaxVio of `bias` falling to well below `aux_loss` within the first few hundred steps
(paper: 0.04 against 0.5-0.7 at scale; in 750 CPU steps the bias, moving 1e-3 per step, travels at most
0.75, so expect a smaller gap), `none` the most imbalanced; final eval loss of `bias` equal to or below
`aux_loss`.
"""

import dataclasses

from sparseformer.models import presets
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig

_MOE = ["model.ffn_pattern=('dense','moe')", "model.moe.num_experts=16", "model.moe.top_k=2",
        "model.moe.expert_hidden=256", "model.moe.score_function='sigmoid'", "model.moe.gate_norm='topk'",
        "model.moe.dispatch='dropless_gather'"]

VARIANTS = {
    "none": _MOE + ["model.moe.aux_loss_alpha=0.0", "model.moe.selection_bias=False"],
    "aux_loss": _MOE + ["model.moe.aux_loss_alpha=0.01", "model.moe.selection_bias=False"],
    "bias": _MOE + ["model.moe.aux_loss_alpha=0.0", "model.moe.selection_bias=True",
                    "model.moe.bias_update_rate=0.001"],
}

SWEEP = dict(
    variants=VARIANTS,
    learning_rates=[3e-3],
    seeds=[0, 1],
    select="eval/loss",
    compare_at="steps",
    report=dict(train_metrics=["train/layer*/moe/max_violation"]),  # MaxVio_batch over training
)


def config() -> RunConfig:
  model = dataclasses.replace(presets.quickstart(), mlp_hidden=512)
  return RunConfig(name="aux_free_balancing", model=model,
                   data=DataConfig(seq_len=256, batch_size=16, num_val_batches=8),
                   train=TrainConfig(steps=750, learning_rate=3e-3, warmup_steps=75, log_every=10, eval_every=125,
                                     checkpoint_every=375, sample_tokens=0, progress_bar=False))
