"""train/sweeps/report.py (and plots.py, hparams.py) on a synthetic sweep directory with known values.

2 variants x 2 grid values (model.d_model) x 3 learning rates x 3 seeds = 36 planned runs: one failed, one
still running, one never started. Three learning rates so that a point can choose the middle one (no edge
flag) as well as an end. Expectations are computed here in NumPy from the table the files were built from.
"""

import csv
import json
import math
import os
import re
import shutil
import struct

import numpy as np
import pytest

from sparseformer.models import flops
from sparseformer.models.config import ModelConfig
from sparseformer.train import overrides
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.sweeps import hparams, plots, report

VARIANTS = {"dense": ("global",), "local": ("local",)}
BATCH = {"dense": 4, "local": 8}  # different tokens per step: compare_at="tokens" then cuts the local runs
WIDTHS = [32, 64]
WARMUP = {32: 2, 64: 4}  # zipped with the width in the grid: one plot for both, no panel per warmup
RATES = [1e-3, 3e-3, 1e-2]
SEEDS = [0, 1, 2]
SEQ_LEN, STEPS = 16, 20
SELECT = "eval/example_accuracy"
# The failed run's tempting 0.99 would move dense d=32's choice; the running and never-started runs sit at
# the chosen rates of the d=64 points (leaving n = 2 there).
FAILED, RUNNING, NOT_RUN = "dense-d32-lr0.01-s1", "dense-d64-lr0.01-s0", "local-d64-lr0.01-s2"
T975 = {1: 12.706204736174707, 2: 4.302652729749464}  # published t_{0.975, df}


def _name(variant, width, rate, seed):
  return f"{variant}-d{width}-lr{rate:g}-s{seed}"


def _truth(seed_value=0):
  """{run name: (final accuracy, accuracy at step 10)}: the middle rate wins for d=32, the largest for d=64."""
  rng = np.random.default_rng(seed_value)
  table = {}
  for v, variant in enumerate(VARIANTS):
    for width in WIDTHS:
      for r, rate in enumerate(RATES):
        peak = 1 if width == 32 else 2
        for seed in SEEDS:
          final = 0.5 + 0.1 * v - 0.1 * abs(r - peak) + 0.03 * rng.standard_normal()
          middle = final + (0.05 if seed == 2 else -0.1)  # seed 2 peaks early: best != final
          table[_name(variant, width, rate, seed)] = (float(final), float(middle))
  return table


def _config(variant, width, rate, seed) -> RunConfig:
  model = ModelConfig(num_layers=1, d_model=width, num_heads=2, num_kv_heads=2, max_seq_len=SEQ_LEN,
                      attention_pattern=VARIANTS[variant])
  data = DataConfig(seq_len=SEQ_LEN, batch_size=BATCH[variant])
  train = TrainConfig(steps=STEPS, learning_rate=rate, seed=seed, warmup_steps=WARMUP[width])
  return RunConfig(model=model, data=data, train=train)


