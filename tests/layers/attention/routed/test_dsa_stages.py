"""DSA's two training stages (DeepSeek-V3.2-Exp §2.1) in layers/attention/routed/dsa.py, through the model's
Attention layer (wq / wk / wv / wo + the routed module): gradient isolation exactly (== 0, not approximately),
the dense warm-up against the dense-mask reference, and a stage switch keeping the parameters."""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.module import Attention
from sparseformer.layers.attention.routed.config import DSAConfig

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import dsa_reference as ref  # noqa: E402

B, T, H, KVH, D, DIM = 2, 29, 4, 2, 8, 16
THETA = 10_000.0
INDEXER = ("wq", "wk", "k_norm_scale", "k_norm_bias", "w_weights")


def _attention(kind: str, stage: str) -> Attention:
  dsa = DSAConfig(index_heads=3, index_head_dim=8, rope_dim=4, topk=8, block_size=4, key_chunk=8, query_chunk=8,
                  stage=stage, indexer_loss_weight=0.5)
  return Attention(dim=DIM, num_heads=H, num_kv_heads=KVH, head_dim=D, kind=kind,
                   sparse_config=SparseAttentionConfig(block_size=8, backend="xla", dsa=dsa), rope_theta=THETA,
                   init_std=0.4, out_init_std=0.4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _both_gradients(module, x, w):
  """In one jit: the gradients of the LM-side loss sum(out * w) and of aux_loss w.r.t. (params, x), the
  output and aux."""
  graphdef, params = nnx.split(module, nnx.Param)

  @jax.jit
  def run(params, x):
    def forward(params, x):
      out, aux = nnx.merge(graphdef, params)(x, jnp.arange(T))
      return jnp.sum(out * w), aux["aux_loss"], out, aux
    lm_grads = jax.grad(lambda *a: forward(*a)[0], argnums=(0, 1))(params, x)
    aux_grads = jax.grad(lambda *a: forward(*a)[1], argnums=(0, 1))(params, x)
    return lm_grads, aux_grads, *forward(params, x)[2:]

  return run(params, x)


def _split(grads) -> tuple[dict, dict]:
  """(indexer leaves, every other leaf incl. the input's gradient) of ((params, x) gradients)."""
  flat = _flat(grads)
  indexer = {name: g for name, g in flat.items() if "'indexer'" in name}
  assert len(indexer) == len(INDEXER)
  return indexer, {name: g for name, g in flat.items() if "'indexer'" not in name}


@pytest.mark.parametrize("kind, stage", [("dsa", "sparse"), ("dsa_block", "sparse"), ("dsa", "warmup")])
def test_lm_loss_never_reaches_the_indexer_and_indexer_loss_never_reaches_the_model(kind, stage, seed):
  """Exactly zero, both ways: the LM loss gives every indexer parameter a zero gradient (its scores only
  pick indices, or in warm-up are unused), the indexer KL gives wq / wk / wv / wo and the input zero (its
  input and target are detached); the other gradient of each is nonzero."""
  rng = np.random.default_rng(seed)
  x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, T, DIM), (B, T, DIM)))
  lm_grads, aux_grads, out, aux = _both_gradients(_attention(kind, stage), x, w)
  for grads in (lm_grads, aux_grads):
    assert all(np.isfinite(g).all() for g in _flat(grads).values())
  lm_indexer, lm_model = _split(lm_grads)
  aux_indexer, aux_model = _split(aux_grads)
  assert float(aux["aux_loss"]) > 0
  for name, g in lm_indexer.items():
    assert not g.any(), f"LM loss reached {name}"
  for name, g in aux_model.items():
    assert not g.any(), f"indexer loss reached {name}"
  for name, g in lm_model.items():  # wq, wk, wv, wo and x all learn from the LM loss
    assert np.abs(g).max() > 1e-6, name
  for name, g in aux_indexer.items():
    assert np.abs(g).max() > 1e-8, name


def test_warmup_is_dense_causal_attention_and_kl_to_the_dense_target(seed):
  """Warm-up: the output is the layer's dense causal attention (nothing selected, density of the causal
  triangle), and the loss is KL(p || softmax(I)) over every visible key, p the head-mean dense attention,
  times the weight: value and indexer gradients equal the dense reference."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, DIM)), jnp.float32)
  warm, dense = _attention("dsa", "warmup"), _attention("global", "sparse")  # same seed: same wq / wk / wv / wo
  out, aux = jax.jit(lambda x: warm(x, jnp.arange(T)))(x)
  want_out, _ = jax.jit(lambda x: dense(x, jnp.arange(T)))(x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(aux["density"]), (T + 1) / (2 * T), rtol=1e-6)

  # The reference target from the layer's own q, k after RoPE (rope.apply_rope is tested against rotations).
  from sparseformer.layers import rope  # noqa: PLC0415
  q = rope.apply_rope(jnp.einsum("btd,dnh->btnh", x, warm.wq[...]), jnp.arange(T), theta=THETA)
  k = rope.apply_rope(jnp.einsum("btd,dnh->btnh", x, warm.wk[...]), jnp.arange(T), theta=THETA)
  causal = jnp.asarray(np.tril(np.ones((T, T), bool))[None].repeat(B, 0))
  params = {name: getattr(warm.routed.indexer, name)[...] for name in INDEXER}

  def reference_kl(params):
    scores = ref.indexer_scores(params, x, np.arange(T), rope_dim=4, theta=THETA)
    return ref.indexer_kl(q, k, scores, causal)

  want_kl, want_grads = jax.jit(jax.value_and_grad(reference_kl))(params)
  graphdef, state = nnx.split(warm, nnx.Param)
  grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(x, jnp.arange(T))[1]["aux_loss"]))(state)
  np.testing.assert_allclose(float(aux["indexer_kl"]), float(want_kl), rtol=1e-5)
  np.testing.assert_allclose(float(aux["aux_loss"]), 0.5 * float(want_kl), rtol=1e-5)
  for name in INDEXER:
    got, want = np.asarray(grads["routed"]["indexer"][name][...]), 0.5 * np.asarray(want_grads[name])
    assert np.isfinite(got).all() and np.abs(want).max() > 0, name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_stage_switch_keeps_the_parameters():
  """`attention.dsa.stage` changes no parameter: a warm-up layer's state loads into a sparse one."""
  shapes = lambda stage: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(  # noqa: E731
      nnx.eval_shape(lambda: _attention("dsa", stage)), nnx.Param))
  assert jax.tree_util.tree_structure(shapes("warmup")) == jax.tree_util.tree_structure(shapes("sparse"))
  assert jax.tree.leaves(shapes("warmup")) == jax.tree.leaves(shapes("sparse"))
  warm = _attention("dsa", "warmup")
  sparse = nnx.merge(nnx.graphdef(_attention("dsa", "sparse")), nnx.state(warm))
  assert sparse.routed.config.dsa.stage == "sparse"
  np.testing.assert_array_equal(np.asarray(sparse.routed.indexer.wq[...]), np.asarray(warm.routed.indexer.wq[...]))
  assert dataclasses.replace(DSAConfig(), stage="warmup").stage == "warmup"
