"""models/presets.py: every preset builds, `get` applies changes or names the choices, docstring promises hold."""

import pytest

from sparseformer.models import presets
from sparseformer.models.config import ModelConfig


def test_unknown_preset_names_every_choice():
  with pytest.raises(ValueError, match=r"Unknown model preset 'smal'; choose one of \['all_local', 'base', "):
    presets.get("smal")
  with pytest.raises(ValueError) as error:
    presets.get("")
  assert all(repr(name) in str(error.value) for name in presets.PRESETS)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_builds_and_takes_changes(name):
  config = presets.get(name)
  assert isinstance(config, ModelConfig) and config == presets.PRESETS[name]()
  changed = presets.get(name, dtype="bfloat16", num_layers=2 * config.num_layers)
  assert (changed.dtype, changed.num_layers, changed.d_model) == ("bfloat16", 2 * config.num_layers, config.d_model)
  with pytest.raises(ValueError, match="model.num_heads"):  # changes are validated like any config
    presets.get(name, num_heads=3, num_kv_heads=2)


def _active_ffn_hidden(config: ModelConfig, layer: int) -> int:
  if config.ffn_kind(layer) == "dense":
    return config.resolved_mlp_hidden
  return config.moe.routed_hidden * config.moe.routed_top_k + config.moe.shared_hidden


@pytest.mark.parametrize("name", ["moe_mixtral_small", "moe_switch_small"])
def test_moe_presets_have_the_active_ffn_of_small(name):
  small, moe = presets.small(), presets.get(name)
  assert "moe" in moe.ffn_pattern
  assert [_active_ffn_hidden(moe, layer) for layer in range(moe.num_layers)] == \
         [_active_ffn_hidden(small, layer) for layer in range(small.num_layers)]


def test_layer_schedules_match_their_docstrings():
  gemma = presets.local_global_5to1()
  assert [gemma.attention_kind(layer) for layer in range(gemma.num_layers)] == ["local"] * 5 + ["global"]
  llama = presets.chunked_3to1()
  assert [llama.attention_kind(layer) for layer in range(llama.num_layers)] == ["chunked"] * 3 + ["global"]
  deepseek = presets.moe_deepseek_small()
  assert [deepseek.ffn_kind(layer) for layer in range(deepseek.num_layers)] == ["dense", "moe", "moe", "moe"]
  assert deepseek.moe.score_function == "sigmoid" and deepseek.moe.num_shared_experts == 1
  assert deepseek.moe.selection_bias and deepseek.moe.aux_loss_alpha == 0  # bias balancing, no auxiliary loss
  switch = presets.moe_switch_small()
  assert (switch.moe.top_k, switch.moe.num_experts, switch.moe.capacity_factor) == (1, 16, 1.25)
  mixtral = presets.moe_mixtral_small()
  assert (mixtral.moe.top_k, mixtral.moe.num_experts, mixtral.moe.dispatch) == (2, 8, "dropless_gather")
