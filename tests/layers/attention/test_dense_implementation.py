"""The dense causal attention rule (layers/attention/dense.py) and its non-CPU paths.

Every branch of `dense_attention_implementation` is checked here on CPU; the Pallas dense causal path
runs in interpret mode against `jax.nn.dot_product_attention` (values and gradients); the cuDNN path
needs a CUDA GPU and is skipped elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.layers.attention import dense


@pytest.mark.parametrize("backend, dtype, head_dim, want", [
    ("cpu", jnp.bfloat16, 64, "blocked"),
    ("cpu", jnp.float32, 96, "blocked"),
    ("gpu", jnp.bfloat16, 128, "cudnn"),
    ("gpu", jnp.float16, 64, "cudnn"),
    ("gpu", jnp.bfloat16, 72, "cudnn"),  # a multiple of 8
    ("gpu", jnp.float32, 64, "pallas"),  # cuDNN flash attention is 16-bit only
    ("gpu", jnp.bfloat16, 256, "pallas"),  # over the 128 every cuDNN GPU takes
    ("gpu", jnp.bfloat16, 36, "xla"),  # not a multiple of 8, not a power of two
    ("gpu", jnp.float32, 96, "xla"),  # the Pallas GPU kernel needs a power of two
    ("tpu", jnp.bfloat16, 128, "xla"),
])
def test_rule_covers_every_branch(backend, dtype, head_dim, want):
  assert dense.dense_attention_implementation(backend, dtype, head_dim) == want
  assert want in dense.IMPLEMENTATIONS


def _values_and_grads(fn, q, k, v, d_out):
  out, vjp = jax.vjp(fn, q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *vjp(d_out))]


@pytest.mark.slow  # ~20 s CPU for one interpret-mode fwd+bwd compile (the kernel itself is covered by
# tests/kernels/test_block_sparse_attention.py); suite budget
def test_pallas_dense_causal_matches_reference(seed):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (1, 48, 4, 16))  # T not a block multiple; GQA 4 query heads / 2 kv heads
  k, v = (jax.random.normal(key, (1, 48, 2, 16)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], q.shape)
  got = _values_and_grads(lambda *a: dense.pallas_causal_attention(*a, interpret=True), q, k, v, d_out)
  want = _values_and_grads(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True), q, k, v, d_out)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert not np.isnan(g).any(), name
    assert np.abs(g - w).max() <= 2e-5 * max(1.0, np.abs(w).max()), (name, np.abs(g - w).max())


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a CUDA GPU")
def test_cudnn_path_matches_reference(seed):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (2, 256, 8, 64), jnp.bfloat16)
  k, v = (jax.random.normal(key, (2, 256, 4, 64), jnp.bfloat16) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  assert dense.dense_attention_implementation("gpu", q.dtype, 64) == "cudnn"
  got = _values_and_grads(dense.causal_attention, q, k, v, d_out)
  f32 = lambda *a: jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in a), is_causal=True)
  want = _values_and_grads(f32, q, k, v, d_out.astype(jnp.float32))
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert not np.isnan(g).any(), name
    assert np.abs(g - w).max() <= 3e-2 * max(1.0, np.abs(w).max()), (name, np.abs(g - w).max())
