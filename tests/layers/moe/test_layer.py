"""Tests of the MoE feed-forward layer (layers/moe/) on one device.

Every dispatch path is held against a naive reference that loops over experts
and runs each on its own tokens, values and gradients, on fresh random inputs.
"""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseformer.layers import routing
from sparseformer.layers.moe import MoEFeedForward, after_optimizer_step
from sparseformer.layers.moe import dispatch as moe_dispatch, grouped as moe_grouped, parallel as moe_parallel
from sparseformer.layers.moe.config import DISPATCHES, PRESETS, MoEConfig
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM

# Deterministic in the default run (tests/conftest.py's profile); `pytest -m fuzz` runs the suite's fuzz twins.
SETTINGS = hypothesis.settings(max_examples=3, deadline=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])


def naive_moe(x, expert_index, gates, w_gate, w_up, w_down, kept=None):
  """Reference: loop over experts; expert e's output counts for the (token, pick) pairs routed to it.

  x [N, D], expert_index / gates / kept [N, k]. Each expert runs on every token and
  a mask keeps its own pairs, so this is slow and obviously right, and it jits.
  """
  kept = jnp.ones(expert_index.shape, bool) if kept is None else kept
  y = jnp.zeros(x.shape, jnp.float32)
  for expert in range(w_gate.shape[0]):
    weight = jnp.sum(jnp.where((expert_index == expert) & kept, gates, 0.0), axis=-1)  # [N]
    y = y + weight[:, None] * moe_grouped.swiglu(x, w_gate[expert], w_up[expert], w_down[expert])
  return y


def naive_kept(expert_index, capacity, group_size, valid=None):
  """Reference drop rule: per group, (token, pick) pairs take slots in token-major order; invalid ones take none."""
  expert_index = np.asarray(expert_index)
  valid = np.ones(expert_index.shape, bool) if valid is None else np.asarray(valid)
  kept = np.zeros(expert_index.shape, bool)
  for start in range(0, expert_index.shape[0], group_size):
    used = {}
    for token in range(start, start + group_size):
      for pick, expert in enumerate(expert_index[token]):
        if not valid[token, pick]:
          continue
        used[expert] = used.get(expert, 0) + 1
        kept[token, pick] = used[expert] <= capacity
  return kept


def _random_problem(seed, num_tokens=48, dim=16, hidden=8, num_experts=6, k=2, skew=1.0):
  rng = np.random.default_rng(seed)
  # Dirichlet expert popularity: some experts empty, some hold several blocks of rows.
  popularity = rng.dirichlet(np.full(num_experts, skew))
  expert_index = np.stack([rng.choice(num_experts, size=k, replace=False, p=popularity)
                           for _ in range(num_tokens)]).astype(np.int32)
  x = jnp.asarray(rng.normal(size=(num_tokens, dim)), jnp.float32)
  gates = jnp.asarray(rng.random((num_tokens, k)), jnp.float32)
  weights = tuple(jnp.asarray(rng.normal(size=shape) * 0.4, jnp.float32)
                  for shape in [(num_experts, dim, hidden), (num_experts, dim, hidden),
                                (num_experts, hidden, dim)])
  cotangent = jnp.asarray(rng.normal(size=(num_tokens, dim)), jnp.float32)
  return x, expert_index, gates, weights, cotangent


# (dispatch, grouped SwiGLU options): dropless_gather in both schedules, with small blocks.
VARIANTS = {
    "gather_loop": ("dropless_gather", (("block_size", 4), ("schedule", "loop"))),
    "gather_batched": ("dropless_gather", (("block_size", 4), ("schedule", "batched"))),
    "ragged_dot": ("dropless_ragged_dot", ()),
    "capacity_scatter": ("capacity_scatter", ()),
    "capacity_einsum": ("capacity_einsum", ()),
}


@functools.cache
def _dispatch_value_and_grad(variant, num_experts, group_size, capacity):
  dispatch, grouped_options = VARIANTS[variant]
  def loss(x, gates, weights, expert_index, cotangent, valid=None):
    y, kept = moe_parallel.local_token_choice(
        x, expert_index, gates, weights, num_experts=num_experts, dispatch=dispatch,
        grouped_options=dict(grouped_options), group_size=group_size, capacity=capacity, valid=valid)
    return jnp.sum(y * cotangent), (y, kept)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@jax.jit
