"""Tests of layers/routing.py: top-k selection, gates, losses, statistics, bias balancing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers import routing


def _np_top_k(choice, k):
  """Reference: stable sort by decreasing value (ties to the lower index)."""
  return np.argsort(-choice, axis=-1, kind="stable")[..., :k]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_select_matches_numpy_with_bias(seed, k):
  rng = np.random.default_rng(seed)
  scores = rng.random((5, 7, 8)).astype(np.float32)
  bias = rng.normal(size=8).astype(np.float32) * 0.3
  got = routing.top_k_select(jnp.asarray(scores), k, bias=jnp.asarray(bias))
  want = _np_top_k(scores + bias, k)
  np.testing.assert_array_equal(np.asarray(got.indices), want)
  # Values are the unbiased scores of the picked entries.
  np.testing.assert_array_equal(np.asarray(got.values), np.take_along_axis(scores, want, -1))
  assert np.asarray(got.valid).all()


def _np_group_limited(choice, k, n_groups, topk_groups):
  out = []
  for row in choice.reshape(-1, choice.shape[-1]):
    groups = row.reshape(n_groups, -1)
    top2 = np.sort(groups, axis=-1)[:, ::-1][:, :min(2, groups.shape[1])].sum(-1)
    kept = np.argsort(-top2, kind="stable")[:topk_groups]
    masked = np.full_like(groups, -np.inf)
    masked[kept] = groups[kept]
    out.append(_np_top_k(masked.reshape(-1), k))
  return np.stack(out).reshape(*choice.shape[:-1], k)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_groups,topk_groups,k", [(4, 2, 3), (8, 4, 8), (16, 3, 2)])
def test_group_limited_selection_matches_reference(seed, n_groups, topk_groups, k):
  rng = np.random.default_rng(seed)
  scores = rng.random((64, 16)).astype(np.float32)
  bias = rng.normal(size=16).astype(np.float32) * 0.1
  got = routing.top_k_select(jnp.asarray(scores), k, bias=jnp.asarray(bias), n_groups=n_groups,
                             topk_groups=topk_groups)
  want = _np_group_limited(scores + bias, k, n_groups, topk_groups)
  np.testing.assert_array_equal(np.asarray(got.indices), want)
  # Every pick lies in one of the topk_groups allowed groups.
  assert (np.unique(want // (16 // n_groups), axis=None).size <= 16)
  per_row_groups = [len(set(r)) for r in (np.asarray(got.indices) // (16 // n_groups))]
  assert max(per_row_groups) <= topk_groups


def test_top_k_select_valid_mask_and_filler():
  scores = jnp.asarray([[0.9, 0.8, 0.1, 0.5]], jnp.float32)
  valid = jnp.asarray([[False, True, True, False]])
  got = routing.top_k_select(scores, 3, valid=valid)
  np.testing.assert_array_equal(np.asarray(got.indices)[0, :2], [1, 2])
  np.testing.assert_array_equal(np.asarray(got.valid)[0], [True, True, False])


def test_top_k_select_rejects_bad_k():
  with pytest.raises(ValueError, match="k=5"):
    routing.top_k_select(jnp.zeros((2, 4)), 5)


def test_gate_normalisations():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  for score_function in ("softmax", "sigmoid"):
    r_none = routing.route_token_choice(logits, 3, score_function=score_function, gate_norm="none")
    scores = np.asarray(routing.router_scores(logits, score_function))
    np.testing.assert_allclose(np.asarray(r_none.gates),
                               np.take_along_axis(scores, np.asarray(r_none.expert_index), -1), rtol=1e-6)
    r_topk = routing.route_token_choice(logits, 3, score_function=score_function, gate_norm="topk",
                                        route_scale=2.5)
    np.testing.assert_allclose(np.asarray(r_topk.gates).sum(-1), 2.5, rtol=1e-5)
    r_soft = routing.route_token_choice(logits, 3, score_function=score_function, gate_norm="softmax_topk")
    picked_logits = np.take_along_axis(np.asarray(logits), np.asarray(r_soft.expert_index), -1)
    want = np.exp(picked_logits) / np.exp(picked_logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(r_soft.gates), want, rtol=1e-5)
  # For softmax scores, Mixtral's softmax over picked logits equals top-k renormalisation.
  a = routing.route_token_choice(logits, 2, gate_norm="softmax_topk").gates
  b = routing.route_token_choice(logits, 2, gate_norm="topk").gates
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def test_gates_are_differentiable_and_float32():
  logits = jax.random.normal(jax.random.key(0), (16, 8), jnp.bfloat16)
  grad = jax.jit(jax.grad(lambda l: routing.route_token_choice(l, 2).gates[:, 0].sum()))(logits)
  assert grad.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad, np.float32)).all()
  assert np.abs(np.asarray(grad, np.float32)).sum() > 0
  assert routing.route_token_choice(logits, 2).gates.dtype == jnp.float32


def test_load_balance_loss_is_alpha_when_uniform_and_rises_with_imbalance():
  num_tokens, num_experts, alpha = 64, 8, 0.01
  uniform_probs = jnp.full((num_tokens, num_experts), 1.0 / num_experts)
  round_robin = jnp.arange(num_tokens * 2).reshape(num_tokens, 2) % num_experts
  loss = routing.load_balance_loss(uniform_probs, round_robin, alpha=alpha)
  np.testing.assert_allclose(float(loss), alpha, rtol=1e-6)
  seq = routing.sequence_balance_loss(uniform_probs.reshape(4, 16, 8), round_robin.reshape(4, 16, 2),
                                      alpha=alpha)
  np.testing.assert_allclose(float(seq), alpha, rtol=1e-6)
  losses = []
  for skew in (0.0, 1.0, 2.0, 4.0):
    logits = jnp.zeros((num_tokens, num_experts)).at[:, 0].add(skew)
    r = routing.route_token_choice(logits + 0.01 * jax.random.normal(jax.random.key(1), logits.shape), 1)
    losses.append(float(routing.load_balance_loss(r.scores, r.expert_index, alpha=alpha)))
  assert losses[0] < losses[1] < losses[2] < losses[3] <= alpha * num_experts + 1e-6, losses


def test_load_balance_loss_gradient_pushes_toward_underloaded_experts():
  logits = jnp.zeros((32, 4)).at[:, 0].add(2.0)
  def loss(l):
    r = routing.route_token_choice(l, 1)
    return routing.load_balance_loss(r.scores, r.expert_index)
  grad = np.asarray(jax.grad(loss)(logits))
  assert np.isfinite(grad).all()
  assert (grad[:, 0] > 0).all() and (grad[:, 1:] < 0).all()  # descent lowers the overloaded expert


def test_z_loss_entropy_maxvio_values():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(10, 6)).astype(np.float32) * 3
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(routing.router_z_loss(jnp.asarray(logits))), np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(routing.normalized_entropy(jnp.full((3, 6), 1 / 6))), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(routing.normalized_entropy(jnp.eye(6))), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(routing.max_violation(jnp.asarray([0.25, 0.25, 0.25, 0.25]))), 0.0,
                             atol=1e-7)
  np.testing.assert_allclose(float(routing.max_violation(jnp.asarray([0.5, 0.25, 0.25, 0.0]))), 1.0,
                             rtol=1e-6)
  load = routing.expert_load(jnp.asarray([[0, 1], [0, 3]]), 4)
  np.testing.assert_allclose(np.asarray(load), [0.5, 0.25, 0.0, 0.25])


def test_bias_update_moves_loads_toward_balance():
  """A skewed sigmoid router: bias balancing alone drives MaxVio from > 1 to small."""
  num_tokens, dim, num_experts, k = 2048, 16, 8, 2
  x = jax.random.normal(jax.random.key(0), (num_tokens, dim))
  w = jax.random.normal(jax.random.key(1), (dim, num_experts)) * 0.3
  w = w.at[:, :2].add(0.4)  # experts 0 and 1 favoured by inputs with positive sums
  logits = x @ w + jnp.asarray([1.5, 1.0, 0, 0, 0, 0, -0.5, -1.0])

  @jax.jit
  def step(bias):
    r = routing.route_token_choice(logits, k, score_function="sigmoid", bias=bias)
    load = routing.expert_load(r.expert_index, num_experts)
    return routing.bias_balance_update(bias, load, 0.02), routing.max_violation(load)

  bias = jnp.zeros(num_experts)
  violations = []
  for _ in range(300):
    bias, vio = step(bias)
    violations.append(float(vio))
  assert violations[0] > 1.0, violations[0]
  assert np.mean(violations[-20:]) < 0.25 * violations[0], (violations[0], violations[-20:])
  # The bias rose for the under-loaded experts and fell for the over-loaded ones.
  assert float(bias[0]) < 0 < float(bias[-1])


def test_expert_choice_select_matches_numpy():
  rng = np.random.default_rng(3)
  scores = rng.random((2, 12, 4)).astype(np.float32)
  slot_token, slot_gate = routing.expert_choice_select(jnp.asarray(scores), 5, route_scale=2.0)
  want = _np_top_k(np.swapaxes(scores, 1, 2), 5)
  np.testing.assert_array_equal(np.asarray(slot_token), want)
  np.testing.assert_allclose(np.asarray(slot_gate), 2.0 * np.take_along_axis(np.swapaxes(scores, 1, 2), want, -1))


@pytest.mark.parametrize("group,k,experts,factor,want", [
    (512, 1, 64, 1.0, 8), (512, 1, 64, 1.25, 10), (100, 1, 10, 1.1, 11), (4, 1, 64, 1.0, 1),
    (8, 2, 2, 4.0, 16)])
def test_expert_capacity(group, k, experts, factor, want):
  assert routing.expert_capacity(group, k, experts, factor) == want


def test_router_module_float32_jitter_and_metadata():
  router = routing.Router(32, 8, selection_bias=True, jitter=0.1, param_dtype=jnp.bfloat16,
                          rngs=nnx.Rngs(0))
  assert router.weight.get_metadata()["logical_axes"] == ("embed", None)
  assert isinstance(router.bias, routing.RouterBias) and not isinstance(router.bias, nnx.Param)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32), jnp.bfloat16)
  train_a, train_b = router.logits(x), router.logits(x)
  assert train_a.dtype == jnp.float32 and train_a.shape == (2, 5, 8)
  assert not np.allclose(np.asarray(train_a), np.asarray(train_b))  # fresh noise per call
  router.eval()
  eval_a, eval_b = router.logits(x), router.logits(x)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  want = np.asarray(x, np.float32) @ np.asarray(router.weight[...], np.float32)
  np.testing.assert_allclose(np.asarray(eval_a), want, rtol=1e-5, atol=1e-6)


def _np_masked_gates(logits, allowed, k, score_function, gate_norm):
  """Reference gates: top-k among the allowed experts, normalised over the allowed picks, 0 for filler."""
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  scores = 1 / (1 + np.exp(-logits)) if score_function == "sigmoid" else exp / exp.sum(-1, keepdims=True)
  gates = np.zeros((logits.shape[0], k), np.float64)
  valid = np.zeros((logits.shape[0], k), bool)
  for n in range(logits.shape[0]):
    picks = [e for e in np.argsort(-np.where(allowed[n], scores[n], -np.inf), kind="stable")[:k] if allowed[n, e]]
    valid[n, :len(picks)] = True
    if not picks:
      continue
    if gate_norm == "none":
      gates[n, :len(picks)] = scores[n, picks]
    elif gate_norm == "topk":
      gates[n, :len(picks)] = scores[n, picks] / scores[n, picks].sum()
    else:
      picked = np.exp(logits[n, picks] - logits[n, picks].max())
      gates[n, :len(picks)] = picked / picked.sum()
  return gates, valid


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("gate_norm", ["none", "topk", "softmax_topk"])
def test_route_token_choice_filler_picks_are_invalid_with_zero_gate(score_function, gate_norm):
  """Tokens with fewer than k allowed experts (mask or a masking bias): filler picks get valid False, gate 0."""
  rng = np.random.default_rng(0)
  num_tokens, num_experts, k = 24, 6, 3
  logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
  allowed = rng.random((num_tokens, num_experts)) < 0.4
  allowed[0], allowed[1] = False, True  # no expert at all; every expert
  got = routing.route_token_choice(jnp.asarray(logits), k, score_function=score_function, gate_norm=gate_norm,
                                   valid=jnp.asarray(allowed))
  want_gates, want_valid = _np_masked_gates(logits.astype(np.float64), allowed, k, score_function, gate_norm)
  assert (~want_valid).any() and want_valid.any()
  gates = np.asarray(got.gates)
  assert not np.isnan(gates).any()
  np.testing.assert_array_equal(np.asarray(got.valid), want_valid)
  np.testing.assert_allclose(gates, want_gates, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("gate_norm", ["none", "topk", "softmax_topk"])
def test_route_token_choice_masking_bias_leaves_filler_picks(score_function, gate_norm):
  """Banning experts by a selection bias at the masked level: three experts left for four picks."""
  logits = np.random.default_rng(1).normal(size=(24, 6)).astype(np.float32)
  banned = np.asarray([0, -1e30, 0, -1e30, -1e30, 0], np.float32)
  got = routing.route_token_choice(jnp.asarray(logits), 4, score_function=score_function, gate_norm=gate_norm,
                                   bias=jnp.asarray(banned))
  want_gates, want_valid = _np_masked_gates(logits.astype(np.float64), np.broadcast_to(banned == 0, logits.shape),
                                            4, score_function, gate_norm)
  assert not np.isnan(np.asarray(got.gates)).any()
  np.testing.assert_allclose(np.asarray(got.gates), want_gates, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(got.valid), want_valid)


def test_expert_load_and_balance_loss_skip_invalid_picks():
  expert_index = jnp.asarray([[0, 1], [2, 0], [3, 3]])
  valid = jnp.asarray([[True, True], [True, False], [True, False]])
  np.testing.assert_allclose(np.asarray(routing.expert_load(expert_index, 4, valid)), [0.25, 0.25, 0.25, 0.25])
  np.testing.assert_allclose(np.asarray(routing.expert_load(expert_index, 4, jnp.zeros((3, 2), bool))), 0.0)
  probs = jnp.full((3, 4), 0.25)
  np.testing.assert_allclose(float(routing.load_balance_loss(probs, expert_index, valid=valid)), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- masked_top_k


def _np_masked_top_k(scores, k, mask, forced):
  """Reference: forced entries (ascending), then allowed ones by decreasing score, ties to the lower index;
  -1 padding past the allowed entries."""
  rows = scores.reshape(-1, scores.shape[-1])
  mask, forced = (np.broadcast_to(m, scores.shape).reshape(rows.shape) for m in (mask, forced))
  out = np.full((len(rows), k), -1)
  for r, (row, allowed, force) in enumerate(zip(rows, mask, forced)):
    order = list(np.flatnonzero(force))
    order += [j for j in np.argsort(-row, kind="stable") if allowed[j] and not force[j]]
    out[r, :min(k, len(order))] = order[:k]
  return out.reshape(*scores.shape[:-1], k)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_masked_top_k_matches_numpy_with_mask_forced_and_padding(seed, k):
  rng = np.random.default_rng(seed)
  scores = rng.permutation(4 * 6 * 7).reshape(4, 6, 7).astype(np.float32)  # tie-free
  mask = rng.random((4, 6, 7)) < 0.5
  forced = rng.random((4, 6, 7)) < 0.15
  got = routing.masked_top_k(jnp.asarray(scores), k, mask=jnp.asarray(mask), forced=jnp.asarray(forced))
  want = _np_masked_top_k(scores, k, mask, forced)
  np.testing.assert_array_equal(np.asarray(got.indices), want)
  np.testing.assert_array_equal(np.asarray(got.valid), want >= 0)
  np.testing.assert_array_equal(np.asarray(got.values), np.where(want >= 0, np.take_along_axis(
      scores, np.maximum(want, 0), -1), 0))
  picked = np.asarray(got.indices)
  for row in picked.reshape(-1, k):  # no entry twice
    listed = row[row >= 0]
    assert len(set(listed)) == len(listed)
  # Forced entries always present (when at most k of them), masked non-forced entries never.
  for r, row in enumerate(picked.reshape(-1, k)):
    f, m = forced.reshape(-1, 7)[r], mask.reshape(-1, 7)[r]
    if f.sum() <= k:
      assert set(np.flatnonzero(f)) <= set(row)
    assert not set(row[row >= 0]) & set(np.flatnonzero(~m & ~f))


def test_masked_top_k_ties_go_to_the_lower_index_and_more_forced_than_k_keeps_the_lowest():
  scores = jnp.asarray([[2.0, 5.0, 5.0, 5.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(routing.masked_top_k(scores, 2).indices), [[1, 2]])
  forced = jnp.asarray([[False, True, False, True, True]])
  np.testing.assert_array_equal(np.asarray(routing.masked_top_k(scores, 2, forced=forced).indices), [[1, 3]])
  # Non-finite scores of allowed entries still rank above masked ones.
  odd = jnp.asarray([[jnp.nan, -jnp.inf, 0.0]])
  got = routing.masked_top_k(odd, 3, mask=jnp.asarray([[True, True, False]]))
  np.testing.assert_array_equal(np.asarray(got.indices), [[0, 1, -1]])


def test_masked_top_k_gives_no_gradient_to_the_scores():
  scores = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
  grad = jax.grad(lambda s: routing.masked_top_k(s, 2).values.sum())(scores)
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_masked_top_k_rejects_a_bad_k():
  with pytest.raises(ValueError, match="k=0"):
    routing.masked_top_k(jnp.zeros((2, 3)), 0)
