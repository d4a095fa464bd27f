"""Masks through training: the polynomial schedule, gradual pruning in the optimizer, the after-step hook."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseformer.train.compression import prune_masks


class _Tiny(nnx.Module):
  """Two prunable-named weights and a norm scale, enough for the optimizer wrapper and the hook."""

  def __init__(self):
    key = jax.random.key(0)
    self.blocks = nnx.List([nnx.Dict(ffn=nnx.Dict(w_gate=nnx.Param(jax.random.normal(key, (8, 12))),
                                                  w_down=nnx.Param(jax.random.normal(key, (12, 8)))),
                                     ffn_norm=nnx.Dict(scale=nnx.Param(jnp.ones(8))))])


def test_polynomial_schedule_is_zhu_and_gupta_eq1():
  config = prune_masks.PruningConfig(method="magnitude", target_sparsity=0.8, start_step=10, end_step=50, every=5)
  steps = np.arange(0, 70)
  want = 0.8 * (1 - (1 - np.clip((steps - 10) / 40, 0, 1)) ** 3)
  np.testing.assert_allclose(np.asarray(prune_masks.polynomial_sparsity(steps, config)), want, rtol=1e-6)


@pytest.mark.slow  # ~5 s of CPU (compiles the masked update); run: pytest -m slow -k gradual
def test_gradual_pruning_reaches_the_target_and_keeps_pruned_weights_zero():
  config = prune_masks.PruningConfig(method="magnitude", target_sparsity=0.5, start_step=2, end_step=6, every=2)
  params = nnx.state(_Tiny(), nnx.Param)
  optimizer = prune_masks.with_gradual_pruning(optax.sgd(0.1), config)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  zero_shares = []
  for t in range(1, 9):
    params, state = step(params, state, jax.random.key(t))
    weight = np.asarray(params["blocks"][0]["ffn"]["w_gate"][...])
    mask = np.asarray(state.masks["blocks"][0]["ffn"]["w_gate"][...])
    assert np.all(weight[~mask] == 0)  # exactly zero, every step
    zero_shares.append((weight == 0).mean())
  # Masks change at steps 2, 4, 6 (s = 0, 0.4375, 0.5): floor(s * 96) zeros, held in between.
  np.testing.assert_allclose(zero_shares, [0, 0, 0, 42 / 96, 42 / 96, 0.5, 0.5, 0.5])
  assert np.all(np.asarray(params["blocks"][0]["ffn_norm"]["scale"][...]) != 0)  # norms never pruned


def test_mask_hook_zeroes_exactly_the_masked_weights():
  model = _Tiny()
  mask = np.random.default_rng(0).random((8, 12)) < 0.5
  hook = prune_masks.mask_hook({"blocks/0/ffn/w_gate": mask})
  jax.jit(lambda m: hook(m) or m.blocks[0]["ffn"]["w_gate"][...])  # traceable inside jit
  hook(model)
  weight = np.asarray(model.blocks[0]["ffn"]["w_gate"][...])
  assert np.all(weight[~mask] == 0) and np.all(weight[mask] != 0)


def test_bad_masks_and_configs_are_rejected(tmp_path):
  params = nnx.state(_Tiny(), nnx.Param)
  with pytest.raises(ValueError, match="train.prune_masks=.*no prune_masks.npz"):
    prune_masks.load_masks(str(tmp_path))
  prune_masks.save_masks(str(tmp_path), {"blocks/0/ffn/w_gate": np.ones((8, 3), bool)})
  with pytest.raises(ValueError, match="shape"):
    prune_masks.check_masks(prune_masks.load_masks(str(tmp_path)), params, str(tmp_path))
  with pytest.raises(ValueError, match="does not have"):
    prune_masks.check_masks({"blocks/9/ffn/w_up": np.ones(1, bool)}, params, str(tmp_path))
  for field, value in (("method", "wanda"), ("target_sparsity", 1.0), ("end_step", 0), ("every", 0)):
    with pytest.raises(ValueError, match=f"train.pruning.*{field}"):
      prune_masks.PruningConfig(**{"method": "magnitude", field: value})