def _reference_value_and_grad(x, expert_index, gates, weights, cotangent, kept=None):
  loss = lambda x, gates, weights: jnp.sum(naive_moe(x, expert_index, gates, *weights, kept=kept) * cotangent)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, gates, weights)


def _assert_close(got, want, tol=1e-4):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.isfinite(g).all(), "non-finite values"
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


SLOW = pytest.mark.slow


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("k", [2, pytest.param(1, marks=SLOW), pytest.param(3, marks=SLOW)])
@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_dispatch_equals_naive_reference(variant, k, seed):
  """Ample capacity: every path computes every pair; values and gradients equal the expert loop."""
  x, expert_index, gates, weights, cotangent = _random_problem(seed, k=k, skew=0.5)
  num_tokens, num_experts = x.shape[0], weights[0].shape[0]
  group_size = 16
  fn = _dispatch_value_and_grad(variant, num_experts, group_size, capacity=group_size * k)
  (value, (y, kept)), grads = fn(x, gates, weights, jnp.asarray(expert_index), cotangent)
  want_value, want_grads = _reference_value_and_grad(x, expert_index, gates, weights, cotangent)
  assert np.asarray(kept).all()
  _assert_close(y, naive_moe(x, expert_index, gates, *weights))
  _assert_close((value, grads), (want_value, want_grads))


@pytest.mark.parametrize("variant", ["capacity_scatter", pytest.param("capacity_einsum", marks=SLOW)])
@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_capacity_drops_match_reference(variant, seed):
  """Tight capacity: the dropped pairs are those of the token-major rule; kept ones are exact."""
  x, expert_index, gates, weights, cotangent = _random_problem(seed, k=2, skew=0.7)
  num_experts, group_size, capacity = weights[0].shape[0], 16, 4
  fn = _dispatch_value_and_grad(variant, num_experts, group_size, capacity)
  (value, (y, kept)), grads = fn(x, gates, weights, jnp.asarray(expert_index), cotangent)
  want_kept = naive_kept(expert_index, capacity, group_size)
  np.testing.assert_array_equal(np.asarray(kept), want_kept)
  assert not want_kept.all()  # the test does drop something
  want_value, want_grads = _reference_value_and_grad(x, expert_index, gates, weights, cotangent, want_kept)
  _assert_close((value, grads), (want_value, want_grads))


@pytest.mark.parametrize("variant", [v if v in ("capacity_scatter", "gather_loop", "ragged_dot") else
                                     pytest.param(v, marks=SLOW) for v in sorted(VARIANTS)])
@SETTINGS
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_invalid_pairs_take_no_slot_and_no_output(variant, seed):
  """Filler picks (valid False, gate left nonzero here) are not computed and free their capacity slot."""
  x, expert_index, gates, weights, cotangent = _random_problem(seed, k=2, skew=0.7)
  valid = np.random.default_rng(seed).random(expert_index.shape) < 0.7
  num_experts, group_size = weights[0].shape[0], 16
  capacity = 3 if variant.startswith("capacity") else group_size * 2
  fn = _dispatch_value_and_grad(variant, num_experts, group_size, capacity)
  (value, (y, kept)), grads = fn(x, gates, weights, jnp.asarray(expert_index), cotangent, jnp.asarray(valid))
  want_kept = naive_kept(expert_index, capacity, group_size, valid)
  np.testing.assert_array_equal(np.asarray(kept), want_kept)
  want_value, want_grads = _reference_value_and_grad(x, expert_index, gates, weights, cotangent, want_kept)
  _assert_close((value, grads), (want_value, want_grads))


