"""Top-k routers and their balancing losses and statistics.

Pure functions of arrays (the top-k selection, gate normalisation, losses,
statistics, the bias update) plus a thin `Router` module that owns the router
weight and the balancing state. All router math runs in float32 whatever the
compute dtype. `top_k_select` (MoE routing) and `masked_top_k` (content-routed
attention: forced entries, masks before ranking, -1 padding) are the top-k
selections of the code base; both rank with `jax.lax.top_k` (ties to the lower index).

Shapes: N tokens (any leading dims flatten to tokens), E experts, k picks.
Statistics are means over every token they are given: under `jax.jit` with a
batch sharded over devices these means are over the global batch (XLA inserts
the cross-device sums), which is why the MoE layer computes them outside any
`shard_map`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# Finite stand-in for -inf: keeps sums of masked scores finite (no inf - inf = NaN).
_MASKED = -1e30


class RouterBias(nnx.Variable):
  """Selection-only balancing bias [E] (float32); updated by `bias_balance_update`, never by the optimizer."""


class RouterLoad(nnx.Variable):
  """Per-expert load fractions [E] (float32) of the global batch, written by each forward pass.

  Under gradient accumulation the train step replaces it by its mean over the micro-batches (the
  load of the whole batch) before the bias update reads it.
  """


class TopK(NamedTuple):
  """Result of `top_k_select`: values / indices / valid, each [..., k]."""

  values: jax.Array  # the unbiased scores of the picked entries
  indices: jax.Array  # int32 positions along the last axis of `scores`
  valid: jax.Array  # bool: False where fewer than k entries were allowed and the pick is filler


def top_k_select(scores: jax.Array, k: int, *, bias: jax.Array | None = None,
                 valid: jax.Array | None = None, n_groups: int = 1, topk_groups: int = 1) -> TopK:
  """Picks the k best entries along the last axis of `scores` [..., E].

  Selection ranks `scores + bias` (bias [E] broadcasts; it steers the choice but
  the returned values are the unbiased scores). `valid` [..., E] bool excludes
  entries. With `n_groups` > 1 (DeepSeek-V3 group-limited routing) the last axis
  is split into n_groups equal groups, each group is scored by the sum of its two
  best biased entries (its best one when groups have a single entry), and only
  entries of the `topk_groups` best groups can be picked. Ties go to the lower
  index. Indices are sorted by decreasing biased score.
  """
  num = scores.shape[-1]
  if not 1 <= k <= num:
    raise ValueError(f"top_k_select: k={k} must be in [1, {num}] (the size of the last axis)")
  choice = scores.astype(jnp.float32)
  if bias is not None:
    choice = choice + bias.astype(jnp.float32)
  if valid is not None:
    choice = jnp.where(valid, choice, _MASKED)
  if n_groups > 1:
    if num % n_groups or not 1 <= topk_groups <= n_groups:
      raise ValueError(f"top_k_select: n_groups={n_groups} must divide {num} and "
                       f"1 <= topk_groups={topk_groups} <= n_groups")
    grouped = choice.reshape(*choice.shape[:-1], n_groups, num // n_groups)  # [..., G, E/G]
    best_in_group = jax.lax.top_k(grouped, min(2, num // n_groups))[0]
    group_score = best_in_group.sum(-1)  # [..., G]
    _, best_groups = jax.lax.top_k(group_score, topk_groups)
    group_allowed = jax.nn.one_hot(best_groups, n_groups, dtype=jnp.int32).sum(-2) > 0  # [..., G]
    allowed = jnp.repeat(group_allowed, num // n_groups, axis=-1)
    choice = jnp.where(allowed, choice, _MASKED)
  _, indices = jax.lax.top_k(choice, k)
  picked_valid = jnp.take_along_axis(choice, indices, axis=-1) > _MASKED / 2
  values = jnp.take_along_axis(scores, indices, axis=-1)
  return TopK(values, indices.astype(jnp.int32), picked_valid)


def masked_top_k(scores: jax.Array, k: int, *, mask: jax.Array | None = None,
                 forced: jax.Array | None = None) -> TopK:
  """Top-k along the last axis of `scores` [..., E] with forced entries and a mask: the selection of
  content-routed attention (MoBA's own block, NSA's initial and local blocks, DSA's top-k keys).

  `mask` [..., E] bool (broadcastable; True = may be picked) is applied before ranking: a masked entry is
  never picked. `forced` [..., E] bool entries are always picked, count in k and rank first (a forced entry
  is picked even where `mask` is False); with more than k forced entries the k lowest indices win. The
  others rank by decreasing score in f32, ties to the lower index (NaN ranks lowest among allowed entries).
  k may exceed E, and fewer than k entries may be allowed: the remaining slots have index -1, value 0 and
  valid False. Selection carries no gradient: values are the picked scores under stop_gradient.

  Returns TopK(values [..., k], indices int32 [..., k] in rank order, valid bool [..., k]).
  """
  num = scores.shape[-1]
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"masked_top_k: k={k!r} must be an integer >= 1")
  scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
  finite = jnp.finfo(jnp.float32).max
  # Allowed scores are squeezed into the finite range, so +inf (forced) and -inf (masked) stay apart from them.
  rank = jnp.where(jnp.isnan(scores), -finite, jnp.clip(scores, -finite, finite))
  allowed = jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(mask, scores.shape)
  if forced is not None:
    forced = jnp.broadcast_to(forced, scores.shape)
    allowed = allowed | forced
    rank = jnp.where(forced, jnp.inf, rank)
  rank = jnp.where(allowed, rank, -jnp.inf)
  _, indices = jax.lax.top_k(rank, min(k, num))  # lax.top_k puts the lower index first among equal values
  valid = jnp.take_along_axis(allowed, indices, axis=-1)
  values = jnp.where(valid, jnp.take_along_axis(scores, indices, axis=-1), 0.0)
  indices = jnp.where(valid, indices, -1).astype(jnp.int32)
  if k > num:
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, k - num)]
    values, indices, valid = jnp.pad(values, pad), jnp.pad(indices, pad, constant_values=-1), jnp.pad(valid, pad)
  return TopK(values, indices, valid)


def router_scores(logits: jax.Array, score_function: str) -> jax.Array:
  """Per-expert scores in float32: softmax over experts, or an independent sigmoid per expert."""
  logits = logits.astype(jnp.float32)
  if score_function == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if score_function == "sigmoid":
    return jax.nn.sigmoid(logits)
  raise ValueError(f"score_function={score_function!r}: choose softmax or sigmoid")


def score_distribution(scores: jax.Array) -> jax.Array:
  """Scores normalised to sum to 1 over experts (identity for softmax scores): the P of the losses."""
  return scores / jnp.maximum(scores.sum(-1, keepdims=True), 1e-20)


def normalize_gates(picked_scores: jax.Array, picked_logits: jax.Array, gate_norm: str,
                    route_scale: float = 1.0) -> jax.Array:
  """Combine weights [..., k] from the picked scores (and logits, for softmax_topk), times route_scale.

  none: the scores as they are; topk: divided by their sum; softmax_topk: a
  softmax over the picked logits (Mixtral; equal to topk for softmax scores).
  """
  if gate_norm == "none":
    gates = picked_scores
  elif gate_norm == "topk":
    gates = picked_scores / jnp.maximum(picked_scores.sum(-1, keepdims=True), 1e-20)
  elif gate_norm == "softmax_topk":
    gates = jax.nn.softmax(picked_logits.astype(jnp.float32), axis=-1)
  else:
    raise ValueError(f"gate_norm={gate_norm!r}: choose none, topk or softmax_topk")
  return gates * route_scale


class Routing(NamedTuple):
  """Token-choice routing of N tokens to k of E experts (all float32 / int32 / bool)."""

  logits: jax.Array  # [N, E]
  scores: jax.Array  # [N, E] softmax or sigmoid scores
  expert_index: jax.Array  # [N, k] int32, the picked experts (filler where not valid)
  gates: jax.Array  # [N, k] combine weights (normalised over the valid picks, scaled); 0 where not valid
  valid: jax.Array  # [N, k] bool: False for filler picks (fewer than k experts allowed); no gate, no slot, no load


def route_token_choice(logits: jax.Array, k: int, *, score_function: str = "softmax",
                       gate_norm: str = "topk", route_scale: float = 1.0,
                       bias: jax.Array | None = None, valid: jax.Array | None = None, n_groups: int = 1,
                       topk_groups: int = 1) -> Routing:
  """Each token picks its top-k experts; gates are differentiable in `logits`, indices are not.

  `valid` [N, E] bool (broadcastable) says which experts a token may pick; experts biased down to
  the masked level (a bias <= -5e29) count as excluded too. A token with fewer than k allowed
  experts gets filler picks with `Routing.valid` False and gate 0; the gates of its valid picks are
  normalised among themselves.
  """
  logits = logits.astype(jnp.float32)
  scores = router_scores(logits, score_function)
  picked = top_k_select(scores, k, bias=bias, valid=valid, n_groups=n_groups, topk_groups=topk_groups)
  picked_scores = jnp.where(picked.valid, picked.values, 0.0)
  picked_logits = jnp.where(picked.valid, jnp.take_along_axis(logits, picked.indices, axis=-1), _MASKED)
  gates = normalize_gates(picked_scores, picked_logits, gate_norm, route_scale)
  return Routing(logits, scores, picked.indices, jnp.where(picked.valid, gates, 0.0), picked.valid)


def expert_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert and group: ceil(capacity_factor * group_size * k / E), at least 1, at most group_size * k."""
  # round() absorbs float noise such as 1.1 * 100 = 110.00000000000001.
  slots = math.ceil(round(capacity_factor * group_size * k / num_experts, 9))
  return int(min(max(slots, 1), group_size * k))


def expert_choice_select(scores: jax.Array, capacity: int, route_scale: float = 1.0
                         ) -> tuple[jax.Array, jax.Array]:
  """Expert-choice routing: each expert takes the `capacity` best tokens of each group.

  scores: [G, S, E] float32 router scores of G groups of S tokens. Returns
  slot_token [G, E, C] int32 (token position within its group) and slot_gate
  [G, E, C] (the token's score for that expert, times route_scale). Reads every
  token of the group, the future included: not causal.
  """
  picked = top_k_select(jnp.swapaxes(scores, 1, 2), min(capacity, scores.shape[1]))
  return picked.indices, picked.values * route_scale


# ----------------------------------------------------------------------------- statistics and losses


def expert_load(expert_index: jax.Array, num_experts: int, valid: jax.Array | None = None) -> jax.Array:
  """Fraction of the (token, pick) assignments that go to each expert: [E] float32, sums to 1.

  `valid` (bool, expert_index's shape) leaves filler picks out of the count (all zeros when none is valid).
  """
  one_hot = jax.nn.one_hot(expert_index.reshape(-1), num_experts, dtype=jnp.float32)
  if valid is None:
    return one_hot.mean(0)
  weight = valid.reshape(-1, 1).astype(jnp.float32)
  return (one_hot * weight).sum(0) / jnp.maximum(weight.sum(), 1.0)


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, *, alpha: float = 1.0,
                      valid: jax.Array | None = None) -> jax.Array:
  """Switch load-balance loss alpha * E * sum_i f_i * P_i.

  probs: [N, E] per-token routing distribution (`score_distribution` of the
  scores); expert_index: [N, k]. f_i = share of the (valid) assignments sent to
  expert i (`expert_load`, no gradient), P_i = mean probability of expert i.
  Equals alpha under perfectly uniform routing and grows with imbalance (up to alpha * E).
  """
  num_experts = probs.shape[-1]
  load = jax.lax.stop_gradient(expert_load(expert_index, num_experts, valid))
  mean_prob = probs.reshape(-1, num_experts).astype(jnp.float32).mean(0)
  return alpha * num_experts * jnp.sum(load * mean_prob)


