"""train/sweeps/local.py + engine_common.py: slots, a 2 x 2-run sweep through the CLI, kill -9 and resume, failures."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sweep_helpers import compile_cache_env, write_study

from sparseformer.train import cli
from sparseformer.train.sweeps import local, spec, store


def _snapshot(directory) -> dict:
  """{relative path: (mtime_ns, bytes)} of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as file:
        files[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, file.read())
  return files


def _children(pid: int) -> list[int]:
  """Process ids whose parent is `pid` (from /proc)."""
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat", encoding="utf-8") as file:
          fields = file.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        found.append(int(entry))
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as file:
      return file.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _statuses(out: str) -> dict:
  plan = store.load_sweep(out) if os.path.exists(os.path.join(out, "sweep.json")) else {"runs": []}
  return {run["name"]: store.read_status(store.run_dir(out, run["name"])) for run in plan["runs"]}


def test_slots_split_the_cores_and_the_gpus():
  slots = local.slot_resources(2, [0, 1, 2, 3, 4], [])
  assert [cores for cores, _ in slots] == [[0, 1], [2, 3]]
  assert all(env == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"} for _, env in slots)
  one_each = local.slot_resources(2, [0, 1, 2, 3], ["0", "1", "2", "3"])
  assert [env["CUDA_VISIBLE_DEVICES"] for _, env in one_each] == ["0,1", "2,3"]
  assert all("XLA_PYTHON_CLIENT_MEM_FRACTION" not in env for _, env in one_each)
  shared = local.slot_resources(3, [0, 1, 2, 3], ["0", "1"])
  assert [env["CUDA_VISIBLE_DEVICES"] for _, env in shared] == ["0", "1", "0"]
  assert {env["XLA_PYTHON_CLIENT_MEM_FRACTION"] for _, env in shared} == {"0.450"}
  with pytest.raises(ValueError, match=r"--parallel 3 exceeds the 2 cores this process may use .*at most 2"):
    local.slot_resources(3, [0, 1], [])
  with pytest.raises(ValueError, match="--parallel must be at least 1"):
    local.slot_resources(0, [0, 1], [])


def test_parallel_above_the_core_count_is_an_error_before_anything_is_written(tmp_path, capsys):
  study, out = write_study(tmp_path, str(tmp_path)), str(tmp_path / "sweep")
  too_many = len(os.sched_getaffinity(0)) + 1
  assert cli.main(["sweep", "run", "--experiment", study, "--out", out, "--parallel", str(too_many)]) == 2
  assert f"--parallel {too_many} exceeds the" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_a_dir_holding_another_sweep_is_refused_and_left_unchanged(tmp_path, capsys):
  study, out = write_study(tmp_path, str(tmp_path)), str(tmp_path / "sweep")
  store.write_sweep(out, spec.plan(study, ["train.steps=2"]).to_json())
  os.makedirs(store.run_dir(out, "a__lr=3e-3__seed=0"))
  before = _snapshot(out)
  assert cli.main(["sweep", "run", "--experiment", study, "--out", out, "--set", "train.steps=4"]) == 2
  err = capsys.readouterr().err
  assert "sparseformer sweep: error:" in err and "holds a different sweep" in err
  assert "overrides: ['train.steps=2'] in DIR, ['train.steps=4'] now" in err
  assert _snapshot(out) == before


def test_failing_runs_are_recorded_the_others_go_on_and_the_exit_status_counts_them(tmp_path, capsys):
  study, out = write_study(tmp_path, str(tmp_path)), str(tmp_path / "sweep")
  missing = str(tmp_path / "no_corpus")  # valid config, caught only when the trainer loads the data
  code = cli.main(["sweep", "run", "--experiment", study, "--out", out, "--variants", "a",
                   "--set", f"data.path={missing}"])
  captured = capsys.readouterr()
  assert code == 1
  assert "2 of 2 runs failed" in captured.err
  assert captured.out.count("FAILED a__lr=3e-3__seed=") == 2  # the second ran after the first failed
  for name, status in _statuses(out).items():
    assert status["status"] == "failed" and status["returncode"] == 2 and status["attempts"] == 1, name
    assert missing in status["error"] and status["finished"] is not None
    with open(os.path.join(store.run_dir(out, name), store.LOG_FILE), encoding="utf-8") as file:
      assert missing in file.read()


def test_sweep_run_end_to_end_kill_9_mid_sweep_then_resume(tmp_path, tmp_path_factory, text_corpus):
  """2 variants x 2 seeds through `python -m sparseformer.train.cli sweep run`, --parallel 2; SIGKILL of the sweep
  process once one run is done and another is starting; its trainers die with it (the starting one before it
  could finish); a rerun skips the done runs untouched and finishes the rest."""
  study, out = write_study(tmp_path, text_corpus), str(tmp_path / "sweep")
  command = [sys.executable, "-m", "sparseformer.train.cli", "sweep", "run", "--experiment", study, "--out", out,
             "--parallel", "2"]
  env = {**os.environ, **compile_cache_env(tmp_path_factory.getbasetemp())}
  with open(tmp_path / "first.log", "w", encoding="utf-8") as log:
    sweep = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline, starting, trainers = time.monotonic() + 240, [], []
    while time.monotonic() < deadline and sweep.poll() is None:
      statuses = _statuses(out)
      # a run still starting up (no metrics yet) cannot finish on its own before its trainer gets the signal
      starting = [name for name, status in statuses.items() if status and status["status"] == "running"
                  and store.last_step(store.run_dir(out, name)) is None]
      # the status is written just before the trainer is spawned: wait until a trainer process exists too
      trainers = _children(sweep.pid) if starting else []
      if trainers and any(status and status["status"] == "done" for status in statuses.values()):
        break
      time.sleep(0.1)
    sweep.kill()
    sweep.wait()
  assert sweep.returncode == -signal.SIGKILL, open(tmp_path / "first.log", encoding="utf-8").read()
  assert trainers, "no trainer was running when the sweep was killed"
  deadline = time.monotonic() + 60
  while any(map(_alive, trainers)) and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not any(map(_alive, trainers)), "trainers outlived their sweep"
  for name in starting:  # killed with the sweep, not finished: no final "Logs: ..." line of a completed run
    with open(os.path.join(store.run_dir(out, name), store.LOG_FILE), encoding="utf-8") as file:
      assert "\nLogs: " not in file.read(), f"{name} trained to the end after its sweep was killed"
  done_before = {name: status for name, status in _statuses(out).items() if status and status["status"] == "done"}
  assert 1 <= len(done_before) < 4
  untouched = {name: _snapshot(store.run_dir(out, name)) for name in done_before}

  rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, check=False)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  for name in done_before:
    assert f"{name}: already done, skipped" in rerun.stdout
    assert _snapshot(store.run_dir(out, name)) == untouched[name]  # metrics, status, checkpoints: not rewritten
  final = _statuses(out)
  assert sorted(final) == ["a__lr=3e-3__seed=0", "a__lr=3e-3__seed=1", "b__lr=3e-3__seed=0", "b__lr=3e-3__seed=1"]
  for name, status in final.items():
    assert status["status"] == "done" and status["returncode"] == 0 and status["error"] is None, name
    assert status["attempts"] == 1 if name in done_before else status["attempts"] in (1, 2)
    assert store.last_step(store.run_dir(out, name)) == 3
    with open(os.path.join(store.run_dir(out, name), "config.json"), encoding="utf-8") as file:
      config = json.load(file)
    seed = int(name[-1])
    assert (config["train"]["seed"], config["data"]["seed"]) == (seed, seed)
    assert config["data"]["val_fraction"] == (0.2 if name.startswith("b") else 0.1)
  sweep_json = store.load_sweep(out)
  assert [run["name"] for run in sweep_json["runs"]] == sorted(final) and sweep_json["experiment"] == study
  assert f"Sweep {out}: 4 of 4 runs done ({len(done_before)} finished earlier), 0 failed." in rerun.stdout
  if os.path.exists(os.path.join(out, "results.csv")):  # report.py (another module) ran at the end
    with open(os.path.join(out, "results.csv"), encoding="utf-8") as file:
      assert sorted(row["name"] for row in csv.DictReader(file)) == sorted(final)