@pytest.mark.parametrize("dispatch", ["capacity_scatter", "dropless_gather"])
def test_layer_filler_picks_get_no_gate_slot_or_load(dispatch):
  """Experts banned by a masking bias leave a token fewer than k picks: the fillers must not count anywhere."""
  config = MoEConfig(num_experts=4, top_k=3, expert_hidden=8, selection_bias=True, dispatch=dispatch,
                     capacity_factor=0.5, aux_loss_alpha=0.0)
  layer = _layer(config)
  banned = np.asarray([False, True, False, True])
  layer.router.bias[...] = jnp.where(jnp.asarray(banned), -1e30, 0.0)
  x = jax.random.normal(jax.random.key(8), (2, 8, 16))
  y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  logits = np.asarray(x, np.float64).reshape(16, 16) @ np.asarray(layer.router.weight[...], np.float64)
  scores = np.exp(logits - logits.max(-1, keepdims=True))
  scores /= scores.sum(-1, keepdims=True)
  allowed_scores = np.where(banned, -np.inf, scores)
  expert_index = np.argsort(-allowed_scores, axis=-1, kind="stable")[:, :2]  # the two allowed experts
  gates = np.take_along_axis(scores, expert_index, -1)
  gates /= gates.sum(-1, keepdims=True)
  kept = naive_kept(expert_index, routing.expert_capacity(8, 3, 4, 0.5), 8) if dispatch != "dropless_gather" else None
  weights = tuple(w[...] for w in (layer.w_gate, layer.w_up, layer.w_down))
  want = naive_moe(x.reshape(16, 16), jnp.asarray(expert_index), jnp.asarray(gates, jnp.float32), *weights,
                   kept=None if kept is None else jnp.asarray(kept))
  _assert_close(y.reshape(16, 16), want)
  load = np.asarray(aux["expert_load"])
  np.testing.assert_allclose(load, np.bincount(expert_index.reshape(-1), minlength=4) / 32, atol=1e-7)
  want_dropped = 0.0 if kept is None else 1.0 - kept.mean()
  np.testing.assert_allclose(float(aux["dropped_fraction"]), want_dropped, atol=1e-6)


@pytest.mark.parametrize("schedule", ["loop", "batched"])
@pytest.mark.parametrize("block_size", [2, pytest.param(64, marks=SLOW)])
def test_grouped_swiglu_blocked_matches_reference_with_padding_rows(block_size, schedule):
  rng = np.random.default_rng(block_size)
  num_experts, dim, hidden, rows = 5, 8, 12, 40
  group_sizes = jnp.asarray([7, 0, 20, 3, 5], jnp.int32)  # 35 real rows, 5 padding rows
  x = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
  weights = [jnp.asarray(rng.normal(size=s) * 0.4, jnp.float32)
             for s in [(num_experts, dim, hidden), (num_experts, dim, hidden), (num_experts, hidden, dim)]]
  cotangent = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
  def value_and_grad(fn):
    return jax.value_and_grad(lambda x, *w: jnp.sum(fn(x, group_sizes, *w) * cotangent),
                              argnums=(0, 1, 2, 3))(x, *weights)
  blocked = functools.partial(moe_grouped.grouped_swiglu_blocked, block_size=block_size, schedule=schedule)
  got = value_and_grad(jax.jit(blocked))
  want = value_and_grad(jax.jit(moe_grouped.grouped_swiglu_reference))
  _assert_close(got, want)
  y = np.asarray(jax.jit(blocked)(x, group_sizes, *weights))
  assert np.isfinite(y).all() and (y[35:] == 0).all()


def _layer(config, d_model=16, seed=0, **kwargs):
  return MoEFeedForward(d_model, config, rngs=nnx.Rngs(seed), **kwargs)


@pytest.mark.parametrize("dispatch", ["dropless_gather", "capacity_scatter",
                                      pytest.param("dropless_ragged_dot", marks=SLOW),
                                      pytest.param("capacity_einsum", marks=SLOW)])
