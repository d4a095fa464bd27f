"""Expert-parallel dropless receive buffers sized by MoEConfig.ep_buffer_factor (layers/moe/parallel.py).

On 8 simulated CPU devices (mesh data 2 x expert 4; a subprocess, as tests/layers/moe/test_parallel.py):
  * the smallest factor whose buffer holds the fullest (source device, destination shard) share drops
    nothing, and its values and gradients equal the worst-case buffer (factor = expert axis size);
  * one row less drops exactly the overflow;
  * a skewed router (almost every token to experts 0 and 1, i.e. shard 0) with factor 1.0 drops
    exactly sum(max(0, rows - R)) over (device, destination), reported as dropped_fraction, and the
    output equals the expert loop over the kept pairs only (dropless_pallas, interpret mode).

Run by hand: python tests/layers/moe/test_ep_buffer.py
"""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # ~25 s CPU in a subprocess (3 sharded compiles); suite budget
def test_ep_buffer_factor_drops_exactly_the_overflow():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
  assert "OK" in result.stdout, result.stdout


def test_receive_buffer_rows():
  from sparseformer.layers.moe.parallel import receive_buffer_rows  # pylint: disable=import-outside-toplevel
  assert receive_buffer_rows(16, 4, 2.0) == 8
  assert receive_buffer_rows(16, 4, 1.1) == 5  # ceil(4.4)
  assert receive_buffer_rows(16, 4, 4.0) == receive_buffer_rows(16, 4, 9.0) == receive_buffer_rows(16, 4, None) == 16
  assert receive_buffer_rows(16, 4, 0.01) == 1


# ----------------------------------------------------------------------------- subprocess side


