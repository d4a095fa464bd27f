"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask."""

import jax
import optax
from flax import nnx

from sparseformer.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  decay_steps = max(config.steps - config.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.warmup_steps + decay_steps, end_value=config.learning_rate * config.min_lr_ratio)


def weight_decay_mask(params: nnx.State, config: TrainConfig) -> nnx.State:
  """True for the parameters that get weight decay: matrices, and embeddings only if asked."""

  def decays(path, variable) -> bool:
    names = [str(getattr(key, "key", key)) for key in path]
    if variable.ndim < 2:  # norm scales, biases
      return False
    if "embedding" in names:
      return config.decay_embeddings
    return True

  return jax.tree.map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build_optimizer(config: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
  mask = weight_decay_mask(params, config)
  chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2, eps=config.adam_eps,
                           weight_decay=config.weight_decay, mask=mask))
  return optax.chain(*chain)
