"""train/sweeps/store.py: the sweep directory contract (sweep.json identity, run status, locks, metrics steps)."""

import json
import os

import pytest

from sparseformer.train.sweeps import store


def _sweep(**changes):
  sweep = {"format": store.FORMAT, "experiment": "study", "overrides": ["train.steps=3"], "select": "eval/loss",
           "select_mode": "min", "compare_at": "steps", "swept_fields": [],
           "runs": [{"name": f"r{i}", "variant": "base", "grid": {}, "learning_rate": 1e-3, "seed": i,
                     "overrides": [f"train.seed={i}"]} for i in range(2)]}
  sweep.update(changes)
  return sweep


def _snapshot(directory):
  return {path: (os.stat(os.path.join(directory, path)).st_mtime_ns, open(os.path.join(directory, path), "rb").read())
          for path in os.listdir(directory)}


def test_write_sweep_then_the_same_sweep_again_and_load_it(tmp_path):
  store.write_sweep(str(tmp_path), _sweep())
  store.write_sweep(str(tmp_path), _sweep())  # the same sweep: resuming is fine
  assert store.load_sweep(str(tmp_path)) == _sweep()
  assert store.run_dirs(str(tmp_path)) == [os.path.join(str(tmp_path), "runs", "r0"),
                                           os.path.join(str(tmp_path), "runs", "r1")]
  assert sorted(os.listdir(tmp_path)) == ["sweep.json"]  # no temporary file left


@pytest.mark.parametrize("changes,message", [
    (dict(experiment="other"), r"experiment: 'study' in DIR, 'other' now"),
    (dict(overrides=["train.steps=4"]), r"overrides: \['train.steps=3'\] in DIR, \['train.steps=4'\] now"),
    (dict(runs=_sweep()["runs"][:1]), r"runs only in DIR: r1"),
    (dict(runs=_sweep()["runs"][::-1]), r"the same runs in another order"),
])
def test_a_dir_holding_another_sweep_is_an_error_naming_the_difference_and_nothing_changes(tmp_path, changes, message):
  store.write_sweep(str(tmp_path), _sweep())
  before = _snapshot(tmp_path)
  with pytest.raises(ValueError, match=f"holds a different sweep .*{message}.*choose a new --out directory"):
    store.write_sweep(str(tmp_path), _sweep(**changes))
  assert _snapshot(tmp_path) == before


def test_load_sweep_names_a_missing_or_foreign_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="sweep.json not found: DIR must be the --out directory"):
    store.load_sweep(str(tmp_path))
  (tmp_path / "sweep.json").write_text(json.dumps({"format": "other/1"}))
  with pytest.raises(ValueError, match="has format 'other/1', expected 'sparseformer.sweep/1'"):
    store.load_sweep(str(tmp_path))


def test_status_round_trip_and_attempts_and_wall_time_carry_over(tmp_path):
  assert store.read_status(str(tmp_path)) is None
  first = store.start_status(str(tmp_path))
  assert (first["status"], first["attempts"], first["wall_time_s"], first["finished"]) == ("running", 1, 0.0, None)
  store.write_status(str(tmp_path), {**first, "status": "failed", "wall_time_s": 2.5, "returncode": 1})
  second = store.start_status(str(tmp_path))
  assert (second["attempts"], second["wall_time_s"], second["returncode"]) == (2, 2.5, None)
  with pytest.raises(ValueError, match="run status must be one of"):
    store.write_status(str(tmp_path), {**first, "status": "finished"})


def test_run_lock_is_exclusive_and_released(tmp_path):
  first, second = store.RunLock(str(tmp_path)), store.RunLock(str(tmp_path))
  assert not store.is_locked(str(tmp_path))
  assert first.acquire()
  assert store.is_locked(str(tmp_path)) and not second.acquire()
  first.release()
  assert not store.is_locked(str(tmp_path)) and second.acquire()
  second.release()


def test_last_step_and_final_checkpoint(tmp_path):
  assert store.last_step(str(tmp_path)) is None
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3, "eval/loss": 2}\n{"step": 2}\n{"st')
  assert store.last_step(str(tmp_path)) == 3  # a torn last line (a killed writer) is skipped
  (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 3}}))
  assert not store.final_checkpoint_written(str(tmp_path))
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)
  assert not store.final_checkpoint_written(str(tmp_path))
  (tmp_path / "checkpoints" / "3").mkdir()
  assert store.final_checkpoint_written(str(tmp_path))
