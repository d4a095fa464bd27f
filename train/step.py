"""The jitted training and evaluation steps."""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer.layers.routing import RouterLoad
from sparseformer.train.state import ModelSetup, TrainState

Batch = dict[str, jax.Array]  # inputs, targets: int32 [B, T]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in f32: [B, T, V], [B, T] -> [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _forward_loss(setup: ModelSetup, params, extra, batch: Batch):
  # copy=True: fresh Variables owned by this trace, so layers may write state (e.g. the MoE router load).
  model = nnx.merge(setup.graphdef, params, extra, copy=True)
  logits, aux = model(batch["inputs"])
  lm_loss = jnp.mean(cross_entropy(logits, batch["targets"]))
  _, _, new_extra = nnx.split(model, nnx.Param, ...)
  metrics = {name: value for name, value in aux.items() if name != "aux_loss"}
  return lm_loss + aux["aux_loss"], (lm_loss, aux["aux_loss"], metrics, new_extra)


# Non-Param state that a forward pass overwrites with a statistic of its batch (a mean over its tokens);
# under accumulation it is averaged over the micro-batches, so it is the statistic of the whole batch.
BATCH_STATISTICS = (RouterLoad,)


def _accumulated_grads(setup: ModelSetup, state: TrainState, batch: Batch, accum_steps: int):
  """Mean loss, gradients and metrics over `accum_steps` micro-batches (a lax.scan; one when accum_steps == 1).

  Returns (loss, lm_loss, aux_loss, metrics, extra, grads); see `make_train_step` for what each means
  under accumulation. The non-Param state `extra` runs through the micro-batches in order (e.g. RNG
  counters), except the BATCH_STATISTICS, which come back as their mean over the micro-batches.
  """
  grad_fn = jax.value_and_grad(_forward_loss, argnums=1, has_aux=True)
  if accum_steps == 1:
    (loss, (lm_loss, aux_loss, metrics, extra)), grads = grad_fn(setup, state.params, state.extra, batch)
    return loss, lm_loss, aux_loss, metrics, extra, grads

  # Micro-batch a takes rows a, a + A, a + 2A, ...: each one spans every data shard.
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

  micro_batches = jax.tree.map(split, batch)

  def body(carry, micro_batch):
    grads_sum, extra = carry
    (loss, (lm_loss, aux_loss, metrics, extra)), grads = grad_fn(setup, state.params, extra, micro_batch)
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    statistics, _ = nnx.split_state(extra, BATCH_STATISTICS, ...)
    return (grads_sum, extra), (loss, lm_loss, aux_loss, metrics, statistics)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, extra), (loss, lm_loss, aux_loss, metrics, statistics) = jax.lax.scan(
      body, (zeros, state.extra), micro_batches)
  grads = jax.tree.map(lambda g: g / accum_steps, grads)
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  extra = nnx.merge_state(extra, jax.tree.map(lambda s: jnp.mean(s, axis=0), statistics))
  return jnp.mean(loss), jnp.mean(lm_loss), jnp.mean(aux_loss), metrics, extra, grads


def make_train_step(setup: ModelSetup, *, accum_steps: int, learning_rate: Callable[[jax.Array], jax.Array],
                    after_optimizer_step: Callable[[nnx.Module], None] | None = None):
  """(state, batch) -> (state, metrics); a non-finite loss or grad norm leaves the state unchanged.

  `metrics["finite"]` is False for such a step, so the host can stop the run with the state still good.

  Gradient accumulation (accum_steps = A > 1) splits the batch [B, T] into A micro-batches of B / A
  whole sequences (B must divide by A) and defines the step as:
  - losses, gradients and layer metrics: the mean over the micro-batches of each micro-batch's value.
    For the LM loss and every statistic that is a mean over tokens or sequences (z-loss, sequence-wise
    balance loss, router entropy, expert_load, dropped fraction with one capacity group per sequence)
    this equals A = 1 on the same batch. A batch-level nonlinear statistic (the Switch load-balance
    loss f . P, max_violation) is the mean of its per-micro-batch values instead, as in every
    accumulating trainer: its gradient is the mean of the micro-batch gradients.
  - the measured expert load (RouterLoad) that the auxiliary-loss-free bias update reads: the mean
    over the micro-batches, i.e. the load of the whole batch (micro-batches hold equal numbers of
    assignments, unless masking filler picks), so the bias update equals A = 1.
  The selection bias itself is the same in every micro-batch (it changes only after the optimizer step).
  """

  def train_step(state: TrainState, batch: Batch):
    loss, lm_loss, aux_loss, layer_metrics, extra, grads = _accumulated_grads(setup, state, batch, accum_steps)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if after_optimizer_step is not None:
      model = nnx.merge(setup.graphdef, params, extra, copy=True)
      after_optimizer_step(model)
      _, params, extra = nnx.split(model, nnx.Param, ...)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": lm_loss, "aux_loss": aux_loss, "total_loss": loss, "grad_norm": grad_norm,
               "learning_rate": learning_rate(state.step), "finite": finite, **layer_metrics}
    return new_state, metrics

  return train_step


def make_eval_step(setup: ModelSetup):
  """(state, batch) -> sums for loss and bits-per-byte: nll_sum, tokens, bytes (targets < 256)."""

  def eval_step(state: TrainState, batch: Batch):
    model = nnx.merge(setup.graphdef, state.params, state.extra, copy=True)
    model.eval()  # deterministic: no router jitter
    logits, _ = model(batch["inputs"])
    nll = cross_entropy(logits, batch["targets"])
    return {"nll_sum": jnp.sum(nll), "tokens": jnp.asarray(nll.size, jnp.float32),
            "bytes": jnp.sum((batch["targets"] < 256).astype(jnp.float32))}

  return eval_step


def summarize_eval(sums: list[dict]) -> dict[str, float]:
  """Mean loss per token and bits per byte (all nats, special tokens included, over the UTF-8 byte count)."""
  nll = sum(float(s["nll_sum"]) for s in sums)
  tokens = sum(float(s["tokens"]) for s in sums)
  num_bytes = sum(float(s["bytes"]) for s in sums)
  return {"loss": nll / tokens, "bits_per_byte": nll / max(num_bytes, 1.0) / math.log(2)}
