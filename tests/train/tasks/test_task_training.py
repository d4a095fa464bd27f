"""A task through the trainer: masked metrics per evaluation mix in metrics.jsonl and `eval`; old configs resume."""

import dataclasses
import json
import os

import numpy as np
import pytest

from sparseformer.models.config import ModelConfig
from sparseformer.train import metrics as metrics_lib
from sparseformer.train import overrides, trainer
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.tasks.config import MQARConfig


def _config(**train_changes) -> RunConfig:
  model = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, max_seq_len=32)
  data = DataConfig(source="task", task="mqar", seq_len=16, batch_size=8, num_val_batches=1,
                    mqar=MQARConfig(num_kv_pairs=2, vocab_size=32, eval_mixes=("long:4:32",)))
  train = TrainConfig(steps=4, learning_rate=3e-3, warmup_steps=1, log_every=1, eval_every=2, checkpoint_every=2,
                      progress_bar=False, peak_flops=1e11)
  return RunConfig(name="mqar-tiny", model=model, data=data, train=dataclasses.replace(train, **train_changes))


def test_mqar_trains_and_logs_masked_metrics_per_mix(tmp_path, capsys):
  straight = str(tmp_path / "straight")
  summary = trainer.train(_config(), straight)
  records = metrics_lib.read_metrics(straight)
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for record in evals:
    for name in ("eval/loss", "eval/token_accuracy", "eval/example_accuracy", "eval/long/loss",
                 "eval/long/token_accuracy", "eval/long/example_accuracy"):
      assert np.isfinite(record[name]), name
    assert 0 <= record["eval/token_accuracy"] <= 1 and "eval/bits_per_byte" not in record
  assert 2.0 < evals[-1]["eval/loss"] < 4.0  # about ln(16) over the 16 values: masked, not over all 32 ids
  train_records = [r for r in records if "train/loss" in r]
  assert all("train/token_accuracy" in r and "train/example_accuracy" in r for r in train_records)
  assert summary["long/loss"] == evals[-1]["eval/long/loss"]
  assert "No text sample" in capsys.readouterr().out
  # `sparseformer eval` reports every mix of the final checkpoint.
  result = trainer.evaluate_workdir(trainer.load_run_config(straight), straight)
  assert result["step"] == 4
  assert result["long/example_accuracy"] == pytest.approx(evals[-1]["eval/long/example_accuracy"])
  assert result["loss"] == pytest.approx(evals[-1]["eval/loss"], rel=1e-5)


def test_a_config_json_written_before_the_task_fields_still_resumes(tmp_path):
  """Missing keys of a stored config.json read as their defaults; a real difference is still refused."""
  config = RunConfig(model=ModelConfig(max_seq_len=64), data=DataConfig(seq_len=64))
  stored = json.loads(json.dumps(overrides.to_dict(config)))
  for name in ("task", "mqar", "listops", "passkey", "copy"):
    del stored["data"][name]
  del stored["model"]["attention"]["window"]
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(stored))
  trainer._write_config(str(workdir), config)  # pylint: disable=protected-access
  assert "mqar" in json.loads((workdir / "config.json").read_text())["data"]
  (workdir / "config.json").write_text(json.dumps(stored))
  before = (workdir / "config.json").read_text()
  changed = dataclasses.replace(config, data=dataclasses.replace(config.data, seed=3))
  with pytest.raises(ValueError, match="data.seed"):
    trainer._write_config(str(workdir), changed)  # pylint: disable=protected-access
  assert (workdir / "config.json").read_text() == before
  assert os.listdir(workdir) == ["config.json"]
