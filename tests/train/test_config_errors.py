"""Every invalid value of train/config.py and train/mesh.py is rejected when the config is built, naming the field."""

import pytest

from sparseformer.models.config import ModelConfig
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.mesh import MeshConfig


@pytest.mark.parametrize("changes, message", [
    (dict(steps=0), r"train.steps must be positive, got 0"),
    (dict(grad_accum_steps=0), r"train.grad_accum_steps must be positive, got 0"),
    (dict(log_every=-1), r"train.log_every must be positive, got -1"),
    (dict(checkpoint_every=0), r"train.checkpoint_every must be positive"),
    (dict(keep_checkpoints=0), r"train.keep_checkpoints must be positive"),
    (dict(stop_at_step=-1), r"train.stop_at_step must be >= 0 \(0 = never\), got -1"),
    (dict(learning_rate=0.0), r"train.learning_rate must be positive, got 0.0"),
    (dict(learning_rate=-1e-3), r"train.learning_rate must be positive"),
    (dict(min_lr_ratio=1.5), r"train.min_lr_ratio must lie in \[0, 1\], got 1.5"),
    (dict(min_lr_ratio=-0.1), r"train.min_lr_ratio must lie in \[0, 1\]"),
    (dict(warmup_steps=-1), r"train.warmup_steps must be >= 0, got -1\."),
    (dict(eval_every=-1), r"train.eval_every must be >= 0, got -1\."),
    (dict(grad_clip=-1.0), r"train.grad_clip must be >= 0, got -1.0"),
    (dict(weight_decay=-0.1), r"train.weight_decay must be >= 0, got -0.1"),
])
def test_bad_train_config_is_rejected_naming_the_field(changes, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(**changes)


def test_train_config_boundaries_are_accepted():
  TrainConfig(stop_at_step=0, min_lr_ratio=0.0, warmup_steps=0, eval_every=0, grad_clip=0.0, weight_decay=0.0)
  TrainConfig(min_lr_ratio=1.0, steps=1, keep_checkpoints=1)


def test_run_config_rejects_a_sequence_longer_than_the_model():
  with pytest.raises(ValueError, match=r"data.seq_len \(128\) exceeds model.max_seq_len \(64\); raise "
                                       r"model.max_seq_len or lower data.seq_len"):
    RunConfig(model=ModelConfig(max_seq_len=64), data=DataConfig(seq_len=128))
  RunConfig(model=ModelConfig(max_seq_len=64), data=DataConfig(seq_len=64))  # equal is fine


def test_run_config_rejects_a_batch_that_does_not_split_into_micro_batches():
  with pytest.raises(ValueError, match=r"data.batch_size \(10\) must be a multiple of train.grad_accum_steps \(4\)"):
    RunConfig(data=DataConfig(batch_size=10), train=TrainConfig(grad_accum_steps=4))
  RunConfig(data=DataConfig(batch_size=12), train=TrainConfig(grad_accum_steps=4))


@pytest.mark.parametrize("changes, message", [
    (dict(data=-1, fsdp=-1), r"At most one mesh axis may be -1, got \{'data': -1, 'fsdp': -1"),
    (dict(tensor=0), r"mesh.tensor must be a positive size or -1, got 0"),
    (dict(expert=-2), r"mesh.expert must be a positive size or -1, got -2"),
])
def test_bad_mesh_config_is_rejected_naming_the_axis(changes, message):
  with pytest.raises(ValueError, match=message):
    MeshConfig(**changes)


def test_mesh_resolve_fills_the_free_axis_or_names_the_mismatch():
  assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2, 1)
  assert MeshConfig(data=2, fsdp=2, tensor=2, expert=1).resolve(8) == (2, 2, 2, 1)
  with pytest.raises(ValueError, match=r"cannot use 6 devices: the fixed axes multiply to 4, which does not "
                                       r"divide 6\. Change the --set mesh\.\* sizes"):
    MeshConfig(data=2, fsdp=-1, tensor=2).resolve(6)
  with pytest.raises(ValueError, match=r"needs 3 devices but 1 are available; set one axis to -1"):
    MeshConfig(data=3, fsdp=1).resolve(1)
