"""Tests of layers/attention/routed/dsa.py, dsa_indexer.py, dsa_gather.py (sparse stage) against the slow
references of dsa_reference.py, written from DeepSeek-V3.2-Exp (eq. 1-2). Errors in NumPy, NaN checked."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.dense import blocked_causal_attention
from sparseformer.layers.attention.routed import dsa, dsa_gather, dsa_indexer, make_routed
from sparseformer.layers.attention.routed.config import DSAConfig

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import dsa_reference as ref  # noqa: E402

B, T, H, KVH, D, DIM = 2, 37, 4, 2, 8, 16  # odd T: no chunk or block size divides it
THETA = 10_000.0


def _close(got, want, *, rtol, atol, name=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.isfinite(got).all(), f"{name}: non-finite values"
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _dsa_config(**changes) -> DSAConfig:
  fields = dict(index_heads=3, index_head_dim=8, rope_dim=4, topk=9, block_size=8, key_chunk=8, query_chunk=16)
  return DSAConfig(**{**fields, **changes})


def _module(kind="dsa", backend="xla", dtype=jnp.float32, **changes):
  config = SparseAttentionConfig(block_size=8, backend=backend, dsa=_dsa_config(**changes))
  return make_routed(kind, dim=DIM, num_heads=H, num_kv_heads=KVH, head_dim=D, config=config, rope_theta=THETA,
                     init_std=0.5, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(3))


def _inputs(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = {"x": (B, T, DIM), "q": (B, T, H, D), "k": (B, T, KVH, D), "v": (B, T, KVH, D), "w": (B, T, H, D)}
  return {name: jnp.asarray(rng.normal(size=shape), dtype) for name, shape in shapes.items()}


def _indexer_params(module) -> dict:
  return {name: getattr(module.indexer, name)[...] for name in ("wq", "wk", "k_norm_scale", "k_norm_bias", "w_weights")}


def _run_module(module, inputs, positions, *, with_aux_loss=True):
  """(out, aux, grads): grads of sum(out * w) (+ aux_loss) w.r.t. q, k, v and the indexer parameters."""
  graphdef, params = nnx.split(module, nnx.Param)

  @jax.jit
  def run(params, q, k, v):
    def loss(params, q, k, v):
      out, aux = nnx.merge(graphdef, params)(inputs["x"], q, k, v, positions)
      loss = jnp.sum(out.astype(jnp.float32) * inputs["w"].astype(jnp.float32))
      return loss + (aux["aux_loss"] if with_aux_loss else 0.0), (out, aux)
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(params, q, k, v)

  (d_params, dq, dk, dv), (out, aux) = run(params, inputs["q"], inputs["k"], inputs["v"])
  d_indexer = {name: d_params["indexer"][name][...] for name in _indexer_params(module)}
  return out, aux, {"q": dq, "k": dk, "v": dv, **d_indexer}


def _run_reference(params, inputs, positions, mask_fn, *, round_to=None):
  """The same (out, kl, grads, mask) from the dense references; the selection mask from NumPy argsort."""
  positions = np.asarray(positions)
  score_fn = lambda params, x: ref.indexer_scores(params, x, positions, rope_dim=4, theta=THETA,  # noqa: E731
                                                  round_to=round_to)
  mask = jnp.asarray(mask_fn(np.asarray(jax.jit(score_fn)(params, inputs["x"]), np.float64)))

  @jax.jit
  def run(params, q, k, v, x, w):
    def loss(params, q, k, v):
      out = ref.masked_attention(q, k, v, mask)
      kl = ref.indexer_kl(q, k, score_fn(params, x), mask)
      return jnp.sum(out * w) + kl, (out, kl)
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(params, q, k, v)

  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  grads, (out, kl) = run(params, *(f32(inputs[name]) for name in ("q", "k", "v", "x", "w")))
  return out, kl, {"q": grads[1], "k": grads[2], "v": grads[3], **grads[0]}, mask


def test_indexer_scores_match_eq1_reference(seed):
  """LightningIndexer features -> tile_scores equal eq. 1 computed densely (LayerNorm'd shared key, partial
  rotate-half RoPE on the first rope_dim dims, weights scaled by H_I^-1/2 d_I^-1/2), [B, T] positions."""
  module = _module()
  inputs = _inputs(seed)
  positions = jnp.asarray(np.random.default_rng(seed).integers(0, 500, size=(B, T)))
  got = jax.jit(lambda x, p: dsa_indexer.dense_scores(module.indexer(x, p)))(inputs["x"], positions)
  want = jax.jit(lambda params, x: ref.indexer_scores(params, x, np.asarray(positions), rope_dim=4, theta=THETA))(
      _indexer_params(module), inputs["x"])
  assert float(np.abs(np.asarray(want)).max()) > 0.1  # not trivially zero
  _close(got, want, rtol=1e-5, atol=1e-5, name="I")


def test_running_top_k_equals_full_top_k(seed):
  """Chunked running top-k (key chunks of 8, query chunks of 16, K = 9 > a key chunk) gives the integer
  indices of a full stable argsort over I[t, :t+1], sorted by decreasing score; t + 1 <= K selects every
  visible key and pads with -1 / invalid; no key twice."""
  rng = np.random.default_rng(seed)
  features = dsa_indexer.IndexerFeatures(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                                           for s in ((B, T, 3, 8), (B, T, 3), (B, T, 8))))
  topk = 9
  selection = jax.jit(lambda f: dsa_indexer.running_top_k(f, topk, key_chunk=8, query_chunk=16))(features)
  index, valid = np.asarray(selection.index), np.asarray(selection.valid)
  scores = np.asarray(dsa_indexer.dense_scores(features), np.float64)
  assert index.shape == valid.shape == (B, T, topk) and index.dtype == np.int32
  for b in range(B):
    for t in range(T):
      want = np.argsort(-scores[b, t, :t + 1], kind="stable")[:topk]
      n = len(want)
      np.testing.assert_array_equal(index[b, t, :n], want, err_msg=f"b={b} t={t}")
      assert valid[b, t, :n].all() and not valid[b, t, n:].any() and (index[b, t, n:] == -1).all()
      assert len(set(index[b, t, :n])) == n


def test_select_blocks_forces_own_block_and_ranks_by_max_pooled_score(seed):
  """dsa_block selection: own block first (forced, counted), others by max-pooled visible score, stable;
  fewer visible blocks than the budget -> -1 padding; no block twice."""
  rng = np.random.default_rng(seed)
  features = dsa_indexer.IndexerFeatures(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                                           for s in ((B, T, 3, 8), (B, T, 3), (B, T, 8))))
  select = jax.jit(lambda f, topk: dsa.select_blocks(f, topk, 8, key_chunk=16, query_chunk=16), static_argnums=1)
  every = np.asarray(select(features, 48))  # topk >= T: every visible block, own block first
  assert every.shape == (B, T, 5)
  for t in range(T):
    assert every[0, t, 0] == t // 8 and set(every[0, t][every[0, t] >= 0]) == set(range(t // 8 + 1))
  block_index = np.asarray(select(features, 24))
  assert block_index.shape == (B, T, 3)
  want = ref.block_choice(np.asarray(dsa_indexer.dense_scores(features), np.float64), 24, 8)
  for b in range(B):
    for t in range(T):
      listed = block_index[b, t][block_index[b, t] >= 0]
      assert listed[0] == t // 8, "own block forced first"
      np.testing.assert_array_equal(listed, want[b][t], err_msg=f"b={b} t={t}")
      assert (block_index[b, t, len(listed):] == -1).all() and len(set(listed)) == len(listed)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dsa_matches_dense_reference_values_and_gradients(dtype, seed):
  """Sparse-stage `dsa` (running top-k + token-gather attention + selected-set KL) equals the dense-mask
  reference: output, KL, dq / dk / dv, and in f32 every indexer parameter's gradient (from the KL); GQA, odd T."""
  module = _module(dtype=dtype)
  inputs = _inputs(seed, dtype)
  positions = jnp.arange(T)
  out, aux, grads = _run_module(module, inputs, positions, with_aux_loss=dtype == jnp.float32)
  round_to = jnp.bfloat16 if dtype == jnp.bfloat16 else None
  want_out, want_kl, want_grads, mask = _run_reference(_indexer_params(module), inputs, positions,
                                                       lambda s: ref.token_topk_mask(s, 9), round_to=round_to)
  tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  assert out.dtype == dtype
  _close(out, want_out, **tol, name="out")
  _close(aux["indexer_kl"], want_kl, **tol, name="kl")
  _close(aux["aux_loss"], want_kl, **tol, name="aux_loss (weight 1)")
  _close(aux["density"], np.asarray(mask).mean(), rtol=1e-6, atol=0, name="density")
  for name in ("q", "k", "v", *(_indexer_params(module) if dtype == jnp.float32 else ())):
    want = want_grads[name]
    scale = float(np.abs(np.asarray(want)).max())
    assert scale > 0, name
    _close(grads[name], want, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0), name=f"d{name}")


