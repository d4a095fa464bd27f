"""Tests of train/step.py: gradient accumulation against one step on the whole batch.

Semantics under test (the make_train_step docstring): with A micro-batches, losses, gradients and
metrics are the mean over the micro-batches of each one's value (so the LM loss and every per-token
or per-sequence statistic equal one step on the whole batch), while the expert load behind the
auxiliary-loss-free bias update is the load of the whole batch, so the bias equals A = 1.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseformer.layers import moe
from sparseformer.layers.moe.config import MoEConfig
from sparseformer.layers.routing import RouterBias
from sparseformer.models.config import ModelConfig
from sparseformer.train import mesh as mesh_lib, state as state_lib, step as step_lib

BATCH, LENGTH, VOCAB, LEARNING_RATE = 4, 8, 32, 0.1
# MoE statistics that are not means over tokens or sequences: under accumulation, micro-batch means.
NONLINEAR = ("load_balance_loss", "max_violation")


def _sgd_keeping_grads(learning_rate: float) -> optax.GradientTransformation:
  """Plain SGD whose state is the last gradient it was given (so a test can read the step's gradients)."""
  return optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(lambda g: -learning_rate * g, grads), grads))


@functools.cache
def _setup():
  moe_config = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, dispatch="capacity_scatter", capacity_factor=1.0,
                         aux_loss_alpha=0.05, z_loss_coef=1e-3, seq_aux_loss_alpha=1e-2, selection_bias=True,
                         bias_update_rate=0.1)
  config = ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                       max_seq_len=LENGTH, ffn_pattern=("moe",), moe=moe_config)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1])
  setup = state_lib.setup_model(config, lambda params: _sgd_keeping_grads(LEARNING_RATE), mesh, seed=0)
  state = state_lib.init_train_state(config, setup, seed=0)
  # Router logits of order 1 (the init keeps them near 0, routing every token alike) and a smaller
  # nonzero selection bias that steers without deciding: micro-batches then load the experts differently.
  is_variable = lambda v: isinstance(v, nnx.Variable)
  params = jax.tree_util.tree_map_with_path(
      lambda path, v: v.replace(v[...] * 30.0) if "router" in jax.tree_util.keystr(path) else v,
      state.params, is_leaf=is_variable)
  extra = jax.tree.map(lambda v: v.replace(0.02 * jax.random.normal(jax.random.key(3), v.shape))
                       if isinstance(v, RouterBias) else v, state.extra, is_leaf=is_variable)
  return setup, state.replace(params=params, extra=extra)


@functools.cache
def _step(accum_steps: int):
  setup, _ = _setup()
  return jax.jit(step_lib.make_train_step(setup, accum_steps=accum_steps, learning_rate=lambda step: LEARNING_RATE,
                                          after_optimizer_step=moe.after_optimizer_step))


