"""train/checkpoint.py: check_workdir refuses, before any work, every directory that cannot hold a run."""

import os

import pytest

from sparseformer.train import checkpoint


def test_check_workdir_creates_and_expands(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert checkpoint.check_workdir("~/runs/new") == str(tmp_path / "runs" / "new")
  assert os.path.isdir(tmp_path / "runs" / "new")


def test_check_workdir_rejects_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("keep me")
  with pytest.raises(checkpoint.CheckpointError, match=rf"--workdir {path} exists and is not a directory"):
    checkpoint.check_workdir(str(path))
  assert path.read_text() == "keep me"


def test_check_workdir_rejects_a_checkpoints_file(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints exists and is not a directory; move it away "
                                                       r"or use a new --workdir"):
    checkpoint.check_workdir(str(tmp_path))


@pytest.mark.parametrize("blocked", ["workdir", "checkpoints"])
def test_check_workdir_rejects_a_directory_it_cannot_write(tmp_path, monkeypatch, blocked):
  (tmp_path / "checkpoints").mkdir()
  target = str(tmp_path if blocked == "workdir" else tmp_path / "checkpoints")
  real_access = os.access
  # chmod does not stop root, so the permission check is answered for it.
  monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == target else real_access(path, mode))
  with pytest.raises(checkpoint.CheckpointError, match=rf"{tmp_path} \(or its checkpoints/\) is not readable and "
                                                       r"writable by this user"):
    checkpoint.check_workdir(str(tmp_path))
