"""Config errors of the task source (data_config.py, config.py) and the mqar experiment's declared sweep."""

import dataclasses

import pytest

from sparseformer import experiments
from sparseformer.models.config import ModelConfig
from sparseformer.train import overrides
from sparseformer.train.config import RunConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.tasks.config import MQARConfig


def _run(**data_changes) -> RunConfig:
  data = DataConfig(**{"source": "task", "task": "mqar", "seq_len": 64,
                       "mqar": MQARConfig(num_kv_pairs=4, vocab_size=128), **data_changes})
  return RunConfig(model=ModelConfig(vocab_size=128, max_seq_len=64), data=data)


@pytest.mark.parametrize("changes, match", [
    (dict(task="mqarr"), r"data.task='mqarr' is not a task; set data.task to one of \('mqar'"),
    (dict(task=""), "data.task='' is not a task"),
    (dict(path="x.txt"), "takes no path"),
    (dict(mqar=MQARConfig(num_kv_pairs=20)), "data.mqar.num_kv_pairs=20 needs data.seq_len >= 4 x num_kv_pairs = 80"),
    (dict(source="auto", task="mqar"), "data.task='mqar' is set but data.source='auto'"),
])
def test_bad_task_settings_are_rejected_when_the_config_is_built(changes, match):
  with pytest.raises(ValueError, match=match):
    _run(**changes)


def test_the_model_vocabulary_must_match_the_task():
  config = _run()
  with pytest.raises(ValueError, match=r"model.vocab_size=259 does not match the vocabulary of "
                                       r"data.mqar.vocab_size \(128 ids\); set model.vocab_size=128"):
    dataclasses.replace(config, model=ModelConfig(max_seq_len=64))
  with pytest.raises(ValueError, match=r"data.task='listops' \(16 ids\); set model.vocab_size=16"):
    overrides.apply_overrides(config, ["data.task=listops", "data.seq_len=64", "data.listops.max_length=64",
                                       "data.listops.min_length=8", "data.listops.max_depth=3"])
  with pytest.raises(ValueError, match=r"eval_mixes\[long\] has seq_len 128, above model.max_seq_len \(64\)"):
    overrides.apply_overrides(config, ["data.mqar.eval_mixes=('long:8:128',)"])


def test_task_fields_are_set_from_the_command_line():
  config = overrides.apply_overrides(_run(), ["data.mqar.num_kv_pairs=8", "data.mqar.power_a=0.5",
                                              "data.mqar.eval_mixes=long:8:64"])
  assert config.data.mqar.num_kv_pairs == 8 and config.data.mqar.power_a == 0.5
  assert [mix.name for mix in config.data.task_config.mixes(64)] == ["", "long"]
  assert overrides.from_dict(RunConfig, overrides.to_dict(config)) == config  # config.json round trip


def test_the_mqar_experiment_and_its_sweep_resolve():
  config = experiments.get("mqar")
  assert config.model.num_layers == 2 and config.data.task == "mqar"
  module = __import__("sparseformer.experiments.mqar", fromlist=["SWEEP"])
  sweep = module.SWEEP
  assert set(sweep["variants"]) == {"global", "local_w16", "local_w48", "bigbird", "moba", "nsa", "dsa", "moba_b16",
                                    "nsa_b16", "dsa_b16"}
  assert sweep["grid"]["model.d_model"] == [64, 128, 256]
  for variant, sets in sweep["variants"].items():
    for d_model in sweep["grid"]["model.d_model"]:
      for values in sweep["grid"][("data.seq_len", "data.mqar.num_kv_pairs", "model.max_seq_len")]:
        assignments = [f"model.d_model={d_model}"] + [
            f"{key}={value}" for key, value in zip(("data.seq_len", "data.mqar.num_kv_pairs", "model.max_seq_len"),
                                                   values)]
        overrides.apply_overrides(experiments.get("mqar", variant), assignments)