def sequence_balance_loss(probs: jax.Array, expert_index: jax.Array, *, alpha: float = 1.0,
                          valid: jax.Array | None = None) -> jax.Array:
  """DeepSeek-V3 sequence-wise balance loss: the load-balance loss per sequence, averaged.

  probs: [B, T, E], expert_index (and valid): [B, T, k]. Equals alpha when every sequence is balanced.
  """
  valid = jnp.ones(expert_index.shape, bool) if valid is None else valid
  per_sequence = jax.vmap(lambda p, i, v: load_balance_loss(p, i, alpha=alpha, valid=v))(probs, expert_index, valid)
  return per_sequence.mean()


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss mean(logsumexp(logits)^2) over tokens; logits [..., E]."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def max_violation(load: jax.Array) -> jax.Array:
  """MaxVio = max load / mean load - 1 for per-expert loads [E] (0 when balanced)."""
  return jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-20) - 1.0


def normalized_entropy(probs: jax.Array) -> jax.Array:
  """Mean per-token entropy of probs [..., E] divided by log E: 1 = uniform routing, 0 = one-hot."""
  num_experts = probs.shape[-1]
  probs = probs.astype(jnp.float32)
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), axis=-1)
  return jnp.mean(entropy) / jnp.log(float(max(num_experts, 2)))


