"""train/distributed.py: inconsistent multi-process flags are rejected before jax.distributed is touched."""

import jax
import pytest

from sparseformer.train import distributed

_VARIABLES = ("SPARSEFORMER_COORDINATOR", "SPARSEFORMER_NUM_PROCESSES", "SPARSEFORMER_PROCESS_ID",
              "SPARSEFORMER_AUTO_DISTRIBUTED")


@pytest.fixture
def no_cluster(monkeypatch):
  """A clean environment, and a jax.distributed.initialize that fails the test if reached."""
  for name in _VARIABLES:
    monkeypatch.delenv(name, raising=False)

  def unexpected(**kwargs):
    raise AssertionError(f"jax.distributed.initialize called with {kwargs}")

  monkeypatch.setattr(jax.distributed, "initialize", unexpected)
  return monkeypatch


def test_no_flags_is_a_single_process_no_op(no_cluster):
  assert distributed.initialize() is False
  assert distributed.initialize(None, 1, 0) is False


@pytest.mark.parametrize("flags, env, message", [
    ((None, 2, None), {}, r"--num-processes / --process-id need --coordinator HOST:PORT"),
    ((None, None, 1), {}, r"--num-processes / --process-id need --coordinator"),
    ((None, None, None), {"SPARSEFORMER_NUM_PROCESSES": "4"},
     r"need --coordinator HOST:PORT \(or SPARSEFORMER_COORDINATOR\)"),
    (("localhost:1234", None, 0), {}, r"--coordinator needs --num-processes and --process-id"),
    ((None, 2, None), {"SPARSEFORMER_COORDINATOR": "localhost:1234"},
     r"--coordinator needs --num-processes and --process-id"),
    (("localhost:1234", 2, 2), {}, r"--process-id 2 must lie in \[0, --num-processes=2\)"),
    ((None, None, None), {"SPARSEFORMER_COORDINATOR": "h:1", "SPARSEFORMER_NUM_PROCESSES": "2",
                          "SPARSEFORMER_PROCESS_ID": "-1"}, r"--process-id -1 must lie in \[0, --num-processes=2\)"),
])
def test_inconsistent_flags_or_variables_are_rejected(no_cluster, flags, env, message):
  for name, value in env.items():
    no_cluster.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*flags)


def test_flags_win_over_the_environment(no_cluster):
  no_cluster.setenv("SPARSEFORMER_COORDINATOR", "h:1")
  no_cluster.setenv("SPARSEFORMER_NUM_PROCESSES", "2")
  no_cluster.setenv("SPARSEFORMER_PROCESS_ID", "5")  # out of range, but the flag replaces it
  calls = []
  no_cluster.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  no_cluster.setattr(jax.config, "update", lambda *args: None)  # keep the CPU collectives setting as it is
  distributed.initialize(None, None, 1)
  assert calls == [{"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}]
