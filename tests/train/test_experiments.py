"""experiments/__init__.py: the registry's errors, variants, and the comparisons the studies' docstrings promise."""

import dataclasses
import sys
import types

import pytest

from sparseformer import experiments
from sparseformer.models.config import ModelConfig


def test_an_experiment_whose_config_is_not_a_run_config_is_rejected(monkeypatch):
  module = types.ModuleType("sparseformer.experiments._broken_for_test")
  module.config = lambda: ModelConfig()
  monkeypatch.setitem(sys.modules, module.__name__, module)
  monkeypatch.setattr(experiments, "names", lambda: ["_broken_for_test", "quickstart"])
  with pytest.raises(TypeError, match=r"experiments/_broken_for_test.py: config\(\) must return a RunConfig, "
                                      r"got ModelConfig"):
    experiments.get("_broken_for_test")


def test_unknown_experiment_names_close_matches_and_every_choice():
  with pytest.raises(ValueError, match=r"Unknown experiment 'moe_ablaton'\. Did you mean moe_ablation[,?].* "
                                       r"Available: " + ", ".join(experiments.names())):
    experiments.get("moe_ablaton")
  with pytest.raises(ValueError, match=r"Unknown experiment 'zzz'\. Available:"):  # nothing close: no hint
    experiments.variants("zzz")
  with pytest.raises(ValueError, match=r"has no variant 'local'; choose one of "
                                       r"\['deepseek', 'dense', 'mixtral', 'olmoe', 'switch'\]"):
    experiments.get("moe_ablation", "local")
  with pytest.raises(ValueError, match=r"'quickstart' has no variant 'x'; choose one of none"):
    experiments.get("quickstart", "x")


def test_a_variant_renames_the_run_and_applies_only_its_overrides():
  base = experiments.get("sparse_attention_ablation")
  local = experiments.get("sparse_attention_ablation", "local")
  assert local.name == "sparse_attention_ablation-local"
  assert local.model.attention_pattern == ("local",)
  restored = dataclasses.replace(local.model, attention_pattern=base.model.attention_pattern)
  assert dataclasses.replace(local, name=base.name, model=restored) == base


def _active_ffn_hidden(model: ModelConfig, layer: int) -> int:
  """Hidden units a token passes through in the FFN of `layer`: routed picks plus shared experts."""
  if model.ffn_kind(layer) == "dense":
    return model.resolved_mlp_hidden
  return model.moe.routed_hidden * model.moe.routed_top_k + model.moe.shared_hidden


def test_moe_ablation_variants_match_the_dense_active_flops():
  """The docstring's comparison: every MoE variant has the dense model's active FFN FLOPs per token (router
  aside), except `deepseek`, whose shared expert adds 25 % (640 active hidden units)."""
  dense = experiments.get("moe_ablation", "dense").model
  assert {_active_ffn_hidden(dense, layer) for layer in range(dense.num_layers)} == {512}
  for variant in experiments.variants("moe_ablation"):
    model = experiments.get("moe_ablation", variant).model
    layers = range(model.num_layers)
    assert variant == "dense" or "moe" in model.ffn_pattern
    want = [640 if variant == "deepseek" and model.ffn_kind(layer) == "moe" else 512 for layer in layers]
    assert [_active_ffn_hidden(model, layer) for layer in layers] == want, variant