def _write_sweep(root, truth, compare_at="steps"):
  runs = []
  for variant in VARIANTS:
    for width in WIDTHS:
      for rate in RATES:
        for seed in SEEDS:
          name = _name(variant, width, rate, seed)
          sets = [f"model.attention_pattern={VARIANTS[variant][0]}", f"model.d_model={width}",  # a bare word
                  f"train.warmup_steps={WARMUP[width]}", f"train.learning_rate={rate}", f"train.seed={seed}"]
          grid = {"model.d_model": width, "train.warmup_steps": WARMUP[width]}
          runs.append({"name": name, "variant": variant, "grid": grid, "learning_rate": rate, "seed": seed,
                       "overrides": sets})
          if name == NOT_RUN:
            continue
          run_dir = os.path.join(root, "runs", name)
          os.makedirs(run_dir)
          with open(os.path.join(run_dir, "config.json"), "w") as file:
            json.dump(overrides.to_dict(_config(variant, width, rate, seed)), file)
          final, middle = truth[name]
          lines = [{"step": 10, "train/loss": 3.0 - middle}, {"step": 10, "eval/loss": 2.0 - middle, SELECT: middle}]
          status = {"status": "done", "error": None, "returncode": 0, "wall_time_s": 1.5 + seed, "attempts": 1}
          if name == FAILED:  # a diverged run with a tempting early value: must not enter any statistic
            lines = [{"step": 10, "train/loss": 0.1}, {"step": 10, "eval/loss": 0.1, SELECT: 0.99}]
            status.update(status="failed", error="NonFiniteError: loss nan | at step 11", returncode=1)
          elif name == RUNNING:
            status.update(status="running", returncode=None)
          else:
            lines += [{"step": 20, "train/loss": 3.0 - final}, {"step": 20, "eval/loss": 2.0 - final, SELECT: final}]
          with open(os.path.join(run_dir, "metrics.jsonl"), "w") as file:
            file.writelines(json.dumps(line) + "\n" for line in lines)
            if name == RUNNING:
              file.write('{"step": 20, "train/lo')  # torn line of a run killed mid-write
          with open(os.path.join(run_dir, "run_status.json"), "w") as file:
            json.dump(status, file)
  sweep = {"format": "sparseformer.sweep/1", "experiment": "synthetic", "overrides": ["train.steps=20"],
           "select": SELECT, "select_mode": "max", "compare_at": compare_at,
           "swept_fields": ["model.attention_pattern", "model.d_model", "train.warmup_steps", "train.learning_rate",
                            "train.seed"],
           "runs": runs}
  with open(os.path.join(root, "sweep.json"), "w") as file:
    json.dump(sweep, file)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """(directory, truth table, write_report's result) of the synthetic sweep, reported once per module."""
  root = str(tmp_path_factory.mktemp("sweep"))
  truth = _truth()
  _write_sweep(root, truth)
  return root, truth, report.write_report(root)


def _expected_points(truth):
  """{(variant, width): (chosen rate, at_edge, finished values at that rate)}, in NumPy from the table."""
  expected = {}
  for variant in VARIANTS:
    for width in WIDTHS:
      finished = {rate: [truth[_name(variant, width, rate, seed)][0] for seed in SEEDS
                         if _name(variant, width, rate, seed) not in (FAILED, RUNNING, NOT_RUN)] for rate in RATES}
      index = int(np.argmax([np.mean(finished[rate]) for rate in RATES]))
      expected[variant, width] = (RATES[index], index in (0, len(RATES) - 1), np.array(finished[RATES[index]]))
  return expected


def _read_csv(path):
  with open(path, newline="") as file:
    return list(csv.DictReader(file))


def test_summary_csv_learning_rate_and_statistics(sweep):
  root, truth, _ = sweep
  rows = [row for row in _read_csv(os.path.join(root, "summary.csv")) if row["metric"] == SELECT]
  expected = _expected_points(truth)
  assert len(rows) == len(expected) == 4
  edges = set()
  for row in rows:
    rate, at_edge, values = expected[row["variant"], int(row["model.d_model"])]
    assert float(row["learning_rate"]) == rate
    assert row["lr_at_edge"] == str(at_edge)
    edges.add(at_edge)
    n = len(values)
    half = T975[n - 1] * values.std(ddof=1) / math.sqrt(n)
    got = [float(row[key]) for key in ("mean", "std", "ci95_low", "ci95_high")]
    assert int(row["n"]) == n
    np.testing.assert_allclose(got, [values.mean(), values.std(ddof=1), values.mean() - half, values.mean() + half],
                               rtol=1e-9)
    assert row["compare_at"] == "steps" and float(row["compare_value"]) == STEPS
  assert edges == {True, False}  # the table has both kinds of point
  assert expected["dense", 64][2].size == expected["local", 64][2].size == 2
  loss_rows = [row for row in _read_csv(os.path.join(root, "summary.csv")) if row["metric"] == "eval/loss"]
  for row in loss_rows:
    values = 2.0 - expected[row["variant"], int(row["model.d_model"])][2]
    np.testing.assert_allclose(float(row["mean"]), values.mean(), rtol=1e-9)


