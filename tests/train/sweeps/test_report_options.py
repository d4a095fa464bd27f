"""The three report options (issue 15) end to end on a synthetic sweep directory: steps to a target,
train-side metric tables and curves, the frontier; as flags, as the SWEEP `report` dict stored in sweep.json,
and on a sweep.json planned before the option existed. Expectations are computed here in NumPy.

3 variants x 2 widths x 2 learning rates x 2 seeds = 24 runs, one failed. eval/loss falls as
F + (4 - F)(1 - step/100)^2 to its final value F at step 100 (FINALS); the 1e-3 runs end 0.5 higher, so the
report chooses 3e-3 everywhere and a target read at the wrong rate would be visibly wrong.
"""

import csv
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from sparseformer.train import cli
from sparseformer.train.sweeps import option_tables, plots, report, spec

VARIANTS = ("dense", "moe_a", "moe_b")
WIDTHS = (32, 64)
RATES = (1e-3, 3e-3)
SEEDS = (0, 1)
# Final eval/loss at lr 3e-3, d_model 32 (per seed); d_model 64 is 0.5 lower. Dense's mean is the target: its
# seed 1 ends above it (1 of 2 reached), moe_a reaches it with both seeds, moe_b with neither.
FINALS = {"dense": (2.0, 2.2), "moe_a": (1.8, 1.9), "moe_b": (2.3, 2.4)}
EVAL_STEPS = np.arange(20, 101, 20)
TRAIN_STEPS = np.arange(5, 101, 5)  # 20 points: the last 10 % is the last two
MAX_VIOLATION = ("train/layer1/moe/max_violation", "train/layer3/moe/max_violation")
EXPERT_LOAD = "train/layer1/moe/expert_load"
COSTS = {"dense": 4.0, "moe_a": 2.0, "moe_b": 1.0}
X_MODULE = '''COSTS = {costs!r}


def cost(variant, overrides):
  assert isinstance(overrides, list) and "train.seed=0" in overrides
  return COSTS[variant] * (2.0 if "model.d_model=64" in overrides else 1.0)


def broken(variant, overrides):
  raise KeyError(variant)


def negative(variant, overrides):
  return -1.0
'''


def _name(variant, width, rate, seed):
  return f"{variant}__d_model={width}__lr={rate:g}__seed={seed}"


FAILED = _name("moe_b", 64, 3e-3, 1)


def _final(variant, width, rate, seed):
  return FINALS[variant][seed] - (0.5 if width == 64 else 0.0) + (0.5 if rate == 1e-3 else 0.0)


def _eval_curve(final):
  return final + (4.0 - final) * (1.0 - EVAL_STEPS / 100.0) ** 2


def _truth():
  """{run name: (eval/loss values at EVAL_STEPS, {max-violation metric: values at TRAIN_STEPS})}."""
  rng = np.random.default_rng(15)
  table = {}
  for variant in VARIANTS:
    for width in WIDTHS:
      for rate in RATES:
        for seed in SEEDS:
          violations = {metric: rng.uniform(0.0, 2.0, TRAIN_STEPS.size) for metric in MAX_VIOLATION}
          table[_name(variant, width, rate, seed)] = (_eval_curve(_final(variant, width, rate, seed)), violations)
  return table