def bias_balance_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Auxiliary-loss-free balancing step b + u * sign(mean_load - load): favours under-loaded experts."""
  return bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)


# ----------------------------------------------------------------------------- module


class Router(nnx.Module):
  """Linear router weight [D, E] plus, when asked, the balancing bias and the measured load.

  `logits(x)` maps x [..., D] to float32 logits [..., E], applying the Switch
  input jitter in training mode (`deterministic=False`, flipped by
  `model.eval()` / `model.train()`).
  """

  def __init__(self, d_model: int, num_experts: int, *, selection_bias: bool = False,
               jitter: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs):
    # Small init keeps the initial routing close to uniform.
    init = nnx.initializers.normal(stddev=0.1 / d_model ** 0.5)
    self.weight = nnx.Param(init(rngs.params(), (d_model, num_experts), param_dtype),
                            logical_axes=("embed", None))
    self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32)) if selection_bias else None
    self.load = RouterLoad(jnp.full((num_experts,), 1.0 / num_experts, jnp.float32))
    self.jitter = jitter
    self.deterministic = False
    self.jitter_rngs = rngs["jitter"].fork() if jitter > 0 else None

  def logits(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.jitter > 0 and not self.deterministic:
      noise = jax.random.uniform(self.jitter_rngs(), x.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
      x = x * noise
    return jnp.einsum("...d,de->...e", x, self.weight[...].astype(jnp.float32))

  def selection_bias(self) -> jax.Array | None:
    return None if self.bias is None else self.bias[...]