def _markdown_rows(text, heading):
  """The data rows of the table under the first heading line that contains `heading`."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("## ") and heading in line)
  rows = []
  for line in lines[start + 4:]:  # heading, blank, header, separator
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))])  # "\|" is a pipe in a cell
  return lines[start], rows


def test_summary_markdown(sweep):
  root, truth, result = sweep
  with open(os.path.join(root, "summary.md"), encoding="utf-8") as file:
    text = file.read()
  assert "Report covers 33 of 36 runs: 1 failed, 1 running, 1 not run." in text
  assert result["coverage"] == "report covers 33 of 36 runs: 1 failed, 1 running, 1 not run"
  expected = _expected_points(truth)
  _, rows = _markdown_rows(text, "Learning rate: mean of")
  for variant, width, warmup, *cells in rows:
    assert int(warmup) == WARMUP[int(width)]
    for rate, cell in zip(RATES, cells):
      values = [truth[_name(variant, int(width), rate, seed)][0] for seed in SEEDS
                if _name(variant, int(width), rate, seed) not in (FAILED, RUNNING, NOT_RUN)]
      shown = f"{np.mean(values):.4g} ({len(values)})"
      assert cell == (f"**{shown}**" if rate == expected[variant, int(width)][0] else shown)
  heading, rows = _markdown_rows(text, f"`{SELECT}` at equal steps")
  assert heading == f"## `{SELECT}` at equal steps (20) (selection metric)"
  assert len(rows) == 4
  for variant, width, _, rate, n, mean_std, interval in rows:
    chosen, at_edge, values = expected[variant, int(width)]
    assert rate == f"{chosen:.3g}" + (" ⚠ edge" if at_edge else "")
    assert int(n) == len(values)
    assert mean_std == f"{values.mean():.4g} ± {values.std(ddof=1):.4g}"
    half = T975[len(values) - 1] * values.std(ddof=1) / math.sqrt(len(values))
    assert interval == f"[{values.mean() - half:.4g}, {values.mean() + half:.4g}]"
  _, left_out = _markdown_rows(text, "Runs not in the statistics")
  assert sorted(row[0] for row in left_out) == sorted([FAILED, RUNNING, NOT_RUN])
  assert any("NonFiniteError: loss nan \\| at step 11" in row[-1] for row in left_out)  # '|' escaped


def test_results_csv(sweep):
  root, truth, _ = sweep
  rows = _read_csv(os.path.join(root, "results.csv"))
  assert len(rows) == 36
  assert [row["name"] for row in rows[:2]] == [_name("dense", 32, 1e-3, 0), _name("dense", 32, 1e-3, 1)]
  by_name = {row["name"]: row for row in rows}
  flops_per_token = {}
  for name, row in by_name.items():
    variant, width = row["variant"], int(row["model.d_model"])
    assert float(row["learning_rate"]) in RATES and int(row["seed"]) in SEEDS
    if name == NOT_RUN:  # no config.json yet: the value its --set gives
      assert row["status"] == "not run" and row["steps"] == "" and row[f"final/{SELECT}"] == ""
      assert row["model.attention_pattern"] == "local"
      continue
    assert row["model.attention_pattern"] == json.dumps(list(VARIANTS[variant]))  # from config.json
    final, middle = truth[name]
    if name in (FAILED, RUNNING):
      assert row["status"] == ("failed" if name == FAILED else "running") and row["steps"] == "10"
      continue
    assert row["status"] == "done" and row["error"] == ""
    assert int(row["steps"]) == STEPS and int(row["tokens"]) == STEPS * BATCH[variant] * SEQ_LEN
    if (variant, width) not in flops_per_token:
      config = _config(variant, width, 1e-3, 0)
      flops_per_token[variant, width] = flops.train_flops_per_token(config.model, SEQ_LEN)
    np.testing.assert_allclose(float(row["model_flops"]), int(row["tokens"]) * flops_per_token[variant, width],
                               rtol=1e-12)
    assert float(row[f"final/{SELECT}"]) == final and float(row[f"best/{SELECT}"]) == max(final, middle)
    assert float(row["best/eval/loss"]) == min(2.0 - final, 2.0 - middle)
    assert float(row["final/train/loss"]) == 3.0 - final
    assert float(row["wall_time_s"]) == 1.5 + int(row["seed"])
  assert by_name[FAILED]["error"] == "NonFiniteError: loss nan | at step 11"
  assert float(by_name[FAILED][f"final/{SELECT}"]) == 0.99


def _png_size(path):
  with open(path, "rb") as file:
    head = file.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
  return struct.unpack(">II", head[16:24])


def test_plots_are_valid_pngs(sweep):
  root, _, result = sweep
  names = sorted(os.listdir(os.path.join(root, "plots")))
  assert names == sorted(["eval_example_accuracy_vs_model_d_model.png", "eval_example_accuracy_vs_learning_rate.png",
                          "curve_eval_example_accuracy.png", "curve_train_loss.png"])
  assert sorted(os.path.basename(path) for path in result["plots"]) == names
  analysis = report.analyze(root)
  panel_fields, panels = plots.field_panels(analysis, "model.d_model")  # warmup follows the width
  assert panel_fields == [] and len(panels) == 1
  assert sorted(point.point["model.d_model"] for point in panels[()]) == [32, 32, 64, 64]
  for name in names:
    width, height = _png_size(os.path.join(root, "plots", name))
    assert width > 200 and height > 200 and os.path.getsize(os.path.join(root, "plots", name)) > 5000


def test_hparams_read_back(sweep):
  root, truth, result = sweep
  logged = hparams.read_hparams(result["hparams_dir"])
  experiment = logged["experiment"]
  assert experiment["hparams"]["learning_rate"] == "DATA_TYPE_FLOAT64"
  assert experiment["hparams"]["model.d_model"] == "DATA_TYPE_FLOAT64"
  assert experiment["hparams"]["variant"] == "DATA_TYPE_STRING"
  assert {SELECT, "eval/loss", "train/loss"} <= set(experiment["metrics"])
  sessions = {name: session for name, session in logged["sessions"].items() if name != "."}
  assert len(sessions) == 35 and NOT_RUN not in sessions  # every run that logged something
  name = _name("local", 64, 3e-3, 1)
  assert sessions[name]["hparams"] == {"variant": "local", "learning_rate": 3e-3, "seed": 1.0, "status": "done",
                                       "model.d_model": 64.0, "train.warmup_steps": 4.0,
                                       "model.attention_pattern": '["local"]'}
  np.testing.assert_allclose(sessions[name]["metrics"][SELECT], truth[name][0], rtol=1e-6)  # float32 scalar
  assert sessions[name]["status"] == "STATUS_SUCCESS"
  assert sessions[FAILED]["status"] == "STATUS_FAILURE" and sessions[RUNNING]["status"] == "STATUS_RUNNING"


@pytest.mark.parametrize("unit", ["tokens", "flops"])
def test_compare_at_tokens_or_flops_cuts_at_the_smallest_budget(sweep, tmp_path, unit):
  root, truth, _ = sweep
  copy = str(tmp_path / unit)
  shutil.copytree(os.path.join(root, "runs"), os.path.join(copy, "runs"))
  with open(os.path.join(root, "sweep.json")) as file:
    plan = json.load(file)
  plan["compare_at"] = unit
  with open(os.path.join(copy, "sweep.json"), "w") as file:
    json.dump(plan, file)
  analysis = report.analyze(copy)
  per_step = {(variant, width): BATCH[variant] * SEQ_LEN * (1.0 if unit == "tokens" else flops.train_flops_per_token(
      _config(variant, width, 1e-3, 0).model, SEQ_LEN)) for variant in VARIANTS for width in WIDTHS}
  budget = STEPS * min(per_step.values())
  np.testing.assert_allclose(analysis.budget, budget, rtol=1e-12)
  if unit == "tokens":
    assert analysis.compare_label == "at equal tokens (1,280)"  # dense's 20 steps = local's 10
  unreached = 0
  for point in analysis.points:
    key = (point.variant, point.point["model.d_model"])
    values = [truth[run.name][0] if STEPS * per_step[key] <= budget * (1 + 1e-9) else
              truth[run.name][1] if 10 * per_step[key] <= budget * (1 + 1e-9) else math.nan for run in point.runs]
    if np.isnan(values).all():  # equal FLOPs: the wide local runs logged no evaluation that early
      assert point.metrics[SELECT].n == 0 and point.choice.learning_rate is None
      unreached += 1
    else:
      np.testing.assert_allclose(point.metrics[SELECT].mean, np.nanmean(values), rtol=1e-12)
  assert unreached == (2 if unit == "flops" else 0)
  assert (f"{unreached} point(s) logged no `{SELECT}`" in report.summary_markdown(analysis)) == bool(unreached)


def test_failed_report_keeps_the_previous_one(sweep, tmp_path):
  root, _, _ = sweep
  copy = str(tmp_path / "copy")
  shutil.copytree(root, copy)
  with open(os.path.join(copy, "summary.md"), encoding="utf-8") as file:
    before = file.read()
  with open(os.path.join(copy, "sweep.json")) as file:
    plan = json.load(file)
  plan["select"] = "eval/perplexity"
  with open(os.path.join(copy, "sweep.json"), "w") as file:
    json.dump(plan, file)
  with pytest.raises(ValueError, match=r"select='eval/perplexity' is logged by no finished run .*eval/loss"):
    report.write_report(copy)
  with open(os.path.join(copy, "summary.md"), encoding="utf-8") as file:
    assert file.read() == before
  assert not [name for name in os.listdir(copy) if name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("field,value,message", [
    ("compare_at", "epochs", "compare_at='epochs' must be one of"),
    ("select_mode", "best", "select_mode='best' must be 'max' or 'min'"),
    ("format", "other/1", "has format 'other/1'"),
    ("runs", [], "plans no runs"),
])
def test_bad_sweep_json(tmp_path, field, value, message):
  plan = {"format": "sparseformer.sweep/1", "experiment": "x", "select": SELECT, "select_mode": "max",
          "compare_at": "steps", "swept_fields": [], "runs": [{"name": "a", "variant": "v", "grid": {},
                                                              "learning_rate": 1e-3, "seed": 0, "overrides": []}]}
  plan[field] = value
  with open(tmp_path / "sweep.json", "w") as file:
    json.dump(plan, file)
  with pytest.raises(ValueError, match=message):
    report.write_report(str(tmp_path))
  assert os.listdir(tmp_path) == ["sweep.json"]


def test_missing_sweep_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="sweep.json not found"):
    report.write_report(str(tmp_path / "nothing"))


def test_energy_per_eval_loss_improvement_is_derived_from_the_final_energy_record():
  """Issue 14: joules per nat of eval loss gained from ln(vocab) (the uniform prediction) to the last eval."""
  records = [{"step": 10, "eval/loss": 4.0}, {"step": 20, "eval/loss": math.log(259) - 2.0},
             {"step": 20, "energy/joules": 500.0, "energy/joules_per_token": 0.5, "energy/method": "estimated:tdp"}]
  derived = report._with_energy(records, {"model": {"vocab_size": 259}})
  assert derived[:3] == records
  assert derived[3] == {"step": 20, "energy/joules_per_eval_loss_improvement": pytest.approx(250.0)}
  assert report._with_energy(records[:2], {"model": {"vocab_size": 259}}) == records[:2]  # no energy: nothing
  worse = [{"step": 5, "eval/loss": 9.0}, records[2]]  # no improvement: NaN, never a negative cost
  assert math.isnan(report._with_energy(worse, {"model": {"vocab_size": 259}})[-1][
      "energy/joules_per_eval_loss_improvement"])