def test_top_k_equal_to_num_experts_is_gate_weighted_sum_of_all_experts(dispatch):
  config = MoEConfig(num_experts=4, top_k=4, expert_hidden=8, dispatch=dispatch, gate_norm="none",
                     capacity_factor=1.0, num_shared_experts=1)
  layer = _layer(config)
  x = jax.random.normal(jax.random.key(1), (2, 8, 16))
  def loss(model, x):
    y, aux = model(x)
    return jnp.sum(y ** 2), (y, aux)
  (_, aux), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(layer, x)
  w_gate, w_up, w_down = (w[...] for w in (layer.w_gate, layer.w_up, layer.w_down))
  def dense_all(router_w, w_gate, w_up, w_down, shared):
    probs = jax.nn.softmax(x @ router_w, axis=-1)  # top-k = E with no normalisation: all softmax weights
    outs = jnp.stack([moe_grouped.swiglu(x, w_gate[e], w_up[e], w_down[e]) for e in range(4)], axis=-2)
    return jnp.einsum("bte,bted->btd", probs, outs) + moe_grouped.swiglu(x, *shared)
  shared = tuple(w[...] for w in (layer.shared_gate, layer.shared_up, layer.shared_down))
  args = (layer.router.weight[...], w_gate, w_up, w_down, shared)
  y, metrics = aux
  _assert_close(y, jax.jit(dense_all)(*args))
  assert float(metrics["dropped_fraction"]) == 0.0
  want_grads = jax.jit(jax.grad(lambda *a: jnp.sum(dense_all(*a) ** 2), argnums=(0, 1, 2, 3)))(*args)
  _assert_close((grads.router.weight[...], grads.w_gate[...], grads.w_up[...], grads.w_down[...]), want_grads)


@pytest.mark.parametrize("capacity_factor,expected", [(1.0, 0.139), (1.25, 0.052)])
def test_random_routing_drop_rate_is_binomial(capacity_factor, expected):
  """Group 512, 64 experts, top-1, uniform random routing (ANCHORS: 13.9 % and 5.2 %)."""
  group_size, num_experts, groups = 512, 64, 64
  capacity = routing.expert_capacity(group_size, 1, num_experts, capacity_factor)
  p = 1 / num_experts
  pmf = lambda n: math.comb(group_size, n) * p ** n * (1 - p) ** (group_size - n)
  # Expected pairs over capacity per expert, times experts, over the pairs in the group.
  exact = num_experts * sum((n - capacity) * pmf(n) for n in range(capacity + 1, group_size + 1)) / group_size
  assert abs(exact - expected) < 1e-3, exact  # the anchor numbers themselves
  expert_index = jax.random.randint(jax.random.key(7), (groups, group_size, 1), 0, num_experts)
  _, kept = jax.jit(moe_dispatch.capacity_slots, static_argnums=(1, 2))(expert_index, num_experts, capacity)
  per_group = 1 - np.asarray(kept).reshape(groups, -1).mean(1)
  standard_error = per_group.std(ddof=1) / np.sqrt(groups)
  assert abs(per_group.mean() - exact) < 4 * standard_error, (per_group.mean(), exact, standard_error)


def test_expert_choice_matches_slot_loop_and_forms_agree():
  config = MoEConfig(num_experts=4, top_k=1, expert_hidden=8, routing="expert_choice",
                     dispatch="capacity_scatter", capacity_factor=1.0, allow_noncausal_routing=True)
  layer = _layer(config, causal=True)
  x = jax.random.normal(jax.random.key(2), (2, 8, 16))
  y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  logits = np.asarray(x).reshape(16, 16) @ np.asarray(layer.router.weight[...])
  scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = np.zeros((16, 16), np.float32)
  for group in range(2):
    for expert in range(4):
      order = np.argsort(-np.asarray(scores[group * 8:(group + 1) * 8, expert]), kind="stable")[:2]
      for token in order + group * 8:
        w_gate, w_up, w_down = (np.asarray(w[...][expert]) for w in (layer.w_gate, layer.w_up, layer.w_down))
        xt = np.asarray(x).reshape(16, 16)[token]
        gate, up = xt @ w_gate, xt @ w_up
        want[token] += float(scores[token, expert]) * ((gate / (1 + np.exp(-gate)) * up) @ w_down)
  _assert_close(y.reshape(16, 16), want)
  covered = (np.abs(want).sum(-1) > 0).mean()
  np.testing.assert_allclose(float(aux["dropped_fraction"]), 1 - covered, atol=1e-6)
  einsum_layer = _layer(MoEConfig(**{**config.__dict__, "dispatch": "capacity_einsum"}), causal=False)
  _assert_close(nnx.jit(lambda m, x: m(x))(einsum_layer, x)[0], y)


