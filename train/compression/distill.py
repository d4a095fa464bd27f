"""Knowledge-distillation losses: soft targets at a temperature (Hinton et al., 2015) and hidden-state cosine.

All functions are per position ([B, T] out) and f32; the training step weights them by the batch's loss_mask
and divides by the whole batch's mask count, like the LM loss, so they are exact under gradient accumulation.
The teacher's outputs are wrapped in stop_gradient here, so no gradient can reach a teacher.
"""

import jax
import jax.numpy as jnp

from sparseformer.train.compression.distill_config import DistillConfig


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis; 0 where p_v = 0."""
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def divergence(student_logits: jax.Array, teacher_logits: jax.Array, *, kind: str, temperature: float = 1.0
               ) -> jax.Array:
  """Per-position divergence between the teacher's and the student's softmax at temperature T: [B, T, V] -> [B, T].

  forward_kl: KL(p_T || q_T) (Hinton et al. 2015; mass-covering); reverse_kl: KL(q_T || p_T) (mode-seeking,
  MiniLLM, Gu et al. 2024); jsd: (KL(p_T || m) + KL(q_T || m)) / 2 with m = (p_T + q_T) / 2, bounded by log 2.
  p is the teacher, q the student. Not scaled by T^2 (`soft_loss` does that).
  """
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
  if kind == "forward_kl":
    return _kl(log_p, log_q)
  if kind == "reverse_kl":
    return _kl(log_q, log_p)
  if kind == "jsd":
    log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
    return 0.5 * (_kl(log_p, log_m) + _kl(log_q, log_m))
  raise ValueError(f"train.distill.loss={kind!r} is not one of forward_kl, reverse_kl, jsd.")


def soft_loss(student_logits: jax.Array, teacher_logits: jax.Array, config: DistillConfig) -> jax.Array:
  """T^2 * divergence per position: the T^2 keeps the soft gradients' scale independent of T (Hinton et al., Sec. 2)."""
  return config.temperature**2 * divergence(student_logits, teacher_logits, kind=config.loss,
                                            temperature=config.temperature)


def hidden_cosine(student_hidden: list[jax.Array], teacher_hidden: list[jax.Array],
                  layer_pairs: tuple[tuple[int, int], ...]) -> jax.Array:
  """Mean over the (student layer, teacher layer) pairs of 1 - cos(h_s, h_t) per position: [B, T].

  Hidden states are the residual stream after each block, [B, T, D] (equal widths). A zero vector has cosine 0.
  """
  losses = []
  for student_layer, teacher_layer in layer_pairs:
    s = student_hidden[student_layer].astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_hidden[teacher_layer]).astype(jnp.float32)
    dot = jnp.einsum("BTD,BTD->BT", s, t)
    norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    losses.append(1.0 - dot / jnp.maximum(norms, 1e-12))
  return sum(losses) / len(losses)


def distill_sums(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, config: DistillConfig,
                 *, student_hidden=None, teacher_hidden=None, layer_pairs=()) -> dict[str, jax.Array]:
  """Masked f32 sums of one (micro-)batch: soft_sum (T^2-scaled soft loss), kl_sum (KL(teacher || student) at
  T = 1, the plain metric whatever the loss) and hidden_sum (0 without a hidden loss)."""
  sums = {"soft_sum": jnp.sum(soft_loss(student_logits, teacher_logits, config) * mask),
          "kl_sum": jnp.sum(divergence(student_logits, teacher_logits, kind="forward_kl") * mask)}
  if config.hidden_weight > 0:
    sums["hidden_sum"] = jnp.sum(hidden_cosine(student_hidden, teacher_hidden, layer_pairs) * mask)
  else:
    sums["hidden_sum"] = jnp.zeros((), jnp.float32)
  return sums


def objective(nll_sum: jax.Array, sums: dict, normalizer: jax.Array, config: DistillConfig) -> jax.Array:
  """(1 - alpha) * hard + alpha * soft + hidden_weight * hidden, each a masked sum over `normalizer`."""
  return ((1.0 - config.alpha) * nll_sum + config.alpha * sums["soft_sum"]
          + config.hidden_weight * sums["hidden_sum"]) / normalizer


def metrics(nll_sum: jax.Array, sums: dict, normalizer: jax.Array) -> dict[str, jax.Array]:
  """distill/* metrics from the batch's summed `distill_sums`: masked means per labelled position."""
  return {"distill/kl": sums["kl_sum"] / normalizer, "distill/soft_loss": sums["soft_sum"] / normalizer,
          "distill/hard_loss": nll_sum / normalizer, "distill/hidden_loss": sums["hidden_sum"] / normalizer}