def _batch(seed: int = 0) -> dict:
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LENGTH + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def _numpy(tree) -> dict:
  """{path: float64 array} of a pytree (Variables unwrapped), every leaf checked for NaN and inf."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {jax.tree_util.keystr(path): np.asarray(leaf, np.float64) for path, leaf in flat}
  for name, value in out.items():
    assert not np.isnan(value).any() and np.isfinite(value).all(), f"{name}: non-finite"
  return out


def _assert_trees_close(got, want, what: str, rtol: float = 2e-5):
  got, want = _numpy(got), _numpy(want)
  assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys()))
  for name in want:
    error = float(np.max(np.abs(got[name] - want[name]), initial=0.0))
    scale = max(float(np.max(np.abs(want[name]), initial=0.0)), 1e-3)
    assert error <= rtol * scale, f"{what} {name}: max error {error:.3g} at scale {scale:.3g}"


def _layer_metrics(metrics: dict, linear: bool) -> dict:
  keys = [k for k in metrics if "/moe/" in k and (k.rsplit("/", 1)[-1] in NONLINEAR) != linear]
  assert keys
  return {k: metrics[k] for k in keys}


@pytest.mark.parametrize("accum_steps", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_accumulation_equals_one_step_on_the_whole_batch(accum_steps):
  """An MoE layer with bias balancing, Switch, z- and sequence losses: one optimizer step, A vs 1 micro-batch."""
  setup, state = _setup()
  batch = _batch(6)
  whole_state, whole_metrics = _step(1)(state, batch)
  accum_state, accum_metrics = _step(accum_steps)(state, batch)
  # Reference of the mean semantics: A = 1 on each micro-batch (rows a, a + A, ...), averaged.
  micro = [_step(1)(state, jax.tree.map(lambda x: x[a::accum_steps], batch)) for a in range(accum_steps)]
  mean = lambda trees: jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)
  micro_metrics = mean([m for _, m in micro])
  micro_grads = mean([s.opt_state for s, _ in micro])

  assert bool(accum_metrics["finite"])
  micro_loads = [[v for k, v in _numpy(s.extra).items() if "load" in k] for s, _ in micro]
  assert not all(np.array_equal(m[0], micro_loads[0][0]) for m in micro_loads), "micro-batches load alike"
  # The LM loss and the per-token / per-sequence statistics: equal to one step on the whole batch.
  _assert_trees_close(accum_metrics["loss"], whole_metrics["loss"], "lm loss")
  _assert_trees_close(_layer_metrics(accum_metrics, linear=True), _layer_metrics(whole_metrics, linear=True),
                      "linear MoE metrics")
  # Total loss, aux loss, batch-level balance statistics and every gradient: the micro-batch means.
  for name in ("total_loss", "aux_loss", "loss"):
    _assert_trees_close(accum_metrics[name], micro_metrics[name], name)
  _assert_trees_close(_layer_metrics(accum_metrics, linear=False), _layer_metrics(micro_metrics, linear=False),
                      "nonlinear MoE metrics")
  _assert_trees_close(accum_state.opt_state, micro_grads, "gradients")
  grad_norm = np.sqrt(sum(np.sum(g ** 2) for g in _numpy(micro_grads).values()))
  _assert_trees_close(accum_metrics["grad_norm"], grad_norm, "grad norm")
  _assert_trees_close(accum_state.params, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, state.params, micro_grads),
                      "updated parameters")
  # The measured load and the bias after the update: those of the whole batch (the loads are multiples of
  # 1 / 64 here, so their means are exact and sign(mean_load - load) cannot flip by rounding).
  got_extra, want_extra = _numpy(accum_state.extra), _numpy(whole_state.extra)
  assert got_extra.keys() == want_extra.keys()
  for name in sorted(want_extra, key=lambda name: "bias" not in name):  # the bias first, then the load
    np.testing.assert_array_equal(got_extra[name], want_extra[name], err_msg=name)
  loads = [v for k, v in want_extra.items() if "load" in k]
  biases = [v - b for (k, v), b in zip(want_extra.items(), _numpy(state.extra).values()) if "bias" in k]
  assert len(loads) == 1 and len(biases) == 1 and any(np.abs(b).sum() > 0 for b in biases)


# -- loss masks: the masked loss and the accuracies against NumPy, dense model (one compile per step kind)

MASK_VOCAB = 16


@functools.cache
def _dense_setup():
  config = ModelConfig(vocab_size=MASK_VOCAB, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                       max_seq_len=LENGTH)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1])
  setup = state_lib.setup_model(config, lambda params: _sgd_keeping_grads(LEARNING_RATE), mesh, seed=0)
  return setup, state_lib.init_train_state(config, setup, seed=0)


@functools.cache
def _dense_step(accum_steps: int):
  setup, _ = _dense_setup()
  return jax.jit(step_lib.make_train_step(setup, accum_steps=accum_steps, learning_rate=lambda step: LEARNING_RATE))


def _masked_batch(seed: int, batch: int = BATCH) -> dict:
  """Random tokens and a 0/1 mask with uneven counts per row (row 1 unlabelled), as numpy."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MASK_VOCAB, (batch, LENGTH + 1))
  mask = (rng.random((batch, LENGTH)) < 0.4).astype(np.float32)
  mask[0] = 1.0  # micro-batch 0 (rows 0, 2) holds many more labels than micro-batch 1 (rows 1, 3)
  mask[1] = 0.0
  mask[3, :] = 0.0
  mask[3, 2] = 1.0
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32), "loss_mask": mask}


