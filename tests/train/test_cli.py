"""The `sparseformer` command line in-process: exit codes and the output each command promises."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
from sweep_helpers import write_study

from sparseformer import experiments
from sparseformer.train import cli, overrides
from sparseformer.train import sweeps as sweeps_package
from sparseformer.train.config import RunConfig
from sparseformer.train.sweeps import commands as sweep_commands
from sparseformer.train.sweeps import local, spec, store

# Shrinks the quickstart experiment to a run of a few seconds.
TINY_SETTINGS = ["data.seq_len=32", "data.batch_size=4", "data.num_val_batches=1", "data.val_fraction=0.1",
                 "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2",
                 "train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
                 "train.checkpoint_every=2", "train.sample_tokens=4", "train.progress_bar=False",
                 "train.peak_flops=1e11"]


def _set_flags(settings: list[str]) -> list[str]:
  return [flag for setting in settings for flag in ("--set", setting)]


@pytest.fixture(scope="module")
def trained(text_corpus, tmp_path_factory):
  """(workdir, exit code, stdout) of one tiny `sparseformer train` run, shared by this file's tests."""
  root = tmp_path_factory.mktemp("cli")
  workdir = str(root / "run")
  settings = TINY_SETTINGS + [f"data.path={text_corpus}", f"data.cache_dir={root / 'cache'}"]
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = cli.main(["train", "--experiment", "quickstart", "--workdir", workdir] + _set_flags(settings))
  return workdir, code, stdout.getvalue(), settings


def test_experiments_lists_every_experiment_with_its_command(capsys):
  assert cli.main(["experiments"]) == 0
  out = capsys.readouterr().out
  assert experiments.names()
  for name in experiments.names():
    assert f"== {name}\n" in out
    assert f"sparseformer train --experiment {name}" in out
    grid = experiments.variants(name)
    if grid:
      assert f"variants: {', '.join(grid)}" in out
    if experiments.sweep(name) is not None:
      assert f"sweep: {len(spec.plan(name).runs)} runs (sparseformer sweep plan --experiment {name})" in out


def test_show_config_prints_json_with_the_override(capsys):
  assert cli.main(["show-config", "--experiment", "quickstart", "--set", "train.steps=7",
                   "--set", "model.attention_pattern=('local','global')"]) == 0
  shown = json.loads(capsys.readouterr().out)
  assert shown["train"]["steps"] == 7 and shown["model"]["attention_pattern"] == ["local", "global"]
  want = overrides.apply_overrides(experiments.get("quickstart"),
                                   ["train.steps=7", "model.attention_pattern=('local','global')"])
  assert overrides.from_dict(RunConfig, shown) == want  # nothing else changed