def _write_sweep(root, truth, report_dict=None):
  runs = []
  for variant in VARIANTS:
    for width in WIDTHS:
      for rate in RATES:
        for seed in SEEDS:
          name = _name(variant, width, rate, seed)
          sets = [f"model.d_model={width}", f"train.learning_rate={rate!r}",
                  f"train.seed={seed}", f"data.seed={seed}"]
          runs.append({"name": name, "variant": variant, "grid": {"model.d_model": width}, "learning_rate": rate,
                       "seed": seed, "overrides": sets})
          run_dir = os.path.join(root, "runs", name)
          os.makedirs(run_dir)
          losses, violations = truth[name]
          records = [{"step": int(step), "train/loss": 3.0, EXPERT_LOAD: [0.25, 0.75],
                      **{metric: float(values[i]) for metric, values in violations.items()}}
                     for i, step in enumerate(TRAIN_STEPS)]
          records += [{"step": int(step), "eval/loss": float(value)} for step, value in zip(EVAL_STEPS, losses)]
          status = "done"
          if name == FAILED:  # a tempting value in a failed run: must enter no table
            records, status = [{"step": 20, "eval/loss": 0.1, MAX_VIOLATION[0]: 99.0}], "failed"
          with open(os.path.join(run_dir, "metrics.jsonl"), "w") as file:
            file.writelines(json.dumps(record) + "\n" for record in records)
          with open(os.path.join(run_dir, "run_status.json"), "w") as file:
            json.dump({"status": status, "error": None, "wall_time_s": 1.0}, file)
  sweep = {"format": "sparseformer.sweep/1", "experiment": "synthetic", "overrides": [], "select": "eval/loss",
           "select_mode": "min", "compare_at": "steps", "swept_fields": ["model.d_model"], "runs": runs}
  if report_dict is not None:
    sweep["report"] = report_dict
  with open(os.path.join(root, "sweep.json"), "w") as file:
    json.dump(sweep, file)


@pytest.fixture(scope="module")
def x_module(tmp_path_factory):
  """The importable module name of the frontier's cost functions."""
  directory = tmp_path_factory.mktemp("xmodule")
  (directory / "issue15_costs.py").write_text(X_MODULE.format(costs=COSTS))
  sys.path.insert(0, str(directory))
  yield "issue15_costs"
  sys.path.remove(str(directory))
  sys.modules.pop("issue15_costs", None)


FLAGS = {"target": "eval/loss:dense", "train_metrics": "train/layer*/moe/max_violation,train/*/expert_load"}


@pytest.fixture(scope="module")
def reported(tmp_path_factory, x_module):
  """(directory, truth, write_report's result) of the sweep planned without `report`, reported with flags."""
  root = str(tmp_path_factory.mktemp("sweep"))
  truth = _truth()
  _write_sweep(root, truth)
  return root, truth, report.write_report(root, **FLAGS, frontier_x=f"{x_module}:cost")


def _read_csv(path):
  with open(path, newline="") as file:
    return list(csv.DictReader(file))


def _finished(variant, width, rate=3e-3):
  return [seed for seed in SEEDS if _name(variant, width, rate, seed) != FAILED]


def _reach(values, target):
  """NumPy reference of the first crossing (loss falling): np.interp between the bracketing points."""
  reached = values <= target + 1e-9
  if not reached.any():
    return None
  index = int(np.argmax(reached))
  if index == 0:
    return float(EVAL_STEPS[0])
  return float(np.interp(target, [values[index], values[index - 1]], [EVAL_STEPS[index], EVAL_STEPS[index - 1]]))


