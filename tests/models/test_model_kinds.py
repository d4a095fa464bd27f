"""Models built from every attention kind and FFN kind train and stay causal; sparse kinds that see everything
equal dense."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseformer.layers.attention import backends, builders as layout_builders, kinds as attention_patterns
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.moe import config as moe_config
from sparseformer.models import flops, presets
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train import overrides

SEQ = 64
SPARSE = SparseAttentionConfig(backend="xla", block_size=16, window=24, stride=16, summary_tokens=4, num_global=16,
                               num_random_blocks=1, chunk_size=32, num_sinks=4, layout_factory="test_window8")
SPARSE_KINDS = [kind for kind in attention_patterns.ATTENTION_KINDS if kind != "global"]


@pytest.fixture(autouse=True, scope="module")
def _register_custom_factory():
  attention_patterns.register_layout_factory(
      "test_window8", lambda config, seq_len, num_heads: layout_builders.sliding_window(
          seq_len, block_q=config.block_size, left=8))


def _tiny(**changes) -> ModelConfig:
  return dataclasses.replace(presets.tiny(), **({"max_seq_len": SEQ, "attention": SPARSE} | changes))


def _train_losses(config: ModelConfig, steps: int = 8) -> list[float]:
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, SEQ + 1)), jnp.int32)

  def loss_fn(model):
    logits, aux = model(tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return nll + aux["aux_loss"], nll

  @nnx.jit
  def step(model, optimizer):
    (_, nll), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nll

  return [float(step(model, optimizer)) for _ in range(steps)]


COPY_PERIOD, COPY_VOCAB = 4, 16  # a copy period within every kind's reach (the custom window sees 8 back)


def _copy_batch(rng: np.random.Generator, batch: int) -> jax.Array:
  """[batch, SEQ + 1] tokens: a fresh random COPY_PERIOD-token pattern per row, repeated."""
  pattern = rng.integers(0, COPY_VOCAB, (batch, COPY_PERIOD))
  return jnp.asarray(np.tile(pattern, (1, -(-(SEQ + 1) // COPY_PERIOD)))[:, :SEQ + 1], jnp.int32)


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_every_attention_kind_learns_to_copy(kind):
  """Every target after the first period repeats the token COPY_PERIOD - 1 positions back: only attention can
  fetch it. Without attention a token says nothing about the next, so the best loss is log(COPY_VOCAB)."""
  model = DecoderLM(_tiny(attention_pattern=(kind,), num_layers=1), rngs=nnx.Rngs(0))  # no global layer to help
  optimizer = nnx.Optimizer(model, optax.adam(2e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens):
    def copy_loss(model):
      logits, _ = model(tokens[:, :-1])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
      return nll[:, COPY_PERIOD:].mean()
    loss, grads = nnx.value_and_grad(copy_loss)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  # Each batch is fresh, so the loss of a step (computed before its update) is a held-out loss.
  losses = np.array([float(step(model, optimizer, _copy_batch(rng, 16))) for _ in range(60)])
  assert np.isfinite(losses).all(), losses
  assert losses[-5:].mean() < 0.5 * np.log(COPY_VOCAB), (losses[-5:], np.log(COPY_VOCAB))


def _logit_change_from_token(config: ModelConfig, position: int = 10) -> np.ndarray:
  """[SEQ]: max |logit change| at each position when only token `position` of a random sequence changes."""
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(2).integers(0, 256, (1, SEQ))
  changed = tokens.copy()
  changed[:, position] = (tokens[:, position] + 1) % 256
  logits = np.asarray(model(jnp.asarray(np.concatenate([tokens, changed]), jnp.int32))[0], np.float64)
  assert np.isfinite(logits).all()
  return np.abs(logits[0] - logits[1]).max(axis=-1)


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_changing_token_10_leaves_earlier_logits_unchanged(kind):
  change = _logit_change_from_token(_tiny(attention_pattern=(kind,), num_layers=1))
  assert change[:10].max() < 1e-5, change[:10]
  assert change[10] > 1e-3  # ...and the test can fail: the changed position itself moves


def test_bidirectional_attention_needs_the_opt_in_and_then_sees_the_future():
  attention = dataclasses.replace(SPARSE, causal=False)
  with pytest.raises(ValueError, match=r"model\.attention\.causal=False.*model\.allow_bidirectional_attention=True"):
    _tiny(attention_pattern=("chunked",), attention=attention)
  config = _tiny(attention_pattern=("chunked",), attention=attention, allow_bidirectional_attention=True)
  assert overrides.from_dict(ModelConfig, overrides.to_dict(config)) == config  # config.json keeps the opt-in
  change = _logit_change_from_token(config)
  assert change[:10].min() > 1e-4, change[:10]  # every earlier position of token 10's chunk moves


def test_bigbird_layers_of_one_model_draw_different_random_blocks(monkeypatch):
  attention = dataclasses.replace(SPARSE, block_size=8, window=8, num_global=8)  # 8 blocks: room for random ones
  layouts, attend = [], backends.attend

  def recording_attend(q, k, v, layout, **kwargs):  # the layout each layer really runs
    layouts.append(layout)
    return attend(q, k, v, layout, **kwargs)

  monkeypatch.setattr(backends, "attend", recording_attend)
  for per_layer in (True, False):
    model = DecoderLM(_tiny(attention_pattern=("bigbird",), attention=attention, bigbird_seed_per_layer=per_layer),
                      rngs=nnx.Rngs(0))
    jax.eval_shape(lambda tokens: model(tokens)[0], jax.ShapeDtypeStruct((1, SEQ), jnp.int32))  # trace only
  assert len(layouts) == 4
  per_layer, shared = layouts[:2], layouts[2:]
  assert (per_layer[0].block_table() != per_layer[1].block_table()).any(), "both layers drew the same blocks"
  assert shared[0] is shared[1] is per_layer[0]  # the same layer index gives the same (cached) layout
  again = attention_patterns.build_layout("bigbird", attention, seq_len=SEQ, num_heads=4, layer=1)
  assert again is per_layer[1]


def test_local_window_covering_the_sequence_equals_dense_causal():
  dense = DecoderLM(_tiny(), rngs=nnx.Rngs(3))
  local = DecoderLM(_tiny(attention_pattern=("local",), attention=dataclasses.replace(SPARSE, window=SEQ)),
                    rngs=nnx.Rngs(3))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, SEQ)), jnp.int32)
  want, got = np.asarray(dense(tokens)[0]), np.asarray(local(tokens)[0])
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=2e-4)


def test_narrow_window_changes_outputs():
  dense = DecoderLM(_tiny(), rngs=nnx.Rngs(3))
  local = DecoderLM(_tiny(attention_pattern=("local",)), rngs=nnx.Rngs(3))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, SEQ)), jnp.int32)
  difference = np.abs(np.asarray(dense(tokens)[0]) - np.asarray(local(tokens)[0]))
  assert difference[:, :24].max() < 2e-4 and difference[:, 40:].max() > 1e-3


@pytest.mark.parametrize("ffn_pattern", [pytest.param(("moe",), marks=pytest.mark.slow), ("dense", "moe")])
def test_moe_model_trains_and_reports_per_layer_metrics(ffn_pattern):
  config = _tiny(ffn_pattern=ffn_pattern, moe=moe_config.mixtral(num_experts=4, expert_hidden=64, block_size=16))
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  _, aux = model(jnp.zeros((2, SEQ), jnp.int32))
  moe_layers = [i for i in range(config.num_layers) if config.ffn_kind(i) == "moe"]
  for layer in moe_layers:
    assert f"layer{layer}/moe/dropped_fraction" in aux and f"layer{layer}/moe/expert_load" in aux
  assert float(aux["aux_loss"]) > 0
  losses = _train_losses(config)
  assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0] - 0.3, losses


def test_sparse_flops_count_only_visited_keys():
  dense, local = _tiny(), _tiny(attention_pattern=("local",))
  assert flops.train_flops_per_token(local, SEQ) < flops.train_flops_per_token(dense, SEQ)
  assert flops.attention_density(dense, 0, SEQ) == pytest.approx((SEQ + 1) / (2 * SEQ))
  for kind in ("local", "bigbird", "strided"):
    layout = attention_patterns.build_layout(kind, SPARSE, seq_len=SEQ, num_heads=4)
    assert flops.allowed_pair_fraction(layout) == pytest.approx(layout.token_density())


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_build_and_validate(name):
  config = presets.get(name)
  assert config.num_layers >= 1
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  assert jax.tree.leaves(nnx.state(abstract, nnx.Param))
