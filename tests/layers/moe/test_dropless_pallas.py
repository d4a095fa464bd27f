"""dispatch="dropless_pallas" (the Pallas grouped matmul, interpret mode on CPU) through the MoE layer equals
dispatch="dropless_gather": outputs, every auxiliary statistic and every parameter gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.layers.moe import MoEFeedForward
from sparseformer.layers.moe.config import DROPLESS_DISPATCHES, MoEConfig


def _layer_values_and_grads(config, x, cotangent):
  graphdef, params, extra = nnx.split(MoEFeedForward(x.shape[-1], config, rngs=nnx.Rngs(0)), nnx.Param, ...)

  @jax.jit
  def step(params, x):
    def loss(params):
      y, aux = nnx.merge(graphdef, params, extra, copy=True)(x)
      return jnp.sum(y * cotangent) + aux["aux_loss"], (y, aux)
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  return step(params, x)


def test_dropless_pallas_equals_dropless_gather(seed):
  assert "dropless_pallas" in DROPLESS_DISPATCHES
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (2, 16, 32))
  cotangent = jax.random.normal(keys[1], x.shape)
  gather = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, dispatch="dropless_gather", block_size=8,
                     z_loss_coef=1e-3)
  pallas = dataclasses.replace(gather, dispatch="dropless_pallas")
  assert pallas.dropless
  got, want = _layer_values_and_grads(pallas, x, cotangent), _layer_values_and_grads(gather, x, cotangent)
  flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)
  assert len(flat_got) == len(flat_want)
  for (path, g), w in zip(flat_got, flat_want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert not np.isnan(g).any(), jax.tree_util.keystr(path)
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(w).max())),
                               err_msg=jax.tree_util.keystr(path))
  assert float(np.abs(np.asarray(want[1].router.weight[...])).max()) > 0  # the router gets a gradient
