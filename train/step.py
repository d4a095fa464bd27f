"""The jitted training and evaluation steps."""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer.layers.routing import RouterLoad
from sparseformer.train.compression import distill as distill_lib
from sparseformer.train.compression import teacher as teacher_lib
from sparseformer.train.state import ModelSetup, TrainState

Batch = dict[str, jax.Array]  # inputs, targets: int32 [B, T]; loss_mask: float32 [B, T] (all ones if absent)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in f32: [B, T, V], [B, T] -> [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_mask(batch: Batch) -> jax.Array:
  """float32 [B, T] weights of the positions that count: the batch's loss_mask, all ones for plain LM batches."""
  if "loss_mask" in batch:
    return batch["loss_mask"].astype(jnp.float32)
  return jnp.ones(batch["targets"].shape, jnp.float32)


def masked_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """f32 sums over the labelled positions (mask > 0) of a batch, for the loss and the accuracies.

  nll_sum = sum(nll * mask); tokens = sum(mask); correct = labelled positions whose argmax is the target;
  examples = rows with at least one labelled position; examples_correct = such rows with every labelled
  position correct. Sums, so micro-batches and eval batches add up to the whole.
  """
  nll = cross_entropy(logits, targets)
  labelled = mask > 0
  right = (jnp.argmax(logits, axis=-1) == targets) & labelled
  has_label = jnp.any(labelled, axis=-1)
  all_right = has_label & (jnp.sum(right, axis=-1) == jnp.sum(labelled, axis=-1))
  return {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask), "correct": jnp.sum(right.astype(jnp.float32)),
          "examples": jnp.sum(has_label.astype(jnp.float32)),
          "examples_correct": jnp.sum(all_right.astype(jnp.float32))}


def accuracies(sums: dict) -> dict:
  """token_accuracy and example_accuracy from summed `masked_sums` (0 where nothing is labelled)."""
  return {"token_accuracy": sums["correct"] / jnp.maximum(sums["tokens"], 1.0),
          "example_accuracy": sums["examples_correct"] / jnp.maximum(sums["examples"], 1.0)}


def _forward_loss(setup: ModelSetup, params, extra, batch: Batch, normalizer: jax.Array, accum_steps: int,
                  distill: "teacher_lib.Distillation | None" = None, teacher_variables=None):
  """Objective of one (micro-)batch: its masked NLL sum over the WHOLE batch's mask count `normalizer`, plus
  its auxiliary loss / accum_steps; summed over the micro-batches this is the masked mean + the mean aux loss.
  With `distill`, the NLL term becomes `distill_lib.objective` (hard, soft and hidden sums, same normalizer)."""
  # copy=True: fresh Variables owned by this trace, so layers may write state (e.g. the MoE router load).
  model = nnx.merge(setup.graphdef, params, extra, copy=True)
  want_hidden = distill is not None and distill.config.hidden_weight > 0
  logits, aux, *hidden = model(batch["inputs"], return_hidden=True) if want_hidden else model(batch["inputs"])
  mask = loss_mask(batch)
  sums = masked_sums(logits, batch["targets"], mask)
  _, _, new_extra = nnx.split(model, nnx.Param, ...)
  metrics = {name: value for name, value in aux.items() if name != "aux_loss"}
  if distill is None:
    objective = sums["nll_sum"] / normalizer + aux["aux_loss"] / accum_steps
  else:
    teacher_logits, teacher_hidden = teacher_lib.teacher_forward(distill.graphdef, teacher_variables,
                                                                 batch["inputs"], hidden=want_hidden)
    sums |= distill_lib.distill_sums(logits, teacher_logits, mask, distill.config,
                                     student_hidden=hidden[0] if hidden else None, teacher_hidden=teacher_hidden,
                                     layer_pairs=distill.layer_pairs)
    objective = (distill_lib.objective(sums["nll_sum"], sums, normalizer, distill.config)
                 + aux["aux_loss"] / accum_steps)
  return objective, (sums, aux["aux_loss"], metrics, new_extra)


# Non-Param state that a forward pass overwrites with a statistic of its batch (a mean over its tokens);
# under accumulation it is averaged over the micro-batches, so it is the statistic of the whole batch.
BATCH_STATISTICS = (RouterLoad,)