def test_steps_to_target_csv_against_numpy(reported):
  root, truth, result = reported
  rows = _read_csv(os.path.join(root, "steps_to_target.csv"))
  assert result["steps_to_target_csv"] == os.path.join(root, "steps_to_target.csv")
  assert [(row["variant"], int(row["model.d_model"])) for row in rows] == [
      (variant, width) for width in WIDTHS for variant in VARIANTS]  # grouped by grid point
  for width in WIDTHS:
    target = np.mean([truth[_name("dense", width, 3e-3, seed)][0][-1] for seed in SEEDS])
    reference_curve = np.mean([truth[_name("dense", width, 3e-3, seed)][0] for seed in SEEDS], axis=0)
    reference_steps = _reach(reference_curve, target)
    assert reference_steps == 100.0  # the seed-mean curve ends on the target
    for row in rows:
      if int(row["model.d_model"]) != width:
        continue
      variant, seeds = row["variant"], _finished(row["variant"], width)
      assert float(row["learning_rate"]) == 3e-3 and row["reference"] == "dense"
      np.testing.assert_allclose(float(row["target"]), target, rtol=1e-12)
      expected = [_reach(truth[_name(variant, width, 3e-3, seed)][0], target) for seed in seeds]
      got = json.loads(row["steps_per_seed"])
      assert json.loads(row["seeds"]) == list(seeds) and [step is None for step in got] == [
          step is None for step in expected]
      np.testing.assert_allclose([step for step in got if step is not None],
                                 [step for step in expected if step is not None], rtol=1e-12)
      assert int(row["seeds_reached"]) == sum(step is not None for step in expected)
      if all(step is not None for step in expected) and len(expected) > 1:
        np.testing.assert_allclose([float(row["mean_steps"]), float(row["std_steps"])],
                                   [np.mean(expected), np.std(expected, ddof=1)], rtol=1e-12)
      else:
        assert row["mean_steps"] == row["std_steps"] == ""  # never a mean over the seeds that happened to reach
      curve = np.mean([truth[_name(variant, width, 3e-3, seed)][0] for seed in seeds], axis=0)
      curve_steps = _reach(curve, target)
      if curve_steps is None:
        assert row["curve_steps"] == row["speedup"] == ""
      else:
        np.testing.assert_allclose(float(row["curve_steps"]), curve_steps, rtol=1e-12)
        np.testing.assert_allclose(float(row["speedup"]), reference_steps / curve_steps, rtol=1e-12)
  by_key = {(row["variant"], row["model.d_model"]): row for row in rows}
  assert by_key["dense", "32"]["seeds_reached"] == "1"
  assert json.loads(by_key["dense", "32"]["steps_per_seed"])[1] is None
  assert by_key["moe_a", "32"]["seeds_reached"] == "2" and float(by_key["moe_a", "32"]["speedup"]) > 1
  assert by_key["moe_b", "32"]["seeds_reached"] == "0" and by_key["moe_b", "32"]["curve_steps"] == ""


def _markdown_rows(text, heading):
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("## ") and heading in line)
  table = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("|"))
  rows = []
  for line in lines[table + 2:]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))])
  return rows


def test_summary_markdown_sections(reported):
  root, _, _ = reported
  with open(os.path.join(root, "summary.md"), encoding="utf-8") as file:
    text = file.read()
  rows = {(row[0], row[1]): row for row in _markdown_rows(text, "Steps to reach `dense`'s final `eval/loss`")}
  assert rows["dense", "32"][4].endswith("seed 1: not reached") and rows["dense", "32"][5] == "1 of 2 reached"
  assert rows["dense", "32"][6:] == ["100", "1x"]
  assert rows["moe_b", "32"][4:] == ["seed 0: not reached; seed 1: not reached", "0 of 2 reached", "not reached", "–"]
  assert " ± " in rows["moe_a", "32"][5]
  for metric in MAX_VIOLATION:
    assert len(_markdown_rows(text, f"`{metric}` over training")) == len(VARIANTS) * len(WIDTHS)
  assert f"Train metrics skipped: `{EXPERT_LOAD}` (logged as list, not a number)." in text
  frontier = _markdown_rows(text, "Frontier: `eval/loss`")
  assert [(row[0], row[1], row[3], row[-1]) for row in frontier[:3]] == [
      ("moe_b", "32", "1", "yes"), ("moe_a", "32", "2", "yes"), ("dense", "32", "4", "")]


