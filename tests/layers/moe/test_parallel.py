"""Expert parallelism on 8 simulated CPU devices equals the single-device MoE layer.

pytest's own process already runs JAX on one CPU device, so each case runs this
file as a script in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
set before JAX starts. In there, the same layer (same parameters) runs once
without a mesh and once under `jax.set_mesh` with parameters and batch sharded
by the trainer's logical rules; outputs, every auxiliary statistic (global-batch
loads, losses, dropped fraction) and all parameter gradients must agree, and the
compiled sharded program must contain the all-to-all exchange.

Run one case by hand: python tests/layers/moe/test_parallel.py expert4_data2
"""

import os
import subprocess
import sys

import pytest

MESHES = {  # name -> (axis sizes in the trainer's order data, fsdp, tensor, expert; axis type)
    "expert4_data2": ((2, 1, 1, 4), "auto"),
    "fsdp2_tensor2_expert2": ((1, 2, 2, 2), "auto"),
    "expert4_data2_explicit": ((2, 1, 1, 4), "explicit"),
}
CASES = {  # name -> (mesh, MoEConfig overrides per run)
    "expert4_data2": ("expert4_data2", [
        dict(dispatch="dropless_gather", selection_bias=True, seq_aux_loss_alpha=1e-3),
        dict(dispatch="capacity_scatter", capacity_factor=1.0, z_loss_coef=1e-3)]),
    "expert4_data2_other_paths": ("expert4_data2", [
        dict(dispatch="dropless_ragged_dot"), dict(dispatch="capacity_einsum", capacity_factor=1.0),
        dict(routing="expert_choice", dispatch="capacity_scatter", allow_noncausal_routing=True),
        dict(dispatch="dropless_gather", score_function="sigmoid", n_groups=4, topk_groups=2,
             num_shared_experts=1, gather_schedule="batched")]),
    "fsdp2_tensor2_expert2": ("fsdp2_tensor2_expert2", [
        dict(dispatch="dropless_gather"), dict(dispatch="dropless_ragged_dot"),
        dict(dispatch="capacity_scatter", capacity_factor=1.0), dict(dispatch="capacity_einsum")]),
    "expert4_data2_explicit": ("expert4_data2_explicit", [
        dict(dispatch="dropless_gather"), dict(dispatch="capacity_scatter", capacity_factor=1.0)]),
}


@pytest.mark.parametrize("case", [
    "expert4_data2",
    pytest.param("expert4_data2_other_paths", marks=pytest.mark.slow),
    pytest.param("fsdp2_tensor2_expert2", marks=pytest.mark.slow),
    pytest.param("expert4_data2_explicit", marks=pytest.mark.slow),
])
def test_expert_parallel_equals_single_device(case):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, os.path.abspath(__file__), case], env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, f"case {case} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
  assert "OK" in result.stdout, result.stdout


# ----------------------------------------------------------------------------- subprocess side


def _run_case(case: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from sparseformer.layers.moe import MoEFeedForward, after_optimizer_step  # pylint: disable=import-outside-toplevel
  from sparseformer.layers.moe.config import MoEConfig  # pylint: disable=import-outside-toplevel
  from sparseformer.train.sharding import logical_to_spec  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == 8, "XLA_FLAGS must be set before JAX starts"
  mesh_name, runs = CASES[case]
  sizes, axis_type = MESHES[mesh_name]
  kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
  mesh = jax.make_mesh(sizes, ("data", "fsdp", "tensor", "expert"), (kind,) * 4)
  d_model, batch, length = 32, 8, 16
  x = jax.random.normal(jax.random.key(1), (batch, length, d_model))
  cotangent = jax.random.normal(jax.random.key(2), (batch, length, d_model))

  def step(graphdef, params, extra, x):
    def loss(params, extra):
      model = nnx.merge(graphdef, params, extra, copy=True)
      y, aux = model(x)
      return jnp.sum(y * cotangent) + aux["aux_loss"], (y, aux, nnx.state(model, nnx.Not(nnx.Param)))
    (_, (y, aux, extra)), grads = jax.value_and_grad(loss, has_aux=True)(params, extra)
    model = nnx.merge(graphdef, params, extra)
    after_optimizer_step(model)  # bias update from the measured (global) load
    return y, aux, grads, nnx.state(model, nnx.Not(nnx.Param))

  def shard(variable):
    spec = logical_to_spec(tuple(variable.get_metadata()["logical_axes"]), variable.shape, mesh)
    return jax.device_put(variable[...], NamedSharding(mesh, spec))

  for overrides in runs:
    config = MoEConfig(num_experts=8, top_k=2, expert_hidden=24, block_size=4, **overrides)
    graphdef, params, extra = nnx.split(MoEFeedForward(d_model, config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    want = jax.jit(step, static_argnums=0)(graphdef, params, extra, x)
    with jax.set_mesh(mesh):
      sharded_params = jax.tree.map(lambda v: v.replace(shard(v)), params,
                                    is_leaf=lambda v: isinstance(v, nnx.Variable))
      x_sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
      sharded_step = jax.jit(step, static_argnums=0)
      got = sharded_step(graphdef, sharded_params, extra, x_sharded)
      compiled = sharded_step.lower(graphdef, sharded_params, extra, x_sharded).compile().as_text()
    if config.routed_experts > 1 and dict(mesh.shape)["expert"] > 1:
      assert "all-to-all" in compiled, "expected an all-to-all over the expert axis"
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for (path, g), w in zip(flat_got, flat_want):
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      assert np.isfinite(g).all(), f"{overrides} {jax.tree_util.keystr(path)}: non-finite"
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(w).max())),
                                 err_msg=f"{overrides} {jax.tree_util.keystr(path)}")
    aux = want[1]
    if config.dispatch.startswith("capacity") and config.routing == "token_choice":
      assert float(aux["dropped_fraction"]) > 0, "the capacity run should drop something"
    print(f"{case} {overrides}: sharded == single device "
          f"(dropped {float(aux['dropped_fraction']):.3f}, maxvio {float(aux['max_violation']):.3f})")

  if case == "expert4_data2":
    with jax.set_mesh(mesh):
      try:
        MoEFeedForward(d_model, MoEConfig(num_experts=6, top_k=2), rngs=nnx.Rngs(0))
      except ValueError as error:
        assert "not divisible by the mesh axis 'expert'" in str(error), error
      else:
        raise AssertionError("6 experts on an expert axis of 4 must fail at construction")
  print("OK")


if __name__ == "__main__":
  _run_case(sys.argv[1])
