"""train/sweeps/ray_engine.py: a 2-run sweep as Ray tasks on a local 2-CPU cluster; Ray missing is a clear error."""

import os
import sys

import pytest
from sweep_helpers import compile_cache_env, write_study

from sparseformer.train import cli
from sparseformer.train.sweeps import spec, store


def test_engine_ray_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
  study, out = write_study(tmp_path, str(tmp_path)), str(tmp_path / "sweep")
  assert cli.main(["sweep", "run", "--experiment", study, "--out", out, "--engine", "ray"]) == 2
  assert "--engine ray needs Ray, an optional extra: pip install -e '.[ray]'" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_two_runs_as_ray_tasks_on_a_local_two_cpu_cluster(tmp_path, tmp_path_factory, text_corpus, monkeypatch,
                                                          capsys):
  ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]' runs this test")
  from sparseformer.train.sweeps import ray_engine  # pylint: disable=import-outside-toplevel
  for name, value in compile_cache_env(tmp_path_factory.getbasetemp()).items():
    monkeypatch.setenv(name, value)  # the local cluster's workers inherit it
  study, out = write_study(tmp_path, text_corpus), str(tmp_path / "sweep")
  plan = spec.plan(study, variants=["a"])
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
           object_store_memory=ray_engine.LOCAL_OBJECT_STORE_BYTES)
  try:
    counts = ray_engine.run_sweep(plan, out, cpus_per_run=1)
    with pytest.raises(ValueError, match=r"No Ray node has --cpus-per-run 3 CPUs .*the largest has 2 CPUs"):
      ray_engine.run_sweep(plan, str(tmp_path / "other"), cpus_per_run=3)
    assert ray.is_initialized()  # the caller's session is left to the caller
  finally:
    ray.shutdown()
  assert not os.path.exists(tmp_path / "other")
  log = capsys.readouterr().out
  assert counts == {"done": 2, "failed": 0, "skipped": 0}, log
  assert store.load_sweep(out) == plan.to_json()
  for run in plan.runs:
    status = store.read_status(store.run_dir(out, run.name))
    assert status["status"] == "done" and status["attempts"] == 1 and status["returncode"] == 0, run.name
    assert store.last_step(store.run_dir(out, run.name)) == 3
    assert f"{run.name}: done in" in log
