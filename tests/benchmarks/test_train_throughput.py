"""benchmarks/train_throughput.py: the plain baseline runs in the model's dtypes, and the steps interleave."""

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.benchmarks import train_throughput as bench
from sparseformer.models import presets


def _dot_input_dtypes(config) -> set:
  params = bench.plain_params(config)
  tokens = jnp.zeros((1, 16), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: bench.plain_loss(config, p, tokens, tokens))(params)  # the forward
  return {str(var.aval.dtype) for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general"
          for var in eqn.invars}


def test_plain_baseline_follows_dtype_and_param_dtype():
  config = presets.get("tiny", dtype="bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(bench.plain_params(config))} == {jnp.dtype(config.param_dtype)}
  assert _dot_input_dtypes(config) == {"bfloat16"}  # every matmul in bf16, as in our step (was all f32)
  assert _dot_input_dtypes(presets.get("tiny")) == {"float32"}


def test_steps_interleave_after_a_discarded_call():
  calls = []

  def runner(name, seconds):
    def run():
      calls.append(name)
      return seconds
    return run

  medians = bench.interleaved_median_seconds({"ours": runner("ours", 1.0), "plain": runner("plain", 2.0)}, steps=3)
  assert calls == ["ours", "plain", "ours", "plain", "plain", "ours", "ours", "plain"]
  assert medians == {"ours": 1.0, "plain": 2.0}


def test_plain_step_runs_with_finite_loss():
  config = presets.get("tiny")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 17)), jnp.int32)
  run = bench.plain_stepper(config, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  assert all(np.isfinite(run()) for _ in range(2))