def _accumulated_grads(setup: ModelSetup, state: TrainState, batch: Batch, accum_steps: int, distill=None,
                       teacher_variables=None):
  """Loss, gradients and metrics over `accum_steps` micro-batches (a lax.scan; one when accum_steps == 1).

  Returns (loss, lm_loss, aux_loss, sums, metrics, extra, grads); see `make_train_step` for what each means
  under accumulation. The non-Param state `extra` runs through the micro-batches in order (e.g. RNG
  counters), except the BATCH_STATISTICS, which come back as their mean over the micro-batches.
  """
  grad_fn = jax.value_and_grad(_forward_loss, argnums=1, has_aux=True)
  normalizer = jnp.maximum(jnp.sum(loss_mask(batch)), 1.0)  # labelled positions of the whole global batch
  if accum_steps == 1:
    (loss, (sums, aux_loss, metrics, extra)), grads = grad_fn(setup, state.params, state.extra, batch, normalizer, 1,
                                                              distill, teacher_variables)
    return loss, sums["nll_sum"] / normalizer, aux_loss, sums, metrics, extra, grads

  # Micro-batch a takes rows a, a + A, a + 2A, ...: each one spans every data shard.
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

  micro_batches = jax.tree.map(split, batch)

  def body(carry, micro_batch):
    grads_sum, extra = carry
    (_, (sums, aux_loss, metrics, extra)), grads = grad_fn(setup, state.params, extra, micro_batch, normalizer,
                                                           accum_steps, distill, teacher_variables)
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    statistics, _ = nnx.split_state(extra, BATCH_STATISTICS, ...)
    return (grads_sum, extra), (sums, aux_loss, metrics, statistics)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, extra), (sums, aux_loss, metrics, statistics) = jax.lax.scan(body, (zeros, state.extra), micro_batches)
  sums = jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  extra = nnx.merge_state(extra, jax.tree.map(lambda s: jnp.mean(s, axis=0), statistics))
  lm_loss, aux_loss = sums["nll_sum"] / normalizer, jnp.mean(aux_loss)
  objective = lm_loss if distill is None else distill_lib.objective(sums["nll_sum"], sums, normalizer,
                                                                   distill.config)
  return objective + aux_loss, lm_loss, aux_loss, sums, metrics, extra, grads


def make_train_step(setup: ModelSetup, *, accum_steps: int, learning_rate: Callable[[jax.Array], jax.Array],
                    after_optimizer_step: Callable[[nnx.Module], None] | None = None,
                    distill: "teacher_lib.Distillation | None" = None):
  """(state, batch) -> (state, metrics); a non-finite loss or grad norm leaves the state unchanged.

  With `distill`, the step is (state, batch, teacher_variables): the frozen teacher runs inside it (its
  variables an argument with their own shardings, outside the optimizer), the objective is
  `distill_lib.objective` and metrics["loss"] stays the hard LM loss; distill/* metrics are added.

  `metrics["finite"]` is False for such a step, so the host can stop the run with the state still good.

  The loss (metrics["loss"]) is the masked mean sum(nll * loss_mask) / sum(loss_mask) over the whole
  global batch (a batch without loss_mask counts every position); token_accuracy and example_accuracy count
  the labelled positions (loss_mask > 0) and the examples with at least one (see `masked_sums`).

  Gradient accumulation (accum_steps = A > 1) splits the batch [B, T] into A micro-batches of B / A
  whole sequences (B must divide by A) and defines the step as:
  - the masked LM loss, its gradient and the accuracies: exactly those of A = 1 on the same batch: each
    micro-batch's masked NLL sum is divided by the whole batch's mask count, and the counts are summed.
  - auxiliary losses, their gradients and layer metrics: the mean over the micro-batches of each
    micro-batch's value. For every statistic that is a mean over tokens or sequences (z-loss, sequence-wise
    balance loss, router entropy, expert_load, dropped fraction with one capacity group per sequence)
    this equals A = 1 on the same batch. A batch-level nonlinear statistic (the Switch load-balance
    loss f . P, max_violation) is the mean of its per-micro-batch values instead, as in every
    accumulating trainer: its gradient is the mean of the micro-batch gradients.
  - the measured expert load (RouterLoad) that the auxiliary-loss-free bias update reads: the mean
    over the micro-batches, i.e. the load of the whole batch (micro-batches hold equal numbers of
    assignments, unless masking filler picks), so the bias update equals A = 1.
  The selection bias itself is the same in every micro-batch (it changes only after the optimizer step).
  """

  def train_step(state: TrainState, batch: Batch, teacher_variables=None):
    loss, lm_loss, aux_loss, sums, layer_metrics, extra, grads = _accumulated_grads(setup, state, batch,
                                                                                   accum_steps, distill,
                                                                                   teacher_variables)
    if distill is not None:
      layer_metrics = {**layer_metrics, **distill_lib.metrics(sums["nll_sum"], sums,
                                                              jnp.maximum(jnp.sum(loss_mask(batch)), 1.0))}
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
               "learning_rate": learning_rate(state.step), "finite": finite, **accuracies(sums), **layer_metrics}
    return new_state, metrics

  return train_step


def make_eval_step(setup: ModelSetup):
  """(state, batch) -> `masked_sums` of the batch plus bytes (labelled targets < 256, for bits per byte)."""

  def eval_step(state: TrainState, batch: Batch):
    model = nnx.merge(setup.graphdef, state.params, state.extra, copy=True)
    model.eval()  # deterministic: no router jitter
    logits, _ = model(batch["inputs"])
    mask = loss_mask(batch)
    sums = masked_sums(logits, batch["targets"], mask)
    return {**sums, "bytes": jnp.sum(mask * (batch["targets"] < 256).astype(jnp.float32))}

  return eval_step


def summarize_eval(sums: list[dict], *, bits_per_byte: bool = True) -> dict[str, float]:
  """Masked mean loss per labelled token, token and example accuracy, and (for byte-level language-model
  data) bits per byte: all nats, special tokens included, over the UTF-8 byte count."""
  total = {name: sum(float(s[name]) for s in sums) for name in sums[0]}
  summary = {"loss": total["nll_sum"] / max(total["tokens"], 1.0),
             **{name: float(value) for name, value in accuracies(total).items()}}
  if bits_per_byte:
    summary["bits_per_byte"] = total["nll_sum"] / max(total["bytes"], 1.0) / math.log(2)
  return summary
