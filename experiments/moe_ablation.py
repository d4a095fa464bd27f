"""MoE ablation: a dense 4-layer byte-level LM against MoE versions with the same active FLOPs per token.

    sparseformer train --experiment moe_ablation --variant switch
    sparseformer experiments      # lists the variants: dense, switch, mixtral, deepseek, olmoe

How to read it: compare `eval/bits_per_byte` at equal steps, and per MoE layer `train/layer{i}/moe/
dropped_fraction`, `max_violation` and `expert_load` in metrics.jsonl / TensorBoard. What to expect (from the
literature, not yet measured at this scale here): Switch-style MoE reaches the dense model's loss in fewer
steps (even 2 experts beat dense at equal FLOPs), with the load-balance loss (alpha = 0.01) keeping dropped
tokens under ~1 % at capacity factor 1.25; `deepseek` (bias balancing, no aux loss) should show the lowest
MaxVio. Each run takes ~10 minutes on 2 CPU cores.
"""

import dataclasses

from sparseformer.models import presets
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig

# Routed experts have the dense FFN's hidden size (512: `config` sets it, quickstart's default is 384) divided by
# top_k, so active FFN FLOPs per token match `dense`; `deepseek` adds a shared expert on top (640 active hidden
# units, +25 %).
VARIANTS = {
    "dense": ["model.ffn_pattern=('dense',)"],
    "switch": ["model.ffn_pattern=('dense','moe')", "model.moe.num_experts=8", "model.moe.top_k=1",
               "model.moe.expert_hidden=512", "model.moe.dispatch='capacity_scatter'",
               "model.moe.capacity_factor=1.25", "model.moe.gate_norm='none'"],
    "mixtral": ["model.ffn_pattern=('dense','moe')", "model.moe.num_experts=8", "model.moe.top_k=2",
                "model.moe.expert_hidden=256", "model.moe.gate_norm='softmax_topk'"],
    "deepseek": ["model.ffn_pattern=('dense','moe')", "model.moe.num_experts=16", "model.moe.top_k=2",
                 "model.moe.expert_hidden=256", "model.moe.granularity=2", "model.moe.num_shared_experts=1",
                 "model.moe.score_function='sigmoid'", "model.moe.selection_bias=True",
                 "model.moe.aux_loss_alpha=0.0", "model.moe.n_groups=4", "model.moe.topk_groups=2"],
    "olmoe": ["model.ffn_pattern=('dense','moe')", "model.moe.num_experts=32", "model.moe.top_k=8",
              "model.moe.expert_hidden=64", "model.moe.gate_norm='none'", "model.moe.z_loss_coef=0.001"],
}


def config() -> RunConfig:
  return RunConfig(name="moe_ablation", model=dataclasses.replace(presets.quickstart(), mlp_hidden=512),
                   data=DataConfig(seq_len=256, batch_size=16, num_val_batches=8),
                   train=TrainConfig(steps=1000, learning_rate=3e-3, warmup_steps=100, log_every=20, eval_every=250,
                                     checkpoint_every=250, sample_tokens=200))