def test_train_metric_statistics_against_numpy(reported):
  root, truth, result = reported
  rows = _read_csv(os.path.join(root, "train_metrics.csv"))
  assert result["skipped"] == f"{EXPERT_LOAD} (logged as list, not a number)"
  assert {row["metric"] for row in rows} == set(MAX_VIOLATION)
  assert len(rows) == len(MAX_VIOLATION) * len(VARIANTS) * len(WIDTHS) * 4
  for row in rows:
    width = int(row["model.d_model"])
    per_seed = np.array([truth[_name(row["variant"], width, 3e-3, seed)][1][row["metric"]]
                         for seed in _finished(row["variant"], width)])
    last = int(np.ceil(per_seed.shape[1] / 10))
    values = {"mean": per_seed.mean(axis=1), "last_10pct_mean": per_seed[:, -last:].mean(axis=1),
              "final": per_seed[:, -1], "max": per_seed.max(axis=1)}[row["statistic"]]
    assert int(row["n"]) == len(values) and float(row["learning_rate"]) == 3e-3
    np.testing.assert_allclose(float(row["mean"]), values.mean(), rtol=1e-12)
    if len(values) > 1:
      np.testing.assert_allclose(float(row["std"]), values.std(ddof=1), rtol=1e-12)
    else:
      assert row["std"] == ""  # moe_b at d_model 64: its other seed failed
  assert last == 2


def test_frontier_csv_and_the_new_plots(reported):
  root, _, result = reported
  rows = _read_csv(os.path.join(root, "frontier.csv"))
  for row in rows:
    width = int(row["model.d_model"])
    assert float(row["x"]) == COSTS[row["variant"]] * (2.0 if width == 64 else 1.0)
    finals = [_final(row["variant"], width, 3e-3, seed) for seed in _finished(row["variant"], width)]
    np.testing.assert_allclose(float(row["mean"]), np.mean(finals), rtol=1e-12)
    assert row["on_frontier"] == str(row["variant"] != "dense")
  names = {os.path.basename(path) for path in result["plots"]}
  assert {"curve_train_layer1_moe_max_violation.png", "curve_train_layer3_moe_max_violation.png",
          "frontier_eval_loss.png"} <= names
  assert "curve_train_layer1_moe_expert_load.png" not in names
  for name in names:
    with open(os.path.join(root, "plots", name), "rb") as file:
      assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_report_key_is_the_default_and_a_flag_overrides_or_turns_it_off(reported, tmp_path, x_module):
  root, truth, _ = reported
  stored = spec.expand("synthetic", spec_base(), {"report": dict(FLAGS, frontier_x=f"{x_module}:cost"),
                                                  "variants": {name: [] for name in VARIANTS}}).report
  assert stored == {"target": "eval/loss:dense", "frontier_x": f"{x_module}:cost",
                    "train_metrics": ["train/layer*/moe/max_violation", "train/*/expert_load"]}
  copy = str(tmp_path / "with_report")
  _write_sweep(copy, truth, report_dict=stored)
  analysis = report.analyze(copy)  # the stored options, as the flags gave them
  assert option_tables.files(analysis) == option_tables.files(report.analyze(root, **FLAGS,
                                                                             frontier_x=f"{x_module}:cost"))
  moved = report.analyze(copy, target="eval/loss:moe_a", train_metrics="none", frontier_x="NONE")
  assert moved.options.target == ("eval/loss", "moe_a") and moved.options.where["target"] == "--target"
  assert moved.train_rows == [] and moved.frontier_rows is None and not moved.train_metric_names
  assert set(option_tables.files(moved)) == {"steps_to_target.csv"}
  assert {row.variant: row.speedup for row in moved.target_rows if row.point["model.d_model"] == 32}["moe_a"] == 1.0


def spec_base():
  from sparseformer.train.config import RunConfig  # pylint: disable=import-outside-toplevel
  return RunConfig()


def test_a_sweep_json_without_report_reports_as_before(reported, tmp_path):
  _, truth, _ = reported
  old = str(tmp_path / "old")
  _write_sweep(old, truth)
  analysis = report.analyze(old)
  assert analysis.target_rows is None and analysis.frontier_rows is None and analysis.train_rows == []
  assert option_tables.files(analysis) == {}
  assert "## Steps to reach" not in report.summary_markdown(analysis)