def _numpy_reference(state, batch: dict) -> dict:
  """Masked mean NLL and both accuracies computed in float64 NumPy from the model's logits."""
  setup, _ = _dense_setup()
  model = nnx.merge(setup.graphdef, state.params, state.extra)
  logits = np.asarray(model(jnp.asarray(batch["inputs"]))[0], np.float64)
  assert not np.isnan(logits).any()
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
  mask = batch["loss_mask"].astype(np.float64)
  right = (logits.argmax(-1) == batch["targets"]) & (mask > 0)
  labelled = (mask > 0).any(-1)
  all_right = labelled & (right.sum(-1) == (mask > 0).sum(-1))
  return {"loss": (nll * mask).sum() / mask.sum(), "unmasked_loss": nll.mean(),
          "token_accuracy": right.sum() / (mask > 0).sum(), "example_accuracy": all_right.sum() / labelled.sum(),
          "micro_mean_loss": np.mean([(nll[a::2] * mask[a::2]).sum() / mask[a::2].sum() for a in range(2)])}


def _close(got, want, what, rtol=2e-5):
  got = float(np.asarray(got))
  assert not np.isnan(got), what
  assert abs(got - want) <= rtol * max(abs(want), 1e-3), f"{what}: {got} vs {want}"


def test_masked_loss_and_accuracies_equal_numpy(seed):
  _, state = _dense_setup()
  batch = _masked_batch(seed)
  want = _numpy_reference(state, batch)
  _, metrics = _dense_step(1)(state, jax.tree.map(jnp.asarray, batch))
  _close(metrics["loss"], want["loss"], "masked loss")
  _close(metrics["token_accuracy"], want["token_accuracy"], "token accuracy")
  _close(metrics["example_accuracy"], want["example_accuracy"], "example accuracy")
  assert abs(want["loss"] - want["unmasked_loss"]) > 1e-3  # the mask matters on this batch
  # Eval sums give the same numbers.
  setup, _ = _dense_setup()
  summary = step_lib.summarize_eval([jax.jit(step_lib.make_eval_step(setup))(state, batch)], bits_per_byte=False)
  for name in ("loss", "token_accuracy", "example_accuracy"):
    _close(summary[name], want[name], f"eval {name}")
  assert "bits_per_byte" not in summary


def test_masked_accumulation_equals_one_step_on_the_whole_batch(seed):
  """A = 2 with micro-batches of very different label counts: loss and gradients equal A = 1 exactly, not the
  mean of the micro-batch means."""
  _, state = _dense_setup()
  batch = jax.tree.map(jnp.asarray, _masked_batch(seed))
  whole_state, whole = _dense_step(1)(state, batch)
  accum_state, accum = _dense_step(2)(state, batch)
  want = _numpy_reference(state, _masked_batch(seed))
  _close(accum["loss"], want["loss"], "accumulated masked loss")
  assert abs(want["micro_mean_loss"] - want["loss"]) > 1e-3  # the test separates the two definitions
  for name in ("token_accuracy", "example_accuracy", "total_loss"):
    _close(accum[name], float(whole[name]), name)
  _assert_trees_close(accum_state.opt_state, whole_state.opt_state, "gradients", rtol=5e-5)


@pytest.mark.slow  # 20 s; the LM path's loss is also held by every text-training test
def test_an_all_ones_mask_gives_the_unmasked_language_model_loss():
  _, state = _dense_setup()
  batch = _masked_batch(1)
  batch["loss_mask"] = np.ones_like(batch["loss_mask"])
  want = _numpy_reference(state, batch)["unmasked_loss"]
  _, with_mask = _dense_step(1)(state, jax.tree.map(jnp.asarray, batch))
  _, without = _dense_step(1)(state, {k: jnp.asarray(v) for k, v in batch.items() if k != "loss_mask"})
  _close(with_mask["loss"], want, "all-ones mask")
  _close(without["loss"], want, "no mask")
