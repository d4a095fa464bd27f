"""train/overrides.py: the type errors not covered by test_overrides.py, each naming the field."""

import dataclasses

import pytest

from sparseformer.train import overrides
from sparseformer.train.config import RunConfig


@dataclasses.dataclass(frozen=True)
class _Inner:
  size: int = 1  # a nested field


@dataclasses.dataclass(frozen=True)
class _Kinds:
  """Field types that RunConfig does not use today but `apply_overrides` promises to handle."""

  maybe: int | None = None
  pair: tuple[int, str] = (1, "a")
  names: list = dataclasses.field(default_factory=list)
  inner: _Inner = _Inner()


@pytest.mark.parametrize("assignment, message", [
    ("train.learning_rate=fast", r"train.learning_rate: expected a number, got 'fast'"),
    ("train.learning_rate=True", r"train.learning_rate: expected a number, got True"),
    ("model.attention_pattern={'a': 1}", r"model.attention_pattern: expected a tuple such as \('a', 'b'\), got"),
    ("model.attention.block_size=2.5", r"model.attention.block_size: expected an integer, got 2.5"),
    ("data.seq_len.x=3", r"Unknown config field 'data.seq_len.x'"),
    ("model.moe.num_experst=4", r"Unknown config field 'model.moe.num_experst'. Did you mean: model.moe.num_experts"),
    ("zzzz=1", r"Unknown config field 'zzzz'. Run `sparseformer show-config` to list fields"),
])
def test_bad_run_config_overrides_name_the_field(assignment, message):
  with pytest.raises(ValueError, match=message):
    overrides.apply_overrides(RunConfig(), [assignment])


@pytest.mark.parametrize("assignment, message", [
    ("maybe=x", r"maybe: 'x' matches none of int \| None"),
    ("pair=(1, 'b', 3)", r"pair: expected 2 items, got 3"),
    ("pair=('b', 'c')", r"pair\[0\]: expected an integer, got 'b'"),
    ("names=3", r"names: cannot set a field of type <class 'list'> from the command line"),
    ("inner=3", r"inner is a group of settings; set one of its fields, e.g. inner.size=\.\.\."),
])
def test_other_field_types_name_the_field(assignment, message):
  with pytest.raises(ValueError, match=message):
    overrides.apply_overrides(_Kinds(), [assignment])


def test_other_field_types_accept_their_values():
  config = overrides.apply_overrides(_Kinds(), ["maybe=3", "pair=(2, 'b')", "inner.size=4"])
  assert (config.maybe, config.pair, config.inner.size) == (3, (2, "b"), 4)
  assert overrides.apply_overrides(config, ["maybe=None"]).maybe is None


def test_from_dict_rejects_unknown_or_mistyped_fields_of_a_stored_config():
  stored = overrides.to_dict(RunConfig())
  stored["train"]["stepz"] = 3
  with pytest.raises(ValueError, match=r"Unknown config fields \['train.stepz'\] for TrainConfig"):
    overrides.from_dict(RunConfig, stored)
  stored = overrides.to_dict(RunConfig())
  stored["train"]["steps"] = "2"
  with pytest.raises(ValueError, match=r"train.steps: expected an integer, got '2'"):
    overrides.from_dict(RunConfig, stored)
