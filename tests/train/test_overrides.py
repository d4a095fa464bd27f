"""--set overrides: literal parsing, type checks, close-match errors."""

import pytest

from sparseformer import experiments
from sparseformer.train import overrides
from sparseformer.train.config import RunConfig


def test_overrides_parse_literals_and_nest():
  config = overrides.apply_overrides(RunConfig(), [
      "train.steps=7", "train.learning_rate=1e-3", "model.dtype=bfloat16", "model.tie_embeddings=False",
      "model.attention_pattern=('global', 'global')", "data.path=/tmp/x.txt", "mesh.fsdp=-1"])
  assert config.train.steps == 7 and config.train.learning_rate == 1e-3
  assert config.model.dtype == "bfloat16" and config.model.tie_embeddings is False
  assert config.model.attention_pattern == ("global", "global")
  assert config.data.path == "/tmp/x.txt"


def test_int_is_accepted_for_float_and_single_word_for_tuple():
  config = overrides.apply_overrides(RunConfig(), ["train.learning_rate=1", "model.ffn_pattern=dense"])
  assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
  assert config.model.ffn_pattern == ("dense",)


@pytest.mark.parametrize("assignment, message", [
    ("train.stepz=3", "train.steps"),
    ("modle.d_model=3", "model.d_model"),
    ("train.steps=3.5", "train.steps: expected an integer"),
    ("train.steps=True", "train.steps: expected an integer"),
    ("model.tie_embeddings=1", "expected True or False"),
    ("train=3", "group of settings"),
    ("train.steps", "key=value"),
    ("model.num_kv_heads=3", "num_kv_heads"),  # validation of the rebuilt config
])
def test_bad_overrides_name_the_field(assignment, message):
  with pytest.raises(ValueError, match=message):
    overrides.apply_overrides(RunConfig(), [assignment])


def test_values_are_never_evaluated():
  config = overrides.apply_overrides(RunConfig(), ["name=__import__('os').system('false')"])
  assert config.name == "__import__('os').system('false')"


def test_round_trip_through_dict():
  config = overrides.apply_overrides(experiments.get("quickstart"), ["model.attention_pattern=('global',)"])
  assert overrides.from_dict(RunConfig, overrides.to_dict(config)) == config


def test_experiment_registry_lists_and_rejects():
  assert "quickstart" in experiments.names()
  assert "sparseformer train --experiment quickstart" in experiments.describe("quickstart")
  with pytest.raises(ValueError, match="quickstart"):
    experiments.get("quikstart")


def test_assignment_order_does_not_matter_for_validation():
  config = overrides.apply_overrides(RunConfig(), ["model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2"])
  assert (config.model.d_model, config.model.num_heads) == (32, 2)


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_and_variant_resolves(name):
  assert experiments.get(name).name
  for variant in experiments.variants(name):
    config = experiments.get(name, variant)
    assert config.name.endswith(variant)
  with pytest.raises(ValueError, match="no variant"):
    experiments.get(name, "no_such_variant")
