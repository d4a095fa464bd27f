"""models/decode.py: prefill + decode of a DecoderLM equal its forward pass at every position (sparse kinds with
a per-head layout and a ring, dropless MoE and a capacity-configured MoE layer), a mixed-length batch equals each
prompt decoded alone, bad input is a clear error, and the cache's logical axes go through the sharding rules."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.moe import layer as moe_layer
from sparseformer.layers.moe.config import MoEConfig
from sparseformer.models import decode
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train import sharding

SEQ, VOCAB = 48, 64
ATTENTION = SparseAttentionConfig(backend="xla", block_size=8, window=8, num_global=8, num_random_blocks=1,
                                  random_per_head=True, num_sinks=4)
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, block_size=8)


def _model(**changes) -> DecoderLM:
  config = ModelConfig(**{**dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                                 max_seq_len=SEQ, attention=ATTENTION), **changes})
  return nnx.jit(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))()  # one compile, not one per initialiser


def _abstract_model(**changes) -> DecoderLM:
  """A model with abstract parameters (no compile): enough for the checks init_cache makes."""
  config = ModelConfig(**{**dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                                 max_seq_len=SEQ, attention=ATTENTION), **changes})
  return nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))


def _tokens(batch: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, VOCAB, (batch, SEQ)).astype(np.int32)


def _run(model, tokens: np.ndarray, lengths: np.ndarray, prompt_len: int, steps: int) -> np.ndarray:
  """Logits f32 [steps + 1, B, V]: prefill of tokens[b, :lengths[b]] then `steps` decodes of the true next
  tokens; entry s of row b is at position lengths[b] - 1 + s."""
  frozen = decode.snapshot(model)
  cache = decode.init_cache(model, len(tokens), SEQ)
  logits, cache = decode.prefill(frozen, tokens[:, :prompt_len], lengths, cache)
  out = [np.asarray(logits)]
  for step in range(steps):
    logits, cache = decode.decode(frozen, cache, tokens[np.arange(len(tokens)), lengths + step])
    out.append(np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(cache["lengths"]), lengths + steps)
  return np.stack(out)


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
  assert np.isfinite(actual).all() and np.isfinite(expected).all(), what
  error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert error < 1e-5, f"{what}: relative error {error:.2e}"


def _forward(model, tokens: np.ndarray) -> tuple[np.ndarray, dict]:
  """The full forward pass in eval mode, jitted: (logits [B, T, V], aux)."""
  model.eval()
  logits, aux = nnx.jit(lambda model, tokens: model(tokens))(model, jnp.asarray(tokens))
  return np.asarray(logits), aux


@pytest.fixture(scope="module")
def sparse_moe_model():
  """Layer 0 bigbird with per-head random blocks + dropless MoE, layer 1 local (window 8: the ring wraps)."""
  return _model(attention_pattern=("bigbird", "local"), ffn_pattern=("moe", "dense"), moe=MOE)


LENGTHS = np.array([7, 20])  # a mixed-length batch: rows decode from different positions
STEPS = SEQ - int(LENGTHS.max())


def test_decode_equals_forward_at_every_position(sparse_moe_model):
  """Each row of a mixed-length batch equals the forward pass at every position it prefills or decodes."""
  model, tokens = sparse_moe_model, _tokens(2)
  full, _ = _forward(model, tokens)
  batched = _run(model, tokens, LENGTHS, prompt_len=24, steps=STEPS)
  for row, length in enumerate(LENGTHS):
    _assert_close(batched[:, row], full[row, length - 1 + np.arange(STEPS + 1)], f"row {row} vs forward")


@pytest.mark.slow  # two more compiles (batch 1); the test above already holds every row to the forward pass
def test_mixed_batch_rows_equal_each_prompt_alone(sparse_moe_model):
  model, tokens = sparse_moe_model, _tokens(2)
  batched = _run(model, tokens, LENGTHS, prompt_len=24, steps=STEPS)
  for row, length in enumerate(LENGTHS):
    alone = _run(model, tokens[row:row + 1], LENGTHS[row:row + 1], prompt_len=int(length), steps=STEPS)
    _assert_close(alone[:, 0], batched[:, row], f"row {row} alone vs in the batch")


@pytest.mark.slow  # suite budget; the dropless MoE model above is held to the forward at every position
def test_capacity_moe_layer_decodes_dropless(monkeypatch, caplog):
  """A capacity layer whose forward drops nothing (capacity_factor 4) gives the same outputs through `infer` (the
  prefill / decode path), token by token as a decode step sees them, and says once that it decodes dropless."""
  monkeypatch.setattr(moe_layer, "_LOGGED_DROPLESS", set())
  config = dataclasses.replace(MOE, dispatch="capacity_scatter", capacity_factor=4.0)
  layer = nnx.jit(lambda: moe_layer.MoEFeedForward(32, config, rngs=nnx.Rngs(0)))()
  layer.eval()
  x = jax.random.normal(jax.random.key(2), (2, SEQ, 32), jnp.float32)

  @nnx.jit
  def run(layer, x):
    y, aux = layer(x)
    one_at_a_time = jax.vmap(lambda x_t: layer.infer(x_t[:, None]), in_axes=1, out_axes=1)(x)[:, :, 0]
    return y, aux["dropped_fraction"], layer.infer(x), one_at_a_time

  with caplog.at_level(logging.INFO, logger=moe_layer.__name__):
    y, dropped, inferred, stepped = (np.asarray(a) for a in run(layer, x))
  assert dropped == 0.0
  _assert_close(inferred, y, "infer vs forward")
  _assert_close(stepped, y, "infer one token at a time vs forward")
  notes = [record for record in caplog.records if "decodes with dropless dispatch" in record.getMessage()]
  assert len(notes) == 1


def test_bad_input_is_a_clear_error(sparse_moe_model):
  model = sparse_moe_model
  with pytest.raises(ValueError, match="max_len=49 exceeds model.max_seq_len=48"):
    decode.init_cache(model, 1, SEQ + 1)
  cache = decode.init_cache(model, 2, 16)
  with pytest.raises(ValueError, match="more than the cache's max_len=16"):
    decode.prefill(model, np.zeros((2, 17), np.int32), np.array([1, 17]), cache)
  with pytest.raises(ValueError, match="every length must lie in"):
    decode.prefill(model, np.zeros((2, 8), np.int32), np.array([0, 8]), cache)
  with pytest.raises(ValueError, match="token ids must lie in"):
    decode.prefill(model, np.full((2, 8), VOCAB, np.int32), np.array([8, 8]), cache)
  full = dict(cache, lengths=jnp.array([3, 16], jnp.int32))
  with pytest.raises(ValueError, match="row 1 already holds max_len=16"):
    decode.decode(model, full, np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="the cache holds 2 rows, the tokens 3"):
    decode.decode(model, cache, np.zeros(3, np.int32))
  expert_choice = dataclasses.replace(MOE, routing="expert_choice", dispatch="capacity_scatter",
                                      allow_noncausal_routing=True)
  with pytest.raises(ValueError, match="model.moe.routing='expert_choice'"):
    decode.init_cache(_abstract_model(ffn_pattern=("moe",), moe=expert_choice), 1, SEQ)


def test_cache_logical_axes_map_through_the_sharding_rules(sparse_moe_model):
  cache = decode.init_cache(sparse_moe_model, 4, SEQ)
  axes = decode.cache_logical_axes(sparse_moe_model, 4, SEQ)
  is_axes = lambda node: isinstance(node, tuple)
  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(jax.tree.map(lambda _: (), cache),
                                                                         is_leaf=is_axes)
  mesh = jax.sharding.AbstractMesh((2, 1, 2, 1), ("data", "fsdp", "tensor", "expert"))
  specs = jax.tree.map(lambda names, array: sharding.logical_to_spec(names, array.shape, mesh), axes, cache,
                       is_leaf=is_axes)
  for layer in ("layer0", "layer1"):
    for name in ("k", "v"):
      assert specs[layer][name] == jax.sharding.PartitionSpec("data", None, "tensor", None), (layer, name)
  assert specs["lengths"] == jax.sharding.PartitionSpec("data")
  assert cache["layer1"]["k"].shape == (4, 8, 2, 8)  # the local layer keeps a ring of `window` positions