def _expected_kept(expert_index, valid, num_devices, experts_per_shard, buffer_rows):
  """NumPy rule: per device (contiguous token chunk) pairs sorted by expert (stable); each destination
  shard keeps its first `buffer_rows` rows."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  n, k = expert_index.shape
  kept = np.zeros((n, k), bool)
  per_device = n // num_devices
  for device in range(num_devices):
    tokens = slice(device * per_device, (device + 1) * per_device)
    flat = np.where(valid[tokens], expert_index[tokens], 10**6).reshape(-1)
    order = np.argsort(flat, kind="stable")
    used = {}
    flat_kept = np.zeros(flat.shape, bool)
    for pair in order:
      if flat[pair] == 10**6:
        continue
      dest = flat[pair] // experts_per_shard
      used[dest] = used.get(dest, 0) + 1
      flat_kept[pair] = used[dest] <= buffer_rows
    kept[tokens] = flat_kept.reshape(per_device, k)
  return kept


def _run() -> None:
  import dataclasses  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from sparseformer.layers import routing  # pylint: disable=import-outside-toplevel
  from sparseformer.layers.moe import MoEFeedForward  # pylint: disable=import-outside-toplevel
  from sparseformer.layers.moe.config import MoEConfig  # pylint: disable=import-outside-toplevel
  from sparseformer.layers.moe.grouped import swiglu  # pylint: disable=import-outside-toplevel
  from sparseformer.train.sharding import logical_to_spec  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == 8, "XLA_FLAGS must be set before JAX starts"
  mesh = jax.make_mesh((2, 1, 1, 4), ("data", "fsdp", "tensor", "expert"), (jax.sharding.AxisType.Auto,) * 4)
  shards, num_devices, num_experts, k = 4, 8, 8, 2
  d_model, batch, length = 16, 8, 8
  rows_per_device = batch * length // num_devices * k  # 16 rows, balanced share 4 per destination
  x = jax.random.normal(jax.random.key(1), (batch, length, d_model))
  cotangent = jax.random.normal(jax.random.key(2), (batch, length, d_model))

  def run(config, x, router_weight=None, grads=True):
    model = MoEFeedForward(d_model, config, rngs=nnx.Rngs(0))
    if router_weight is not None:
      model.router.weight[...] = router_weight
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)

    def step(params, x):
      def loss(params):
        y, aux = nnx.merge(graphdef, params, extra, copy=True)(x)
        return jnp.sum(y * cotangent), (y, aux)
      if not grads:
        return loss(params)[1], None
      (_, out), g = jax.value_and_grad(loss, has_aux=True)(params)
      return out, g

    def shard(v):
      spec = logical_to_spec(tuple(v.get_metadata()["logical_axes"]), v.shape, mesh)
      return v.replace(jax.device_put(v[...], NamedSharding(mesh, spec)))

    with jax.set_mesh(mesh):
      params = jax.tree.map(shard, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
      out = jax.jit(step)(params, jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))))
    return model, out

  def routed_pairs(model, x, config):
    logits = model.router.logits(x.reshape(-1, d_model))
    return routing.route_token_choice(logits, k, score_function=config.score_function,
                                      gate_norm=config.gate_norm, route_scale=config.route_scale)

  def close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      assert not np.isnan(g).any(), f"{what}: NaN"
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(w).max())), err_msg=what)

  # 1. The worst-case buffer, the smallest factor that holds every share, and one row less.
  base = MoEConfig(num_experts=num_experts, top_k=k, expert_hidden=16, block_size=4, ep_buffer_factor=float(shards))
  model, ((y_worst, aux_worst), grads_worst) = run(base, x)
  routed = routed_pairs(model, x, base)
  expert_index, valid = np.asarray(routed.expert_index), np.asarray(routed.valid)
  fullest = max(int(np.bincount(expert_index[d * 8:(d + 1) * 8].reshape(-1) // 2, minlength=shards).max())
                for d in range(num_devices))
  assert fullest < rows_per_device, "the router is too skewed for this check"
  assert float(aux_worst["dropped_fraction"]) == 0.0
  exact = dataclasses.replace(base, ep_buffer_factor=fullest * shards / rows_per_device)
  _, ((y_exact, aux_exact), grads_exact) = run(exact, x)
  assert float(aux_exact["dropped_fraction"]) == 0.0, "a buffer of the fullest share must drop nothing"
  close((y_exact, grads_exact), (y_worst, grads_worst), "exact factor vs worst case")
  smaller = dataclasses.replace(base, ep_buffer_factor=(fullest - 1) * shards / rows_per_device)
  _, ((_, aux_smaller), _) = run(smaller, x, grads=False)
  kept = _expected_kept(expert_index, valid, num_devices, num_experts // shards, fullest - 1)
  assert 0 < (~kept).sum()
  np.testing.assert_allclose(float(aux_smaller["dropped_fraction"]), 1 - kept.sum() / valid.sum(), atol=1e-7)
  print(f"fullest share {fullest} rows: no drop at R={fullest}; {(~kept).sum()} dropped at R={fullest - 1}")

  # 2. A skewed router and factor 1.0 (R = 4 of 16 rows per device): the Pallas path, values checked.
  skewed = dataclasses.replace(base, ep_buffer_factor=1.0, dispatch="dropless_pallas")
  x_skew = x + 1.0
  router_weight = 0.1 * jax.random.normal(jax.random.key(3), (d_model, num_experts))
  router_weight = router_weight.at[:, :2].add(1.0)  # experts 0 and 1 (shard 0) win for x near +1
  model, ((y, aux), _) = run(skewed, x_skew, router_weight, grads=False)
  routed = routed_pairs(model, x_skew, skewed)
  expert_index, valid = np.asarray(routed.expert_index), np.asarray(routed.valid)
  kept = _expected_kept(expert_index, valid, num_devices, num_experts // shards, rows_per_device // shards)
  assert (~kept).mean() > 0.5, "the router should be skewed"
  np.testing.assert_allclose(float(aux["dropped_fraction"]), 1 - kept.sum() / valid.sum(), atol=1e-7)
  weights = model.expert_weights()
  gates = np.where(kept, np.asarray(routed.gates), 0.0)
  x_flat = x_skew.reshape(-1, d_model)
  want = sum(jnp.sum(jnp.where(expert_index == e, gates, 0.0), axis=-1)[:, None]
             * swiglu(x_flat, *(w[e] for w in weights)) for e in range(num_experts))
  close(y.reshape(-1, d_model), want, "skewed router, kept pairs only")
  print(f"skewed: dropped_fraction {float(aux['dropped_fraction']):.4f} == {(~kept).sum()}/{valid.sum()}")
  print("OK")


if __name__ == "__main__":
  _run()