def test_expert_choice_in_causal_decoder_needs_opt_in():
  config = MoEConfig(routing="expert_choice", dispatch="capacity_scatter")
  with pytest.raises(ValueError, match="allow_noncausal_routing"):
    _layer(config, causal=True)
  _layer(config, causal=False)  # an encoder may use it


def test_metrics_and_aux_loss_composition():
  config = MoEConfig(num_experts=8, top_k=2, expert_hidden=8, dispatch="capacity_scatter", capacity_factor=1.0,
                     aux_loss_alpha=0.01, z_loss_coef=1e-3, seq_aux_loss_alpha=1e-4, selection_bias=True)
  layer = _layer(config)
  _, aux = nnx.jit(lambda layer, x: layer(x))(layer, jax.random.normal(jax.random.key(3), (4, 16, 16)))
  aux = {k: np.asarray(v) for k, v in aux.items()}
  assert set(aux) >= {"aux_loss", "load_balance_loss", "z_loss", "seq_balance_loss", "dropped_fraction",
                      "max_violation", "router_entropy", "expert_load", "bias_range"}
  assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in aux.values())
  assert aux["expert_load"].shape == (8,) and abs(aux["expert_load"].sum() - 1) < 1e-6
  np.testing.assert_allclose(aux["max_violation"], aux["expert_load"].max() * 8 - 1, rtol=1e-5)
  np.testing.assert_allclose(aux["aux_loss"], 0.01 * aux["load_balance_loss"] + 1e-3 * aux["z_loss"]
                             + 1e-4 * aux["seq_balance_loss"], rtol=1e-5)
  assert 0 < aux["dropped_fraction"] < 0.5 and 0 < aux["router_entropy"] <= 1


def test_after_optimizer_step_updates_bias_from_measured_load_under_jit():
  config = MoEConfig(num_experts=4, top_k=1, expert_hidden=8, selection_bias=True, bias_update_rate=0.1)
  layer = _layer(config)
  layer.router.weight[...] = layer.router.weight[...].at[:, 0].add(1.0)  # skew toward expert 0
  graphdef, params, extra = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def step(params, extra, x):
    def loss(params, extra):
      model = nnx.merge(graphdef, params, extra, copy=True)
      y, aux = model(x)
      return jnp.sum(y) + aux["aux_loss"], nnx.state(model, nnx.Not(nnx.Param))
    (_, extra), _ = jax.value_and_grad(loss, has_aux=True)(params, extra)
    model = nnx.merge(graphdef, params, extra)
    after_optimizer_step(model)
    return nnx.split(model, nnx.Param, ...)[1:]

  x = jnp.abs(jax.random.normal(jax.random.key(4), (2, 32, 16)))
  new_params, new_extra = step(params, extra, x)
  load = np.asarray(new_extra["router"]["load"][...])
  bias = np.asarray(new_extra["router"]["bias"][...])
  assert load[0] > 0.25  # the skew is measured ...
  np.testing.assert_allclose(bias, 0.1 * np.sign(load.mean() - load), atol=1e-7)  # ... and corrected
  _assert_close(jax.tree.leaves(new_params), jax.tree.leaves(params), tol=0)  # parameters untouched


