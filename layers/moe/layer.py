"""Mixture-of-Experts feed-forward layer.

router (float32 logits -> softmax / sigmoid scores -> top-k, optionally biased
and group-limited -> gate normalisation) -> dispatch (capacity with dropping,
or dropless sort + grouped matmul; expert parallel with all-to-all under a mesh)
-> stacked SwiGLU experts [E, D, F] -> gate-weighted combine, plus optional
always-on shared experts.

Integration:
  layer = MoEFeedForward(d_model, config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs)
  y, aux = layer(x)                    # x, y: [B, T, D]
  loss = lm_loss + aux["aux_loss"]     # already weighted by its coefficients
  ... optimizer update ...
  after_optimizer_step(model)          # auxiliary-loss-free bias balancing (no-op without it)

`aux` holds float32 arrays: "aux_loss" (alpha * load balance + z_loss_coef *
z-loss + seq_aux_loss_alpha * sequence-wise loss) and metrics, all over the
global batch: "load_balance_loss" / "seq_balance_loss" (unweighted, 1.0 =
balanced), "z_loss" (unweighted), "dropped_fraction" (share of the valid (token, pick)
pairs dropped; expert choice: share of tokens no expert took), "max_violation",
"router_entropy" (normalised to [0, 1]), "expert_load" [E] and, with
selection_bias, "bias_range" (max - min bias).

The forward pass writes the measured load into `RouterLoad` (a non-Param
Variable): take it out of the loss function with the rest of the non-Param
state (nnx.value_and_grad / nnx.jit do so) so that `after_optimizer_step` sees it.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import routing
from sparseformer.layers.weights import dequantized
from sparseformer.layers.moe import parallel as moe_parallel
from sparseformer.layers.moe.config import MoEConfig
from sparseformer.layers.moe.grouped import swiglu
from sparseformer.layers.routing import RouterBias, RouterLoad  # noqa: F401  (part of the API)

_LOG = logging.getLogger(__name__)
_LOGGED_DROPLESS: set[MoEConfig] = set()  # capacity configs whose dropless decode has been logged

__all__ = ["MoEFeedForward", "MoEConfig", "RouterBias", "RouterLoad", "after_optimizer_step"]


class MoEFeedForward(nnx.Module):
  """MoE SwiGLU feed-forward: x [B, T, D] -> (y [B, T, D], aux dict); see the module docstring.

  Args:
    d_model: model width D.
    config: the MoEConfig (router, experts, dispatch, balancing).
    dtype: compute dtype of the experts (router math is always float32).
    param_dtype: dtype of the parameters.
    rngs: initialisation keys; a `jitter` stream (else `default`) feeds the router jitter.
    causal: the layer sits in a causal decoder; expert_choice routing then needs
      config.allow_noncausal_routing=True.
    mesh: mesh for expert parallelism; default: the current mesh (jax.set_mesh).
  """

  def __init__(self, d_model: int, config: MoEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs, causal: bool = True, mesh: jax.sharding.Mesh | None = None):
    if config.routing == "expert_choice" and causal and not config.allow_noncausal_routing:
      raise ValueError(
          "MoEConfig.routing='expert_choice' lets each expert pick among all tokens of a sequence, the "
          "future included, which leaks information in a causal decoder; use token_choice routing, or "
          "set MoEConfig.allow_noncausal_routing=True to study it anyway")
    active_mesh = moe_parallel.current_mesh(mesh)
    if active_mesh is not None:
      config.validate_mesh(dict(active_mesh.shape))
    self.config = config
    self.d_model = d_model
    self.dtype = dtype
    self.mesh = mesh
    num_experts, hidden = config.routed_experts, config.routed_hidden
    self.router = routing.Router(d_model, num_experts, selection_bias=config.selection_bias,
                                 jitter=config.jitter, param_dtype=param_dtype, rngs=rngs)
    # Fan-in scaling per expert (the leading expert axis is a batch axis, not fan-in).
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))
    shared_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.w_gate = nnx.Param(init(rngs.params(), (num_experts, d_model, hidden), param_dtype),
                            logical_axes=("experts", "embed", "mlp"))
    self.w_up = nnx.Param(init(rngs.params(), (num_experts, d_model, hidden), param_dtype),
                          logical_axes=("experts", "embed", "mlp"))
    self.w_down = nnx.Param(init(rngs.params(), (num_experts, hidden, d_model), param_dtype),
                            logical_axes=("experts", "mlp", "embed"))
    if config.shared_hidden:
      shared = config.shared_hidden
      self.shared_gate = nnx.Param(shared_init(rngs.params(), (d_model, shared), param_dtype),
                                   logical_axes=("embed", "mlp"))
      self.shared_up = nnx.Param(shared_init(rngs.params(), (d_model, shared), param_dtype),
                                 logical_axes=("embed", "mlp"))
      self.shared_down = nnx.Param(shared_init(rngs.params(), (shared, d_model), param_dtype),
                                   logical_axes=("mlp", "embed"))
    else:
      self.shared_gate = self.shared_up = self.shared_down = None

  def expert_weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(w_gate, w_up, w_down) in the compute dtype; stacks quantized by PTQ are dequantized here (the dispatch
    paths index and gather them, which qwix cannot intercept), so experts compute weight-only quantized."""
    return tuple(dequantized(w, self.dtype) for w in (self.w_gate, self.w_up, self.w_down))

  def _shared_expert(self, x_flat: jax.Array) -> jax.Array:
    """The always-on shared experts (dequantized like the routed stacks when PTQ quantized them)."""
    return swiglu(x_flat, *(dequantized(w, self.dtype) for w in (self.shared_gate, self.shared_up, self.shared_down)))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    config = self.config
    batch, length, dim = x.shape
    num_experts, k = config.routed_experts, config.routed_top_k
    x = x.astype(self.dtype)
    x_flat = x.reshape(batch * length, dim)
    logits = self.router.logits(x_flat)  # [N, E] float32
    weights = self.expert_weights()
    group_size = config.capacity_group_size or length
    plan = moe_parallel.make_plan(moe_parallel.current_mesh(self.mesh))
    if plan is not None:
      config.validate_mesh(dict(plan.mesh.shape))

    if config.routing == "token_choice":
      routed = routing.route_token_choice(
          logits, k, score_function=config.score_function, gate_norm=config.gate_norm,
          route_scale=config.route_scale, bias=self.router.selection_bias(), n_groups=config.n_groups,
          topk_groups=config.topk_groups)
      scores, expert_index, valid = routed.scores, routed.expert_index, routed.valid
      capacity = routing.expert_capacity(group_size, k, num_experts, config.capacity_factor)
      options = dict(num_experts=num_experts, dispatch=config.dispatch, grouped_options=config.grouped_options,
                     group_size=group_size, capacity=capacity, valid=valid)
      if plan is None:
        y, kept = moe_parallel.local_token_choice(x_flat, expert_index, routed.gates, weights, **options)
      else:
        y, kept = moe_parallel.sharded_token_choice(x_flat, expert_index, routed.gates, weights, plan=plan,
                                                    **options)
      load = routing.expert_load(expert_index, num_experts, valid)
      # Share of the valid pairs dropped (filler picks are neither kept nor dropped).
      dropped_fraction = 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(valid), 1)
    else:
      if (batch * length) % group_size:
        raise ValueError(f"expert_choice: {batch * length} tokens do not split into groups of {group_size}; "
                         "make MoEConfig.capacity_group_size divide batch * length")
      scores = routing.router_scores(logits, config.score_function)
      capacity = routing.expert_capacity(group_size, k, num_experts, config.capacity_factor)
      slot_token, slot_gate = routing.expert_choice_select(
          scores.reshape(-1, group_size, num_experts), capacity, config.route_scale)
      form = config.dispatch.removeprefix("capacity_")
      if plan is None:
        y = moe_parallel.local_expert_choice(x_flat, slot_token, slot_gate, weights, form=form)
      else:
        y = moe_parallel.sharded_expert_choice(x_flat, slot_token, slot_gate, weights, plan=plan, form=form)
      # Pseudo assignments (one per filled slot) give the same statistics as token choice.
      expert_index = jnp.broadcast_to(jnp.arange(num_experts)[:, None], slot_token.shape[1:])
      load = routing.expert_load(expert_index, num_experts)
      valid = None
      taken = jax.vmap(lambda t: jnp.zeros(group_size + 1, bool).at[t.reshape(-1)].set(True))(slot_token)
      dropped_fraction = 1.0 - jnp.mean(taken[:, :group_size].astype(jnp.float32))

    if self.shared_gate is not None:
      y = y + self._shared_expert(x_flat)
    load = jax.lax.stop_gradient(load)
    self.router.load[...] = load
    aux = self._losses_and_metrics(logits, scores, expert_index, valid, load, dropped_fraction, batch)
    return y.reshape(batch, length, dim).astype(self.dtype), aux

  def infer(self, x: jax.Array) -> jax.Array:
    """Inference (prefill and decode) forward: x [B, T, D] -> y [B, T, D], token-choice routing and dropless
    dispatch whatever `config.dispatch` says (a capacity layer's drops depend on the other tokens of its group,
    so a cached decode could not match them; this is logged once per config), no aux, no load written.
    Router jitter follows the module's mode: decode runs the model in eval mode."""
    config = self.config
    if config.routing != "token_choice":
      raise ValueError(f"MoEConfig.routing={config.routing!r} cannot decode token by token (each expert picks "
                       "among the whole sequence); decode a token_choice model.")
    dispatch = config.dispatch if config.dropless else "dropless_gather"
    if dispatch != config.dispatch and config not in _LOGGED_DROPLESS:
      _LOGGED_DROPLESS.add(config)
      _LOG.info("MoE layer with dispatch=%r decodes with dropless dispatch (dropless_gather): a cached decode "
                "sees one token at a time, so capacity drops are not reproduced.", config.dispatch)
    grouped_options = (config.grouped_options if config.dropless else
                       dict(block_size=config.block_size, schedule=config.gather_schedule))
    batch, length, dim = x.shape
    x_flat = x.astype(self.dtype).reshape(batch * length, dim)
    routed = routing.route_token_choice(
        self.router.logits(x_flat), config.routed_top_k, score_function=config.score_function,
        gate_norm=config.gate_norm, route_scale=config.route_scale, bias=self.router.selection_bias(),
        n_groups=config.n_groups, topk_groups=config.topk_groups)
    options = dict(num_experts=config.routed_experts, dispatch=dispatch, grouped_options=grouped_options,
                   group_size=batch * length, capacity=batch * length, valid=routed.valid)
    plan = moe_parallel.make_plan(moe_parallel.current_mesh(self.mesh))
    if plan is None:
      y, _ = moe_parallel.local_token_choice(x_flat, routed.expert_index, routed.gates, self.expert_weights(),
                                             **options)
    else:
      y, _ = moe_parallel.sharded_token_choice(x_flat, routed.expert_index, routed.gates, self.expert_weights(),
                                               plan=plan, **options)
    if self.shared_gate is not None:
      y = y + self._shared_expert(x_flat)
    return y.reshape(batch, length, dim).astype(self.dtype)

  def _losses_and_metrics(self, logits, scores, expert_index, valid, load, dropped_fraction, batch):
    config = self.config
    probs = routing.score_distribution(scores)
    z_loss = routing.router_z_loss(logits)
    aux = dict(z_loss=z_loss, dropped_fraction=dropped_fraction, expert_load=load,
               max_violation=routing.max_violation(load), router_entropy=routing.normalized_entropy(probs))
    aux_loss = config.z_loss_coef * z_loss
    if config.routing == "token_choice":
      balance = routing.load_balance_loss(probs, expert_index, valid=valid)
      per_sequence = lambda a: a.reshape(batch, -1, a.shape[-1])
      seq_balance = routing.sequence_balance_loss(per_sequence(probs), per_sequence(expert_index),
                                                  valid=per_sequence(valid))
      aux.update(load_balance_loss=balance, seq_balance_loss=seq_balance)
      aux_loss = aux_loss + config.aux_loss_alpha * balance + config.seq_aux_loss_alpha * seq_balance
    if self.router.bias is not None:
      bias = self.router.bias[...]
      aux["bias_range"] = jnp.max(bias) - jnp.min(bias)
    aux["aux_loss"] = aux_loss
    return {name: value.astype(jnp.float32) for name, value in aux.items()}


def after_optimizer_step(model: nnx.Module) -> None:
  """Auxiliary-loss-free balancing: b += u * sign(mean_load - load) in every MoE layer with a bias.

  Call once per training step after the optimizer update, inside the jitted
  step; it reads the load each layer's forward pass stored in RouterLoad and
  updates RouterBias in place (no-op for layers without selection_bias).
  """
  for _, node in nnx.iter_graph(model):
    if isinstance(node, MoEFeedForward) and node.router.bias is not None:
      node.router.bias[...] = routing.bias_balance_update(
          node.router.bias[...], node.router.load[...], node.config.bias_update_rate)