@pytest.mark.parametrize("options,message", [
    (dict(target="eval/loss:dnse"), r"--target: reference variant 'dnse' is not in this sweep \(its variants: "
     r"dense, moe_a, moe_b\)\. Did you mean 'dense'\? Name one of them in --target\."),
    (dict(target="eval/loss"), r"--target='eval/loss': expected METRIC:REFERENCE_VARIANT"),
    (dict(target="eval/accuracy:dense"), r"--target: 'eval/accuracy' is logged by no finished run"),
    (dict(target="train/layer1/moe/max_violation:dense"), r"has no direction to reach a target in"),
    (dict(train_metrics="train/layer*/moe/max_violaton"), r"--train-metrics: 'train/layer\*/moe/max_violaton' "
     r"matches no metric the runs logged \(closest: train/layer3/moe/max_violation, train/layer1/moe/max_violation"),
    (dict(frontier_x="issue15_costs"), r"--frontier-x='issue15_costs': expected MODULE:FUNCTION"),
    (dict(frontier_x="no_such_module_15:cost"), r"cannot import 'no_such_module_15'"),
    (dict(frontier_x="issue15_costs:costs"), r"issue15_costs has no function 'costs' \(it has: broken, cost, "
     r"negative\)"),
    (dict(frontier_x="issue15_costs:broken"), r"issue15_costs:broken\('dense', overrides\) raised KeyError"),
    (dict(frontier_x="issue15_costs:negative"), r"returned -1.0; it must return a finite positive number"),
])
def test_bad_options_fail_before_any_output(reported, tmp_path, x_module, options, message):
  _, truth, _ = reported
  copy = str(tmp_path / "bad")
  _write_sweep(copy, truth)
  with pytest.raises(ValueError, match=message):
    report.write_report(copy, **options)
  assert sorted(os.listdir(copy)) == ["runs", "sweep.json"]


def test_a_bad_stored_option_names_the_sweep_key_and_the_way_out(reported, tmp_path):
  _, truth, _ = reported
  copy = str(tmp_path / "stored")
  _write_sweep(copy, truth, report_dict={"target": "eval/loss:gone"})
  with pytest.raises(ValueError, match=r"SWEEP\['report'\]\['target'\]: reference variant 'gone' is not in this "
                     r"sweep .* in SWEEP\['report'\]\['target'\] \(sweep.json holds the planned value\), or pass "
                     r"--target to `sweep report` \(--target none skips it\)"):
    report.analyze(copy)
  assert report.analyze(copy, target="none").target_rows is None


def test_cli_flags_reach_write_report(tmp_path, monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(report, "write_report", lambda directory, **options: calls.append((directory, options)) or {})
  assert cli.main(["sweep", "report", str(tmp_path)]) == 0
  assert cli.main(["sweep", "report", str(tmp_path), "--target", "eval/loss:dense", "--train-metrics",
                   "train/layer*/moe/max_violation", "--frontier-x", "m:f"]) == 0
  assert calls == [(str(tmp_path), {}), (str(tmp_path), {"target": "eval/loss:dense", "frontier_x": "m:f",
                                                         "train_metrics": "train/layer*/moe/max_violation"})]
  capsys.readouterr()


def test_a_rerun_without_an_option_removes_its_old_csv(reported, tmp_path, monkeypatch):
  root, _, _ = reported
  copy = str(tmp_path / "rerun")
  shutil.copytree(root, copy)
  monkeypatch.setattr(plots, "write_plots", lambda _, out_dir: os.makedirs(out_dir) or [])  # no drawing: CPU
  report.write_report(copy, target="eval/loss:dense")
  assert os.path.exists(os.path.join(copy, "steps_to_target.csv"))
  assert not os.path.exists(os.path.join(copy, "frontier.csv"))
  assert not os.path.exists(os.path.join(copy, "train_metrics.csv"))
  assert not os.path.exists(os.path.join(copy, "plots", "frontier_eval_loss.png"))