def test_shapes_dtypes_metadata_and_fine_grained_experts():
  config = MoEConfig(num_experts=4, top_k=1, expert_hidden=32, granularity=4, num_shared_experts=2)
  assert (config.routed_experts, config.routed_top_k, config.routed_hidden, config.shared_hidden) == (16, 4, 8, 16)
  layer = MoEFeedForward(16, config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert layer.w_gate.shape == (16, 16, 8) and layer.w_down.shape == (16, 8, 16)
  assert layer.w_gate.get_metadata()["logical_axes"] == ("experts", "embed", "mlp")
  assert layer.w_down.get_metadata()["logical_axes"] == ("experts", "mlp", "embed")
  assert layer.shared_gate.get_metadata()["logical_axes"] == ("embed", "mlp")
  assert layer.router.weight.get_metadata()["logical_axes"] == ("embed", None)
  x = jax.random.normal(jax.random.key(5), (2, 8, 16))
  y16, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y16.dtype == jnp.bfloat16 and aux["expert_load"].shape == (16,)
  layer32 = MoEFeedForward(16, config, dtype=jnp.float32, rngs=nnx.Rngs(0))
  y32, _ = nnx.jit(lambda m, x: m(x))(layer32, x)
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), atol=0.05, rtol=0.05)


def _naive_layer(config, params, x, kept):
  """Reference MoE layer on x [N, D]: routing (the pure function), the expert loop, the shared SwiGLU.

  params: router weight and bias, w_gate, w_up, w_down, shared (a tuple or None); kept [N, k] from `naive_kept`.
  """
  router_weight, bias, w_gate, w_up, w_down, shared = params
  routed = routing.route_token_choice(
      x @ router_weight, config.routed_top_k, score_function=config.score_function, gate_norm=config.gate_norm,
      route_scale=config.route_scale, bias=bias, n_groups=config.n_groups, topk_groups=config.topk_groups)
  y = naive_moe(x, routed.expert_index, routed.gates, w_gate, w_up, w_down, kept=kept)
  return (y if shared is None else y + moe_grouped.swiglu(x, *shared)), routed


@pytest.mark.parametrize("name", [n if n in ("deepseek_v3", "switch") else pytest.param(n, marks=SLOW)
                                  for n in sorted(PRESETS)])
def test_presets_equal_naive_reference(name):
  """Each published recipe, shrunk: output and every gradient equal routing + the expert loop + shared experts."""
  config = PRESETS[name](num_experts=8, expert_hidden=16, top_k=2,
                         **({"n_groups": 4, "topk_groups": 2} if name == "deepseek_v3" else {}))
  layer = _layer(config)
  layer.eval()  # no router jitter (Switch): the reference has none
  batch, length, dim = 2, 8, 16
  if layer.router.bias is not None:  # a nonzero selection bias, so that it steers the choice
    layer.router.bias[...] = 0.05 * jax.random.normal(jax.random.key(7), layer.router.bias.shape)
  x = jax.random.normal(jax.random.key(6), (batch, length, dim))
  cotangent = jax.random.normal(jax.random.key(9), (batch * length, dim))

  def layer_loss(model):
    y, aux = model(x)
    return jnp.sum(y.reshape(-1, dim) * cotangent), (y, aux)
  (_, (y, aux)), grads = nnx.jit(nnx.value_and_grad(layer_loss, has_aux=True))(layer)

  shared = None if layer.shared_gate is None else tuple(
      w[...] for w in (layer.shared_gate, layer.shared_up, layer.shared_down))
  bias = None if layer.router.bias is None else layer.router.bias[...]
  trained = (layer.router.weight[...], layer.w_gate[...], layer.w_up[...], layer.w_down[...], shared)
  x_flat = x.reshape(-1, dim)

  @jax.jit
  def reference(trained, kept):
    router_weight, w_gate, w_up, w_down, shared = trained
    y, routed = _naive_layer(config, (router_weight, bias, w_gate, w_up, w_down, shared), x_flat, kept)
    return jnp.sum(y * cotangent), (y, routed.expert_index)
  reference_value_and_grad = jax.jit(jax.value_and_grad(reference, has_aux=True))

  expert_index = np.asarray(reference(trained, None)[1][1])
  if config.dropless:
    kept = np.ones(expert_index.shape, bool)
  else:
    capacity = routing.expert_capacity(length, config.routed_top_k, config.routed_experts, config.capacity_factor)
    kept = naive_kept(expert_index, capacity, length)
  (_, (want_y, _)), want_grads = reference_value_and_grad(trained, jnp.asarray(kept))
  _assert_close(y.reshape(-1, dim), want_y)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), 1.0 - kept.mean(), atol=1e-6)
  assert np.isfinite(float(aux["aux_loss"]))
  got_grads = (grads.router.weight[...], grads.w_gate[...], grads.w_up[...], grads.w_down[...],
               None if shared is None else (grads.shared_gate[...], grads.shared_up[...], grads.shared_down[...]))
  _assert_close(got_grads, want_grads)
  assert float(np.abs(np.asarray(want_grads[0])).max()) > 0  # the router is trained through the gates


