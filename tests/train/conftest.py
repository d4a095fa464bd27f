"""Shared fixtures: a small real-text corpus and a tiny run config that trains in seconds."""

import dataclasses
import glob
import os

import pytest

from sparseformer.models.config import ModelConfig
from sparseformer.train import trainer
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> str:
  """A directory of real Python source (the stdlib json + email packages), ~300 KB."""
  directory = tmp_path_factory.mktemp("corpus")
  for package in ("json", "email"):
    root = os.path.dirname(__import__(package).__file__)
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
      with open(path, "rb") as source, open(directory / f"{package}_{os.path.basename(path)}", "wb") as copy:
        copy.write(source.read())
  return str(directory)


@pytest.fixture
def tiny_config(text_corpus, tmp_path):
  """tiny_config(**train_changes) -> a RunConfig of a 2-layer model on the text corpus that trains in seconds."""
  return lambda **train_changes: make_tiny_config(text_corpus, tmp_path, **train_changes)


@pytest.fixture
def read_losses():
  return trainer.read_train_losses


def make_tiny_config(corpus: str, tmp_path, **train_changes) -> RunConfig:
  model = ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, max_seq_len=64)
  data = DataConfig(path=corpus, seq_len=64, batch_size=8, num_val_batches=2, val_fraction=0.1,
                    cache_dir=str(tmp_path / "cache"))
  train = TrainConfig(steps=8, learning_rate=3e-3, warmup_steps=2, log_every=1, eval_every=0, checkpoint_every=4,
                      sample_tokens=0, progress_bar=False, peak_flops=1e11)
  return RunConfig(name="tiny", model=model, data=data, train=dataclasses.replace(train, **train_changes))