def test_show_config_unknown_field_exits_2_naming_close_matches(capsys):
  assert cli.main(["show-config", "--set", "train.stepz=3"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "sparseformer show-config: error: Unknown config field 'train.stepz'" in captured.err
  assert "train.steps" in captured.err


def test_show_config_applies_a_variant(capsys):
  assert cli.main(["show-config", "--experiment", "moe_ablation", "--variant", "switch"]) == 0
  shown = json.loads(capsys.readouterr().out)
  assert shown["name"] == "moe_ablation-switch"
  assert shown["model"]["ffn_pattern"] == ["dense", "moe"]
  assert (shown["model"]["moe"]["num_experts"], shown["model"]["moe"]["top_k"]) == (8, 1)


def test_unknown_variant_or_experiment_exits_2_naming_the_choices(capsys):
  assert cli.main(["show-config", "--experiment", "moe_ablation", "--variant", "swich"]) == 2
  err = capsys.readouterr().err
  assert "no variant 'swich'" in err
  for variant in experiments.variants("moe_ablation"):
    assert repr(variant) in err
  assert cli.main(["train", "--experiment", "quikstart", "--workdir", "unused"]) == 2
  err = capsys.readouterr().err
  assert "sparseformer train: error: Unknown experiment 'quikstart'. Did you mean quickstart" in err
  assert not os.path.exists("unused")


def test_train_reports_validation_sample_and_where_things_went(trained):
  workdir, code, out, _ = trained
  assert code == 0, out
  assert "Validation at step 2: loss" in out and "bits per byte" in out
  assert "Sample (prompt 'def '" in out
  assert f"Logs: {os.path.join(workdir, 'metrics.jsonl')}" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as file:
    assert json.load(file)["train"]["steps"] == 2


def test_eval_prints_json_with_loss_and_bits_per_byte(trained, capsys):
  workdir, code, _, _ = trained
  assert code == 0
  assert cli.main(["eval", "--workdir", workdir]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["step"] == 2
  assert result["loss"] > 0 and result["bits_per_byte"] > 0
  assert result["bits_per_byte"] == pytest.approx(result["loss"] / 0.6931471805599453, rel=0.05)


def test_sample_prints_the_prompt_and_its_continuation(trained, capsys):
  workdir, code, _, _ = trained
  assert code == 0
  # The default temperature and top-k are those of the sample `train` printed: its compiled step is reused.
  assert cli.main(["sample", "--workdir", workdir, "--prompt", "def ", "--tokens", "8"]) == 0
  lines = capsys.readouterr().out.split("\n", 1)
  assert lines[0].startswith("Resumed from step 2")
  text = lines[1].removesuffix("\n")
  assert text.startswith("def ")
  assert 0 < len(text) - len("def ") <= 8  # 8 byte tokens; a special id adds nothing


def test_eval_of_a_missing_or_untrained_workdir(trained, tmp_path, capsys):
  missing = str(tmp_path / "nowhere")
  assert cli.main(["eval", "--workdir", missing]) == 2
  err = capsys.readouterr().err
  assert f"sparseformer eval: error: {os.path.join(missing, 'config.json')} not found" in err
  assert "--workdir must be the directory of a training run" in err
  # A config but no checkpoint: a CheckpointError, exit 1.
  workdir, code, _, _ = trained
  assert code == 0
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), untrained / "config.json")
  assert cli.main(["eval", "--workdir", str(untrained)]) == 1
  err = capsys.readouterr().err
  assert "sparseformer eval: CheckpointError: No checkpoint in" in err and "train first" in err
  assert not (untrained / "checkpoints").exists()  # a read-only command leaves the workdir as it was


def test_train_refuses_a_workdir_holding_another_run(trained, capsys):
  workdir, code, _, settings = trained
  assert code == 0
  before = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  assert cli.main(["train", "--workdir", workdir] + _set_flags(settings + ["model.d_model=64"])) == 2
  err = capsys.readouterr().err
  assert "holds a run with a different config (model.d_model)" in err
  assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == before


def test_sweep_help_and_parsing_load_no_jax():
  code = ("import sys; from sparseformer.train import cli; "
          "cli._parser().parse_args(['sweep', 'run', '--experiment', 'x', '--out', 'y', '--parallel', '2']); "
          "print('jax' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
  assert result.stdout.strip() == "False"


def test_sweep_size_of_an_experiment_with_a_sweep(tmp_path):
  study = write_study(tmp_path, str(tmp_path))
  assert sweep_commands.sweep_size(study) == f"4 runs (sparseformer sweep plan --experiment {study})"
  assert sweep_commands.sweep_size("quickstart") is None


def test_sweep_plan_prints_each_run_with_its_overrides_and_the_count(tmp_path, capsys):
  study = write_study(tmp_path, str(tmp_path))
  assert cli.main(["sweep", "plan", "--experiment", study, "--seeds", "1", "--set", "train.steps=2"]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[:2] == [
      "a__lr=3e-3__seed=1",
      "    --set train.learning_rate=0.003 --set train.seed=1 --set data.seed=1 --set train.steps=2"]
  assert "    --set data.val_fraction=0.2 --set train.learning_rate=0.003" in out
  assert out.splitlines()[-1].startswith(f"2 runs of {study}; select eval/loss (min), compared at equal steps")
  assert cli.main(["sweep", "plan", "--experiment", study, "--set", "model.dmodel=3"]) == 2
  assert "Did you mean: model.d_model" in capsys.readouterr().err


def test_sweep_status_counts_and_lists_each_run(tmp_path, capsys):
  study, out = write_study(tmp_path, str(tmp_path)), str(tmp_path / "sweep")
  plan = spec.plan(study)
  store.write_sweep(out, plan.to_json())
  names = [run.name for run in plan.runs]
  done, stale, failed = (store.run_dir(out, name) for name in names[:3])
  for path, state in ((done, "done"), (stale, "running"), (failed, "failed")):
    os.makedirs(path)
    store.write_status(path, {**store.start_status(path), "status": state, "wall_time_s": 12.5})
  with open(os.path.join(done, "metrics.jsonl"), "w", encoding="utf-8") as file:
    file.write('{"step": 2}\n{"step": 3}\n')
  assert cli.main(["sweep", "status", out]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == f"{out}: 4 runs of {study}: 1 done, 1 interrupted, 1 failed, 1 pending"
  assert lines[1].split() == ["done", "step", "3", "12.5", "s", names[0]]
  assert lines[2].split()[0] == "interrupted"  # "running" but nobody holds its lock: its sweep died
  assert lines[4].split() == ["pending", "step", "-", "-", names[3]]
  lock = store.RunLock(stale)
  assert lock.acquire()
  try:
    assert cli.main(["sweep", "status", out]) == 0
    assert "1 running" in capsys.readouterr().out
  finally:
    lock.release()
  assert cli.main(["sweep", "status", str(tmp_path / "nowhere")]) == 2
  assert "sweep.json not found" in capsys.readouterr().err


def _fake_report(monkeypatch, write_report):
  module = types.ModuleType("sparseformer.train.sweeps.report")
  module.write_report = write_report
  monkeypatch.setitem(sys.modules, module.__name__, module)
  monkeypatch.setattr(sweeps_package, "report", module, raising=False)


def test_sweep_report_calls_write_report_with_the_directory(tmp_path, monkeypatch, capsys):
  calls = []
  _fake_report(monkeypatch, lambda directory: calls.append(directory) or {"summary_md": "S.md", "runs": 4})
  assert cli.main(["sweep", "report", str(tmp_path)]) == 0
  assert calls == [str(tmp_path)]
  assert capsys.readouterr().out == "summary_md: S.md\nruns: 4\n"


@pytest.mark.parametrize("failed", [0, 1])
def test_sweep_run_writes_the_report_and_a_report_error_does_not_fail_it(tmp_path, monkeypatch, capsys, failed):
  study, out = write_study(tmp_path, str(tmp_path)), str(tmp_path / "sweep")
  engine_calls, report_calls = [], []
  def fake_run_sweep(plan, directory, parallel):
    engine_calls.append((len(plan.runs), directory, parallel))
    return {"done": 3 - failed, "failed": failed, "skipped": 1}
  def broken_report(directory):
    report_calls.append(directory)
    raise KeyError("eval/loss")
  monkeypatch.setattr(local, "run_sweep", fake_run_sweep)
  _fake_report(monkeypatch, broken_report)
  assert cli.main(["sweep", "run", "--experiment", study, "--out", out, "--parallel", "2"]) == failed
  captured = capsys.readouterr()
  assert engine_calls == [(4, out, 2)] and report_calls == [out]
  assert f"Sweep {out}: {4 - failed} of 4 runs done (1 finished earlier), {failed} failed." in captured.out
  assert f"sweep report failed (KeyError: 'eval/loss'); rerun `sparseformer sweep report {out}`." in captured.out
  assert ("1 of 4 runs failed" in captured.err) == bool(failed)