@pytest.mark.parametrize("overrides,field", [
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(ep_buffer_factor=0.0), "ep_buffer_factor"),
    (dict(dispatch="sorted"), "dispatch"),
    (dict(score_function="relu"), "score_function"),
    (dict(gate_norm="l2"), "gate_norm"),
    (dict(num_experts=8, n_groups=3), "n_groups"),
    (dict(num_experts=8, top_k=4, n_groups=4, topk_groups=1), "topk_groups"),
    (dict(expert_hidden=30, granularity=4), "granularity"),
    (dict(routing="expert_choice", dispatch="dropless_gather"), "dispatch"),
    (dict(routing="expert_choice", dispatch="capacity_scatter", selection_bias=True), "routing"),
    (dict(jitter=1.5), "jitter"),
    (dict(gather_schedule="fast"), "gather_schedule"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
])
def test_bad_configs_fail_at_construction(overrides, field):
  with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
    MoEConfig(**overrides)


def test_experts_not_divisible_by_expert_axis_fail():
  config = MoEConfig(num_experts=6, top_k=2)
  with pytest.raises(ValueError, match="not divisible by the mesh axis 'expert'"):
    config.validate_mesh({"data": 2, "expert": 4})
  config.validate_mesh({"data": 2, "expert": 3})
  mesh = jax.sharding.AbstractMesh((4,), ("expert",))
  with pytest.raises(ValueError, match="MoEConfig.num_experts=6"):
    _layer(config, mesh=mesh)


def test_small_moe_model_trains_with_balanced_routing_and_few_drops():
  """The real DecoderLM with MoE layers (capacity 1.25, balance loss 0.01) learns a token map."""

  vocab, batch, length, steps = 64, 8, 128, 60
  moe_config = MoEConfig(num_experts=8, top_k=2, expert_hidden=64, dispatch="capacity_scatter",
                         capacity_factor=1.25, capacity_group_size=512, aux_loss_alpha=0.01)
  config = ModelConfig(vocab_size=vocab, num_layers=2, d_model=32, num_heads=2, num_kv_heads=2,
                       max_seq_len=length, ffn_pattern=("moe",), moe=moe_config, tie_embeddings=False)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  target_of = jax.random.permutation(jax.random.key(1), vocab)  # next token = a fixed map of this one

  @nnx.jit
  def train_step(model, optimizer, key):
    tokens = jax.random.randint(key, (batch, length), 0, vocab)
    def loss_fn(model):
      logits, aux = model(tokens)
      lm_loss = optax.softmax_cross_entropy_with_integer_labels(logits, target_of[tokens]).mean()
      return lm_loss + aux["aux_loss"], (lm_loss, aux)
    (_, (lm_loss, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    after_optimizer_step(model)
    return lm_loss, aux

  history = []
  for step in range(steps):
    lm_loss, aux = train_step(model, optimizer, jax.random.key(100 + step))
    history.append([float(lm_loss)] + [float(aux[f"layer{layer}/moe/{name}"]) for layer in range(2)
                                       for name in ("max_violation", "dropped_fraction")])
  history = np.asarray(history)
  assert np.isfinite(history).all()
  loss, max_violation, dropped = history[:, 0], history[:, [1, 3]], history[:, [2, 4]]
  assert loss[-5:].mean() < 0.1 * loss[0], loss  # ln(64) = 4.2 at the start
  assert dropped[-10:].mean() < 0.01, dropped[-10:]
  assert max_violation[-10:].mean() < 0.4 and max_violation[-10:].mean() < max_violation[:5].mean(), max_violation
