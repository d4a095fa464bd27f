"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask, and DSA's warm-up freeze."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer.train.config import TrainConfig

DSA_KINDS = ("dsa", "dsa_block")  # attention kinds with a lightning indexer (layers/attention/routed/dsa.py)
INDEXER = "indexer"  # the path component every indexer parameter sits under


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  decay_steps = max(config.steps - config.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.warmup_steps + decay_steps, end_value=config.learning_rate * config.min_lr_ratio)


def _names(path) -> list[str]:
  return [str(getattr(key, "key", key)) for key in path]


def weight_decay_mask(params: nnx.State, config: TrainConfig) -> nnx.State:
  """True for the parameters that get weight decay: matrices, and embeddings only if asked."""

  def decays(path, variable) -> bool:
    names = _names(path)
    if variable.ndim < 2:  # norm scales, biases
      return False
    if "embedding" in names:
      return config.decay_embeddings
    return True

  return jax.tree.map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def dsa_warmup(model_config) -> bool:
  """True when some layer is a DSA layer (`dsa` / `dsa_block`) and `model.attention.dsa.stage` is "warmup"."""
  if model_config is None:
    return False
  kinds = {model_config.attention_kind(layer) for layer in range(model_config.num_layers)}
  dsa = getattr(model_config.attention, "dsa", None)
  return bool(kinds & set(DSA_KINDS)) and dsa is not None and dsa.stage == "warmup"


def trainable_mask(params: nnx.State, model_config=None) -> nnx.State | None:
  """Which parameters the optimizer may change: None (all of them), or in DSA's dense warm-up stage
  (DeepSeek-V3.2-Exp §2.1: "we freeze all model parameters except for the lightning indexer") True
  exactly for the parameters whose path contains "indexer".

  Raises ValueError when the warm-up stage is asked for but no parameter is an indexer's.
  """
  if not dsa_warmup(model_config):
    return None
  mask = jax.tree.map_with_path(lambda path, _: INDEXER in _names(path), params,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
  if not any(jax.tree.leaves(mask)):
    raise ValueError("model.attention.dsa.stage='warmup' trains only the lightning indexer, but no parameter path "
                     f"contains {INDEXER!r}; set model.attention.dsa.stage='sparse' or use a dsa / dsa_block layer.")
  return mask


def freeze_except(inner: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
  """`inner` applied to the gradients of the `trainable` (bool tree) parameters only: the others' gradients
  are zeroed before `inner` (so they count in no clipping norm and leave the Adam moments at rest) and
  their updates after it (no Adam step, no weight decay). The state is `inner`'s own, so a run can switch
  between frozen and unfrozen stages on resume and restore the same optimizer state."""

  def zero_frozen(tree):  # `trainable` is a prefix of `tree` (bools where tree has Variables or arrays)
    return jax.tree.map(lambda keep, sub: sub if keep else jax.tree.map(jnp.zeros_like, sub), trainable, tree)

  def update(grads, state, params=None):
    updates, state = inner.update(zero_frozen(grads), state, params)
    return zero_frozen(updates), state

  return optax.GradientTransformation(inner.init, update)


def build_optimizer(config: TrainConfig, params: nnx.State, model_config=None) -> optax.GradientTransformation:
  """AdamW under `config`; `model_config` (a ModelConfig) adds DSA's warm-up freeze (`trainable_mask`)."""
  mask = weight_decay_mask(params, config)
  chain = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.beta1, b2=config.beta2, eps=config.adam_eps,
                           weight_decay=config.weight_decay, mask=mask))
  transform = optax.chain(*chain)
  trainable = trainable_mask(params, model_config)
  return transform if trainable is None else freeze_except(transform, trainable)
