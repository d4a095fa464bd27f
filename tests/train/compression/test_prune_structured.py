"""Expert and head pruning: the smaller model computes what the original did without the dropped parts."""

import pathlib
import sys

import dataclasses

import numpy as np
import pytest

from sparseformer.models import flops
from sparseformer.train.compression import prune_masks, prune_structured

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import prune_helpers  # noqa: E402  (the shared tiny model)

CONFIG, DEAD_EXPERTS = prune_helpers.CONFIG, prune_helpers.DEAD_EXPERTS


@pytest.fixture(scope="module")
def original():
  """The shared tiny model (experts 1 and 3 never selected, heads DEAD_HEADS silent), its logits and statistics."""
  params, extra, tokens, outputs = prune_helpers.probe()
  return params, extra, tokens, outputs["logits"], dict(outputs["stats"])


def _small_logits(config, params, extra, tokens):
  logits = np.asarray(prune_helpers.forward_of(prune_helpers.graphdef_of(config))(params, extra, tokens), np.float64)
  assert np.isfinite(logits).all()
  return logits


def test_dropping_unrouted_experts_keeps_the_forward_pass(original):
  params, extra, tokens, want, stats = original
  mass = stats["blocks/1/ffn#expert_mass"]
  assert np.all(mass[list(DEAD_EXPERTS)] == 0) and np.all(mass[[0, 2]] > 0)
  slices = prune_structured.expert_slices(stats, CONFIG, 2)
  np.testing.assert_array_equal(slices["blocks/1/ffn/w_gate"][1], [0, 2])
  small = prune_structured.check_expert_pruning(CONFIG, 2)
  assert small.moe.num_experts == 2
  small_params, small_extra = prune_structured.slice_tree((params, extra), slices)
  assert prune_masks.named_params(small_params)["blocks/1/ffn/router/weight"].shape == (32, 2)
  got = _small_logits(small, small_params, small_extra, tokens)
  assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()


def test_head_pruning_removes_the_heads_and_their_compute(original):
  params, extra, tokens, want, stats = original
  for layer, heads in prune_helpers.DEAD_HEADS.items():  # measured importance: the silent heads score 0
    importance = stats[f"blocks/{layer}/attention#head_norm"]
    assert np.all(importance[list(heads)] == 0) and np.all(np.delete(importance, heads) > 0)
  small = prune_structured.check_head_pruning(CONFIG, 2, seq_len=16)
  assert (small.num_heads, small.num_kv_heads, small.head_dim) == (2, 2, 8)
  slices = prune_structured.head_slices(stats, CONFIG, 2)  # one head from each KV group (GQA)
  np.testing.assert_array_equal(slices["blocks/0/attention/wq"][1], [0, 3])
  np.testing.assert_array_equal(slices["blocks/1/attention/wo"][1], [1, 2])
  small_params = prune_structured.slice_tree(params, slices)
  assert prune_masks.named_params(small_params)["blocks/0/attention/wq"].shape == (32, 2, 8)
  got = _small_logits(small, small_params, extra, tokens)
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


def test_gqa_head_choice_takes_the_same_count_from_every_kv_group():
  # The two least important heads (0 and 1) share KV group 0: GQA drops one per group instead.
  stats = {f"blocks/{layer}/attention#head_norm": np.array([0.1, 0.2, 5.0, 0.3]) for layer in range(2)}
  slices = prune_structured.head_slices(stats, CONFIG, 2)
  np.testing.assert_array_equal(slices["blocks/0/attention/wq"][1], [1, 2])
  assert "blocks/0/attention/wk" not in slices  # K / V heads stay under GQA
