"""Models with content-routed attention layers (moba, nsa, dsa, dsa_block) train, stay causal and report their
attention metrics; MoBA's FLOP density matches the one it measures."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.routed import ROUTED_KINDS
from sparseformer.layers.attention.routed.config import DSAConfig, MoBAConfig, NSAConfig
from sparseformer.models import flops, presets
from sparseformer.models.decoder import DecoderLM

SEQ = 48
SPARSE = SparseAttentionConfig(
    backend="xla", block_size=8, window=16, moba=MoBAConfig(block_size=8, topk=2, kv_major_tile=16),
    nsa=NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=16, gate_hidden=8),
    dsa=DSAConfig(index_heads=2, index_head_dim=8, topk=16, block_size=8, key_chunk=16, query_chunk=16, rope_dim=4))


def _model_config(kind: str):
  return dataclasses.replace(presets.tiny(), max_seq_len=SEQ, attention=SPARSE, attention_pattern=("local", kind))


# dsa_block in the slow run only (suite budget): it shares dsa's indexer and training path and moba's block path,
# and the slow 4-kind CLI test (tests/train/test_cli_routed.py) trains it.
@pytest.mark.parametrize("kind", [pytest.param(kind, marks=[pytest.mark.slow] if kind == "dsa_block" else [])
                                  for kind in ROUTED_KINDS])
def test_local_plus_routed_model_trains_and_logs_attention_metrics(kind):
  config = _model_config(kind)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, SEQ + 1)), jnp.int32)

  def loss_fn(model):
    logits, aux = model(tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return nll + aux["aux_loss"], (nll, aux)

  @nnx.jit
  def step(model, optimizer):
    (_, (nll, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nll, aux

  losses, aux = [], {}
  for _ in range(6):
    nll, aux = step(model, optimizer)
    losses.append(float(nll))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
  metrics = {name: float(value) for name, value in aux.items()}
  assert np.isfinite(list(metrics.values())).all()
  assert not any(name.startswith("layer0/attention/") for name in metrics)  # the local layer reports nothing
  routed = {name for name in metrics if name.startswith("layer1/attention/")}
  assert routed, metrics
  if "layer1/attention/density" in metrics:
    assert 0 < metrics["layer1/attention/density"] <= 1
  if kind == "moba":  # the FLOP count's density is the one the layer measures (over causal pairs)
    expected = flops.attention_density(config, 1, SEQ) * SEQ**2 / (SEQ * (SEQ + 1) / 2)
    assert abs(metrics["layer1/attention/density"] - expected) < 1e-6


@pytest.mark.parametrize("kind", ROUTED_KINDS)
def test_routed_model_is_causal(kind):
  model = DecoderLM(_model_config(kind), rngs=nnx.Rngs(1))
  tokens = np.random.default_rng(1).integers(0, 256, (1, SEQ))
  changed = tokens.copy()
  changed[0, 30] = (changed[0, 30] + 1) % 256
  forward = nnx.jit(lambda model, tokens: model(tokens)[0])
  before, after = (np.asarray(forward(model, jnp.asarray(t, jnp.int32))) for t in (tokens, changed))
  assert np.isfinite(before).all() and np.isfinite(after).all()
  np.testing.assert_array_equal(before[0, :30], after[0, :30])
  assert np.abs(before[0, 30:] - after[0, 30:]).max() > 0


@pytest.mark.parametrize("name", ["moba_small", "nsa_small", "dsa_small"])
def test_routed_presets_are_sparser_than_dense(name):
  config = presets.get(name)
  density = flops.attention_density(config, 0, config.max_seq_len)
  assert 0 < density < 0.5 * (config.max_seq_len + 1) / (2 * config.max_seq_len) * 1.01
