"""Models built from every attention kind and FFN kind train; sparse kinds that see everything equal dense."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseformer.layers.attention import builders as layout_builders, kinds as attention_patterns
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.moe import config as moe_config
from sparseformer.models import flops, presets
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM

SEQ = 64
SPARSE = SparseAttentionConfig(backend="xla", block_size=16, window=24, stride=16, summary_tokens=4, num_global=16,
                               num_random_blocks=1, chunk_size=32, num_sinks=4, layout_factory="test_window8")


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


@pytest.mark.parametrize("kind", [k for k in attention_patterns.ATTENTION_KINDS if k != "global"])
def test_every_attention_kind_trains_with_falling_loss(kind):
  losses = _train_losses(_tiny(attention_pattern=(kind, "global")))
  assert np.isfinite(losses).all(), losses
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses


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


@pytest.mark.parametrize("ffn_pattern", [("moe",), ("dense", "moe")])
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
