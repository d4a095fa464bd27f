"""Expert and head pruning: the smaller model computes what the original did without the dropped parts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.moe.config import MoEConfig
from sparseformer.models import flops
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train.compression import prune, prune_masks, prune_structured

CONFIG = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=32, mlp_hidden=64,
                     ffn_pattern=("dense", "moe"),
                     moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, selection_bias=True))
DEAD_EXPERTS = (1, 3)


def _forward(graphdef):
  @jax.jit
  def forward(params, extra, tokens):
    model = nnx.merge(graphdef, params, extra, copy=True)
    model.eval()
    return model(tokens)[0]
  return forward


def _split(config):
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))), nnx.Param, ...)
  return graphdef


@pytest.fixture(scope="module")
def original():
  """A tiny model whose experts 1 and 3 are never selected (selection bias -1e4), its logits and statistics."""
  graphdef = _split(CONFIG)
  params, extra = jax.jit(lambda: nnx.split(DecoderLM(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:])()
  bias = np.zeros(4, np.float32)
  bias[list(DEAD_EXPERTS)] = -1e4
  extra = jax.tree.map_with_path(lambda path, leaf: jnp.asarray(bias) if prune_masks.path_name(path).endswith(
      "router/bias") else leaf, extra)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CONFIG.vocab_size)

  @jax.jit
  def stats_of(params, extra, tokens):
    model = nnx.merge(graphdef, params, extra, copy=True)
    model.eval()
    return prune.block_statistics(model, tokens)[0]

  stats = jax.tree.map(np.asarray, stats_of(params, extra, tokens))
  return graphdef, params, extra, tokens, stats


def test_dropping_unrouted_experts_keeps_the_forward_pass(original):
  graphdef, params, extra, tokens, stats = original
  mass = stats["blocks/1/ffn#expert_mass"]
  assert np.all(mass[list(DEAD_EXPERTS)] == 0) and np.all(mass[[0, 2]] > 0)
  slices = prune_structured.expert_slices(stats, CONFIG, 2)
  np.testing.assert_array_equal(slices["blocks/1/ffn/w_gate"][1], [0, 2])
  small = prune_structured.check_expert_pruning(CONFIG, 2)
  assert small.moe.num_experts == 2
  small_params, small_extra = prune_structured.slice_tree((params, extra), slices)
  assert prune_masks.named_params(small_params)["blocks/1/ffn/router/weight"].shape == (32, 2)
  want = np.asarray(_forward(graphdef)(params, extra, tokens), np.float64)
  got = np.asarray(_forward(_split(small))(small_params, small_extra, tokens), np.float64)
  assert np.isfinite(got).all()
  assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()


def test_head_pruning_removes_the_heads_and_their_compute(original):
  graphdef, params, extra, tokens, stats = original
  stats = dict(stats)
  stats["blocks/0/attention#head_norm"] = np.array([4.0, 1.0, 2.0, 3.0])  # drops head 1 (group 0), 2 (group 1)
  stats["blocks/1/attention#head_norm"] = np.array([1.0, 4.0, 3.0, 2.0])  # drops head 0 and head 3
  small = prune_structured.check_head_pruning(CONFIG, 2, seq_len=16)
  assert (small.num_heads, small.num_kv_heads, small.head_dim) == (2, 2, 8)
  slices = prune_structured.head_slices(stats, CONFIG, 2)
  np.testing.assert_array_equal(slices["blocks/0/attention/wq"][1], [0, 3])
  np.testing.assert_array_equal(slices["blocks/1/attention/wo"][1], [1, 2])
  small_params = prune_structured.slice_tree(params, slices)
  # The original with the dropped heads' output rows zeroed is what the smaller model must compute.
  dropped = {"blocks/0/attention/wo": [1, 2], "blocks/1/attention/wo": [0, 3]}
  zeroed = jax.tree.map_with_path(
      lambda path, leaf: leaf.at[np.array(dropped[prune_masks.path_name(path)])].set(0)
      if prune_masks.path_name(path) in dropped else leaf, params)
  want = np.asarray(_forward(graphdef)(zeroed, extra, tokens), np.float64)
  got = np.asarray(_forward(_split(small))(small_params, extra, tokens), np.float64)
  assert np.isfinite(got).all()
  assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
  assert flops.train_flops_per_token(small, 16) < flops.train_flops_per_token(CONFIG, 16)


def test_structured_pruning_rejects_counts_that_break_the_config():
  with pytest.raises(ValueError, match="--heads 1: under GQA .* multiple of 2"):
    prune_structured.check_head_pruning(CONFIG, 1, seq_len=16)
  with pytest.raises(ValueError, match="--heads 4"):
    prune_structured.check_head_pruning(CONFIG, 4, seq_len=16)
  with pytest.raises(ValueError, match="--experts 3: .*top_k=2"):
    prune_structured.check_expert_pruning(CONFIG, 3)
  with pytest.raises(ValueError, match="--experts: this model has no MoE layer"):
    prune_structured.check_expert_pruning(dataclasses.replace(CONFIG, ffn_pattern=("dense",)), 1)
  mha = dataclasses.replace(CONFIG, num_kv_heads=4)
  assert prune_structured.check_head_pruning(mha, 1, seq_len=16).num_kv_heads == 3  # MHA: K / V heads go too