def test_token_gather_attention_matches_masked_softmax_with_empty_rows(seed):
  """Token-gather path alone on random (not top-k) selections with duplicate-free slots in random order,
  chunk 8 not dividing T, and one query row selecting nothing (zeros, zero gradient, no NaN)."""
  rng = np.random.default_rng(seed)
  inputs = _inputs(seed)
  slots = 6
  index = np.full((B, T, slots), -1, np.int32)
  for b in range(B):
    for t in range(T):
      n = min(slots, t + 1) if t != 5 else 0
      index[b, t, :n] = rng.choice(t + 1, n, replace=False)
  valid = index >= 0
  mask = np.zeros((B, T, T), bool)
  for b, t, j in zip(*np.nonzero(valid)):
    mask[b, t, index[b, t, j]] = True

  def fast(q, k, v):
    return dsa_gather.token_gather_attention(q, k, v, jnp.asarray(index), jnp.asarray(valid), query_chunk=8)

  def slow(q, k, v):
    return jnp.where(jnp.asarray(mask).any(-1)[..., None, None], ref.masked_attention(q, k, v, jnp.asarray(mask)), 0.0)

  def run(attention):
    loss = lambda *a: (jnp.sum(attention(*a) * inputs["w"]), attention(*a))  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(inputs["q"], inputs["k"], inputs["v"])

  (grads, got), (want_grads, want) = run(fast), run(slow)
  _close(got, want, rtol=1e-5, atol=1e-4)
  assert not np.asarray(got)[:, 5].any()
  for name, g, w in zip("qkv", grads, want_grads):
    _close(g, w, rtol=1e-5, atol=1e-5, name=f"d{name}")
  assert not np.asarray(grads[0])[:, 5].any()


