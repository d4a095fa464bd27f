"""Mixture-of-Experts feed-forward: the nnx layer, its config and recipes, dispatch, grouped matmul, parallelism.

    from sparseformer.layers.moe import MoEFeedForward, mixtral
    ffn = MoEFeedForward(d_model, mixtral(num_experts=8), rngs=rngs)

Rooms: config.py (MoEConfig + Switch / Mixtral / DeepSeek-V3 / OLMoE recipes), layer.py (the nnx layer and
the bias update after each optimizer step), dispatch.py (capacity and dropless dispatch), grouped.py (grouped
SwiGLU over expert-sorted rows), parallel.py (expert parallelism by all-to-all). Top-k selection itself is
shared with attention and lives in layers/routing.py.
"""

from sparseformer.layers.moe.config import PRESETS, MoEConfig, deepseek_v3, mixtral, olmoe, switch
from sparseformer.layers.moe.layer import MoEFeedForward, after_optimizer_step

__all__ = ["PRESETS", "MoEConfig", "MoEFeedForward", "after_optimizer_step", "deepseek_v3", "mixtral", "olmoe",
           "switch"]
