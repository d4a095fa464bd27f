"""Decoder LM: causality, GQA, RoPE, config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers import rope
from sparseformer.layers.attention import Attention
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM

TINY = ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, max_seq_len=32)


def test_changing_future_tokens_leaves_past_outputs_unchanged():
  model = DecoderLM(TINY, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, TINY.vocab_size, (2, 24)).astype(np.int32)
  cut = 11
  changed = tokens.copy()
  changed[:, cut + 1:] = rng.integers(0, TINY.vocab_size, (2, 24 - cut - 1))
  before = np.asarray(model(jnp.asarray(tokens))[0])
  after = np.asarray(model(jnp.asarray(changed))[0])
  assert np.isfinite(before).all() and np.isfinite(after).all()
  np.testing.assert_allclose(before[:, :cut + 1], after[:, :cut + 1], atol=1e-5)
  # ...and the test can fail: positions after the cut do change.
  assert np.abs(before[:, cut + 1:] - after[:, cut + 1:]).max() > 1e-3


def _plain_mha(x, wq, wk, wv, wo, theta):
  """Textbook multi-head causal attention in NumPy (f64), heads looped explicitly."""
  x, wq, wk, wv, wo = (np.asarray(a, np.float64) for a in (x, wq, wk, wv, wo))
  batch, length, _ = x.shape
  positions = jnp.arange(length)
  out = np.zeros((batch, length, wq.shape[1], wq.shape[2]))
  for h in range(wq.shape[1]):
    q = np.asarray(rope.apply_rope(jnp.asarray(np.einsum("btd,dk->btk", x, wq[:, h])[:, :, None]), positions,
                                   theta=theta))[:, :, 0].astype(np.float64)
    k = np.asarray(rope.apply_rope(jnp.asarray(np.einsum("btd,dk->btk", x, wk[:, h])[:, :, None]), positions,
                                   theta=theta))[:, :, 0].astype(np.float64)
    v = np.einsum("btd,dk->btk", x, wv[:, h])
    scores = np.einsum("bqk,bsk->bqs", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[:, :, h] = np.einsum("bqs,bsk->bqk", probs, v)
  return np.einsum("btnk,nkd->btd", out, wo)


def _attention(num_kv_heads, seed=0):
  return Attention(dim=32, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8, kind="global",
                   sparse_config=SparseAttentionConfig(), rope_theta=10_000.0, init_std=0.2, out_init_std=0.2,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def test_attention_with_as_many_kv_heads_as_heads_equals_plain_mha():
  attention = _attention(num_kv_heads=4)
  x = np.random.default_rng(0).normal(size=(2, 10, 32)).astype(np.float32)
  got, aux = attention(jnp.asarray(x), jnp.arange(10))
  got = np.asarray(got)
  assert aux == {}
  want = _plain_mha(x, attention.wq[...], attention.wk[...], attention.wv[...], attention.wo[...], 10_000.0)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_gqa_equals_mha_with_kv_heads_repeated_across_each_group():
  gqa = _attention(num_kv_heads=2, seed=3)
  x = np.random.default_rng(1).normal(size=(2, 9, 32)).astype(np.float32)
  repeat = lambda w: np.repeat(np.asarray(w), 2, axis=1)  # query heads 0,1 share kv head 0
  want = _plain_mha(x, gqa.wq[...], repeat(gqa.wk[...]), repeat(gqa.wv[...]), gqa.wo[...], 10_000.0)
  got = np.asarray(gqa(jnp.asarray(x), jnp.arange(9))[0])
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(q_pos, k_pos):
    rq = rope.apply_rope(q, jnp.array([q_pos]), theta=10_000.0)
    rk = rope.apply_rope(k, jnp.array([k_pos]), theta=10_000.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
  assert score(5, 5) == pytest.approx(float(jnp.sum(q * k)), abs=1e-5)
  assert abs(score(7, 3) - score(7, 5)) > 1e-3  # a different offset gives a different score


def test_bf16_compute_keeps_f32_params_and_returns_f32_logits():
  config = dataclasses.replace(TINY, dtype="bfloat16")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  logits, _ = model(jnp.zeros((1, 8), jnp.int32))
  assert logits.dtype == jnp.float32
  assert model.blocks[0].attention.wq[...].dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_untied_embeddings_have_a_separate_head():
  model = DecoderLM(dataclasses.replace(TINY, tie_embeddings=False), rngs=nnx.Rngs(0))
  assert model.lm_head[...].shape == (64, TINY.vocab_size)


def test_parameters_carry_logical_axes():
  model = DecoderLM(TINY, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  axes = {v.get_metadata()["logical_axes"] for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert ("embed", "heads", "head_dim") in axes and ("vocab", "embed") in axes and ("mlp", "embed") in axes


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
    (dict(d_model=65), "d_model"),
    (dict(dtype="float16"), "dtype"),
    (dict(ffn_pattern=("dense", "sparse")), "ffn_pattern"),
    (dict(num_layers=0), "num_layers"),
    (dict(attention=SparseAttentionConfig(causal=False)), "allow_bidirectional_attention"),
])
def test_invalid_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(TINY, **changes)


def test_layer_schedules_cycle():
  config = dataclasses.replace(TINY, num_layers=4, ffn_pattern=("dense", "moe"))
  assert [config.ffn_kind(i) for i in range(4)] == ["dense", "moe", "dense", "moe"]