def test_topk_at_least_seq_len_equals_dense_causal(seed):
  """topk >= T: every token selects every visible key, so `dsa` is dense causal attention (dsa_block's
  selection of every visible block is checked in the select_blocks test)."""
  module = _module("dsa", topk=48)
  inputs = _inputs(seed)
  out, aux = jax.jit(lambda *a: module(*a, jnp.arange(T)))(inputs["x"], inputs["q"], inputs["k"], inputs["v"])
  want = jax.jit(blocked_causal_attention, static_argnames="block_size")(inputs["q"], inputs["k"], inputs["v"],
                                                                        block_size=16)
  _close(out, want, rtol=1e-5, atol=1e-5)
  _close(aux["density"], (T + 1) / (2 * T), rtol=1e-6, atol=0)


@functools.cache
def _block_reference(seed):
  """dsa_block's reference (the same for every backend: computed once per seed)."""
  module = _module("dsa_block", topk=24)
  return _run_reference(_indexer_params(module), _inputs(seed), np.arange(T), lambda s: ref.block_topk_mask(s, 24, 8))


@pytest.mark.parametrize("backend,scheme", [("reference", "union"), ("xla", "kv_major"), ("xla", "union"),
                                            ("pallas", "union")])
def test_dsa_block_matches_reference_on_every_backend(backend, scheme, seed):
  """dsa_block (blocks of 8, 3 per token, own block forced) on the traced-layout backends (pallas in
  interpret mode on CPU) and xla's kv_major path (attention.dsa.block_scheme, the default) equals the
  dense-mask reference: output, KL and dq / dk / dv; the indexer's gradients (from the KL, which no backend
  touches) on xla."""
  module = _module("dsa_block", backend=backend, topk=24, block_scheme=scheme)
  inputs = _inputs(seed)
  out, aux, grads = _run_module(module, inputs, jnp.arange(T), with_aux_loss=backend == "xla")
  want_out, want_kl, want_grads, mask = _block_reference(seed)
  assert np.asarray(mask).sum(-1).min() >= 1 and np.asarray(mask).mean() < 0.45  # sparse, never empty
  _close(out, want_out, rtol=1e-5, atol=2e-5, name="out")
  _close(aux["indexer_kl"], want_kl, rtol=1e-5, atol=1e-6, name="kl")
  _close(aux["density"], np.asarray(mask).mean(), rtol=1e-6, atol=0, name="density")
  for name in ("q", "k", "v", *(_indexer_params(module) if backend == "xla" else ())):
    want = want_grads[name]
    _close(grads[name], want, rtol=1e-4, atol=2e-5 * max(float(np.abs(np.asarray(want)).max()), 1.0), name=f"d{name}")


