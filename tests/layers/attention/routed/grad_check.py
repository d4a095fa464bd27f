"""Shared by the routed-attention tests: values and q/k/v gradients of an attention function, compared in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np


def values_and_grads(fn, q, k, v):
  """[fn(q, k, v), dq, dk, dv] of <fn(q, k, v), a fixed random cotangent>."""
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)
  return [fn(q, k, v), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v)]


def assert_close(got, want, atol, rtol):
  """Each pair within atol + rtol * max|want|, with no NaN (errors computed in NumPy)."""
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert not np.isnan(g).any()
    err, scale = np.abs(g - w).max(), np.abs(w).max()
    assert err <= atol + rtol * scale, (err, scale)