@pytest.mark.parametrize("field, value", [("topk", 0), ("key_chunk", 0), ("query_chunk", 0), ("index_heads", 0),
                                          ("stage", "dense"), ("rope_dim", 5), ("rope_dim", 16),
                                          ("indexer_loss_weight", -1.0), ("block_scheme", "token")])
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"attention.dsa.{field}"):
    _dsa_config(**{field: value})


def test_dsa_block_budget_below_one_block_is_an_error():
  with pytest.raises(ValueError, match=r"attention\.dsa\.topk=4 .*attention\.dsa\.block_size=8"):
    _module("dsa_block", topk=4)


def test_token_gather_attention_rejects_mismatched_selection():
  q, k = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="index"):
    dsa_gather.token_gather_attention(q, k, k, jnp.zeros((1, 3, 2), jnp.int32), jnp.ones((1, 3, 2), bool))


def test_selected_kl_block_gather_equals_token_gather(seed):
  """`selected_indexer_kl(block_size=...)` (whole-block gathers, dsa_block's path) equals the token gather on
  dsa_block's selection: value and the indexer features' gradients; a selection of partial blocks is an error."""
  module, inputs = _module("dsa_block", topk=24), _inputs(seed)
  features = module.indexer(inputs["x"], jnp.arange(T))
  selection = dsa.block_tokens(dsa.select_blocks(features, 24, 8, key_chunk=8, query_chunk=16), 8)
  from sparseformer.layers.attention.routed import dsa_loss  # noqa: PLC0415
  kl = lambda f, bs: dsa_loss.selected_indexer_kl(inputs["q"], inputs["k"], f, selection, query_chunk=16,  # noqa: E731
                                                  block_size=bs)
  got, want = (jax.jit(jax.value_and_grad(kl), static_argnums=1)(features, bs) for bs in (8, None))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _close(g, w, rtol=1e-6, atol=1e-7)
  assert float(want[0]) > 0
  with pytest.raises(ValueError, match="block_size"):
    kl(features, 5)


def test_tile_kl_equals_gathered_kl_over_many_tiles(seed):
  """`dsa_tile_kl.block_indexer_kl` (dsa_block's KL in kv_major tiles from the attention's lse; here tiles of 4
  rows, 3 tiles a lax.map step, so several steps and a padded last one) equals `selected_indexer_kl` on the
  same selection: value and the indexer features' gradients."""
  from sparseformer.layers.attention.routed import dsa_loss, dsa_tile_kl, kv_major  # noqa: PLC0415
  module, inputs = _module("dsa_block", topk=24), _inputs(seed)
  features = module.indexer(inputs["x"], jnp.arange(T))
  block_index = dsa.select_blocks(features, 24, 8, key_chunk=8, query_chunk=16)
  q, k = inputs["q"], inputs["k"]
  _, lse = kv_major.attend_kv_major(q, k, inputs["v"], block_index[:, None], block_kv=8, return_lse=True)
  tiled = lambda f: dsa_tile_kl.block_indexer_kl(q, k, f, block_index, lse, block_size=8, tile=4,  # noqa: E731
                                                 tiles_per_step=3)
  gathered = lambda f: dsa_loss.selected_indexer_kl(q, k, f, dsa.block_tokens(block_index, 8),  # noqa: E731
                                                    query_chunk=16)
  got, want = (jax.jit(jax.value_and_grad(kl))(features) for kl in (tiled, gathered))
  assert float(want[0]) > 0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    _close(g, w, rtol=1e-5, atol=1e-6)
