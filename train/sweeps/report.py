"""`sparseformer sweep report DIR`: what a sweep found, from its runs' files alone (no server, no network).

Reads DIR/sweep.json and, per run, DIR/runs/<name>/{config.json, metrics.jsonl, run_status.json} (the
contract of store.py) and writes

    DIR/results.csv              one row per planned run, finished or not
    DIR/summary.csv, summary.md  per variant and grid point: the learning rate chosen by the seed-mean of
                                 `select`, then mean ± std, n and 95 % t-interval of every metric there
    DIR/plots/*.png              plots.py
    DIR/tensorboard_hparams/     hparams.py (`tensorboard --logdir DIR`, HPARAMS tab)

and, where asked for by a flag of `sweep report` or by the SWEEP's `report` dict stored in sweep.json (the
flag wins, `none` turns a stored one off; report_options.py):

    --target METRIC:VARIANT      steps_to_target.csv + a summary.md table: per variant and seed, the first logged
                                 step (interpolated) at which METRIC reaches VARIANT's seed-mean final value at
                                 the same grid point, or "not reached"; mean ± std and speedup (targets.py)
    --train-metrics PATTERN,...  train_metrics.csv + a table per metric (mean over training, over the last 10 %,
                                 final, max; seed-mean ± std) and plots/curve_<metric>.png (train_metrics.py)
    --frontier-x MODULE:FUNC     frontier.csv + a table, plots/frontier_<select>.png: select against
                                 FUNC(variant, overrides), the Pareto frontier as a step line (frontier.py)

Every option is checked (an unknown variant, a pattern matching no metric, a bad function) before any file is
written. A sweep.json without "report" (planned before it existed) reports as before.

Metrics are compared at equal steps, tokens or FLOPs (sweep.json `compare_at`): the budget is the smallest
final step / token count / FLOP count of the finished runs, and each run contributes its last logged value
at or before it (the final value when every run trains the same budget). Only finished ("done") runs enter
the statistics; the others are listed in results.csv and counted in summary.md. Outputs are built in a
temporary directory and moved into place at the end, so a failing report leaves the previous one intact.
"""

import ast
import dataclasses
import json
import math
import os
import shutil
import tempfile

import numpy as np

from sparseformer.train import overrides
from sparseformer.train.sweeps import hparams, option_tables, plots, report_options, stats, store, tables

LEARNING_RATE_FIELD = "train.learning_rate"
SEED_FIELDS = ("train.seed", "data.seed")
COMPARE_AT = ("steps", "tokens", "flops")
TRAIN_LOSS = "train/loss"


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class RunResult:
  """One planned run as the report sees it. status: done | failed | running | not run."""

  name: str
  variant: str
  grid: dict
  learning_rate: float
  seed: int
  status: str
  error: str | None
  wall_time_s: float | None
  records: list
  config: dict  # flattened config.json ({} before the run wrote one)
  flops_per_token: float | None
  overrides: list  # the run's --set strings from sweep.json

  def swept_value(self, field: str):
    """The value of a swept field: the grid's, else config.json's, else the run's own --set (not started yet)."""
    if field in self.grid:
      return self.grid[field]
    if field in self.config:
      return self.config[field]
    for assignment in reversed(self.overrides):
      key, _, raw = assignment.partition("=")
      if key.strip() == field:
        try:
          return ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
          return raw.strip()  # a bare word such as bfloat16, as train/overrides.py reads it
    return None

  @property
  def steps(self) -> int | None:
    return max((int(record["step"]) for record in self.records), default=None)

  @property
  def tokens_per_step(self) -> int | None:
    if "data.batch_size" not in self.config:
      return None
    return int(self.config["data.batch_size"]) * int(self.config["data.seq_len"])

  def position(self, step: float, unit: str) -> float | None:
    """Where `step` lies in steps, tokens or model FLOPs (None if the run's config does not say)."""
    if unit == "steps":
      return float(step)
    if self.tokens_per_step is None:
      return None
    tokens = float(step) * self.tokens_per_step
    if unit == "tokens":
      return tokens
    return None if self.flops_per_token is None else tokens * self.flops_per_token

  def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of every record that logged `metric` as a number, in step order."""
    pairs = sorted((int(r["step"]), float(r[metric])) for r in self.records if _is_number(r.get(metric)))
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.float64)

  def final(self, metric: str) -> float:
    _, values = self.series(metric)
    return float(values[-1]) if values.size else math.nan

  def best(self, metric: str) -> float:
    _, values = self.series(metric)
    direction = stats.metric_direction(metric)
    if not values.size or direction is None:
      return math.nan
    return float(np.nanmax(values) if direction == "max" else np.nanmin(values))

  def at(self, metric: str, unit: str, budget: float) -> float:
    """The last value of `metric` logged at or before `budget` (in `unit`); NaN if none."""
    steps, values = self.series(metric)
    value = math.nan
    for step, item in zip(steps, values):
      position = self.position(step, unit)
      if position is not None and position <= budget * (1 + 1e-9):
        value = float(item)
    return value


def _flops_per_token(config: dict, cache: dict) -> float | None:
  """models/flops.py train_flops_per_token of a config.json (cached: many runs share a model)."""
  if "model" not in config or "data" not in config:
    return None
  key = json.dumps([config["model"], config["data"]["seq_len"]], sort_keys=True)
  if key not in cache:
    from sparseformer.models import flops  # pylint: disable=import-outside-toplevel
    from sparseformer.models.config import ModelConfig  # pylint: disable=import-outside-toplevel
    from sparseformer.train import overrides  # pylint: disable=import-outside-toplevel

    cache[key] = flops.train_flops_per_token(overrides.from_dict(ModelConfig, config["model"], "model."),
                                             int(config["data"]["seq_len"]))
  return cache[key]


def load_runs(sweep_dir: str, sweep: dict) -> list[RunResult]:
  """Every planned run of `sweep`, in plan order, with whatever its directory holds."""
  runs, flops_cache = [], {}
  for spec in sweep["runs"]:
    run_dir = store.run_dir(sweep_dir, spec["name"])
    status = store.read_status(run_dir) or {}
    config_path = os.path.join(run_dir, "config.json")
    raw_config = {}
    if os.path.exists(config_path):
      with open(config_path, encoding="utf-8") as file:
        raw_config = json.load(file)
    try:
      flops_per_token = _flops_per_token(raw_config, flops_cache)
    except (ValueError, TypeError, KeyError) as error:
      raise ValueError(f"{config_path} does not describe a model of this sparseformer version ({error}); "
                       "report the sweep with the version that ran it.") from error
    runs.append(RunResult(
        name=spec["name"], variant=str(spec["variant"]), grid=dict(spec.get("grid", {})),
        learning_rate=float(spec["learning_rate"]), seed=int(spec["seed"]),
        status=status.get("status", "not run"), error=status.get("error"),
        wall_time_s=status.get("wall_time_s"), records=_with_energy(store.read_records(run_dir), raw_config),
        config=overrides.flatten_dict(raw_config),
        flops_per_token=flops_per_token, overrides=list(spec.get("overrides", []))))
  return runs


# Energy of a run (train/energy.py), from its final energy record: joules per token, and joules per nat of eval
# loss gained from the uniform prediction's ln(vocab_size) (where an untrained model starts) to the run's last
# eval loss. Figures of the run's last session only (a resumed run counts from its resume).
ENERGY_METRICS = ("energy/joules_per_token", "energy/joules_per_eval_loss_improvement")


def _with_energy(records: list, config: dict) -> list:
  """`records` plus one derived record with energy/joules_per_eval_loss_improvement at the last energy record."""
  energy = [r for r in records if _is_number(r.get("energy/joules"))]
  losses = [r for r in records if _is_number(r.get("eval/loss"))]
  vocab = config.get("model", {}).get("vocab_size")
  if not energy or not losses or not vocab:
    return records
  gain = math.log(vocab) - losses[-1]["eval/loss"]
  value = energy[-1]["energy/joules"] / gain if gain > 0 else math.nan
  return records + [{"step": energy[-1]["step"], "energy/joules_per_eval_loss_improvement": value}]


def _check_sweep(sweep_dir: str, sweep: dict) -> None:
  path = os.path.join(sweep_dir, store.SWEEP_FILE)
  if sweep.get("select_mode") not in ("max", "min"):
    raise ValueError(f"{path}: select_mode={sweep.get('select_mode')!r} must be 'max' or 'min'.")
  if sweep.get("compare_at") not in COMPARE_AT:
    raise ValueError(f"{path}: compare_at={sweep.get('compare_at')!r} must be one of {COMPARE_AT}.")
  if not isinstance(sweep.get("select"), str) or not sweep["select"]:
    raise ValueError(f"{path}: select must name a metric, e.g. 'eval/loss'.")
  if not sweep.get("runs"):
    raise ValueError(f"{path} plans no runs; re-plan the sweep with a non-empty grid.")


def _hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(item) for item in value)
  if isinstance(value, dict):
    return tuple(sorted((key, _hashable(item)) for key, item in value.items()))
  return value


@dataclasses.dataclass
class PointSummary:
  """A variant at one grid point: the learning-rate choice and the statistics at the chosen rate."""

  variant: str
  point: dict  # point field -> value
  planned: int  # runs planned here, over all learning rates and seeds
  choice: stats.LearningRateChoice
  select_by_rate: dict  # learning rate -> [select value of each finished run]
  runs: list  # finished RunResults at the chosen learning rate
  metrics: dict  # metric -> stats.Summary over `runs`, at the comparison budget
  overrides: list = dataclasses.field(default_factory=list)  # the --set list of the point's first planned run


@dataclasses.dataclass
class Report:
  """Everything the output files show; built by `analyze` from the files alone."""

  sweep: dict
  runs: list
  swept_fields: list  # results.csv columns (learning rate and seed have their own)
  point_fields: list  # fields that tell grid points apart
  metrics: list  # eval metrics (select first) + train/loss
  budget: float | None  # comparison point in units of sweep["compare_at"]; None with no finished run
  points: list  # PointSummary, in plan order
  options: report_options.ReportOptions = report_options.ReportOptions()
  target_rows: list | None = None  # targets.TargetRow per point, with options.target
  target_direction: str | None = None
  train_metric_names: list = dataclasses.field(default_factory=list)  # matched by options.train_metrics
  train_rows: list = dataclasses.field(default_factory=list)  # train_metrics.MetricRow
  train_skipped: list = dataclasses.field(default_factory=list)  # [(metric, why)] matched but not numeric
  frontier_rows: list | None = None  # frontier.FrontierRow per point, with options.frontier_x

  @property
  def compare_label(self) -> str:
    unit = self.sweep["compare_at"]
    if self.budget is None:
      return f"at equal {unit} (no finished run)"
    shown = f"{int(self.budget):,}" if unit != "flops" else f"{self.budget:.3g}"
    return f"at equal {unit} ({shown})"


def analyze(sweep_dir: str, **options) -> Report:
  """Reads the sweep and computes the report; writes nothing. ValueError on a malformed or foreign DIR.

  options: target / train_metrics / frontier_x as the flags give them (report_options.py); an option not
  given falls back to sweep.json's "report", and "none" turns it off.
  """
  sweep = store.load_sweep(sweep_dir)
  _check_sweep(sweep_dir, sweep)
  resolved = report_options.resolve(sweep.get("report"), **options)
  runs = load_runs(sweep_dir, sweep)
  excluded = {LEARNING_RATE_FIELD, *SEED_FIELDS}
  swept_fields = [field for field in sweep.get("swept_fields", []) if field not in excluded]
  point_fields = [field for field in swept_fields if any(field in run.grid for run in runs)]
  finished = [run for run in runs if run.status == "done"]

  select = sweep["select"]
  logged = sorted({key for run in runs for record in run.records for key, value in record.items()
                   if key.startswith("eval/") and _is_number(value)} - {select})
  metrics = [select] + logged + ([TRAIN_LOSS] if select != TRAIN_LOSS else [])
  metrics += [metric for metric in ENERGY_METRICS if any(run.series(metric)[0].size for run in runs)]
  if finished and not any(run.series(select)[0].size for run in finished):
    available = ", ".join(metrics[1:]) or "none"
    raise ValueError(f"{os.path.join(sweep_dir, store.SWEEP_FILE)}: select={select!r} is logged by no finished "
                     f"run (they log: {available}); re-plan the sweep with one of those as select.")

  unit = sweep["compare_at"]
  finals = [run.position(run.steps, unit) for run in finished if run.steps is not None]
  if any(position is None for position in finals):
    raise ValueError(f"compare_at={unit!r} needs data.batch_size, data.seq_len and the model in every finished "
                     "run's config.json; one lacks them. Use compare_at='steps'.")
  budget = min(finals) if finals else None

  groups = {}
  for run in runs:
    key = (run.variant, _hashable([run.grid.get(field) for field in point_fields]))
    groups.setdefault(key, []).append(run)
  points = []
  for (variant, _), members in groups.items():
    select_by_rate = {}
    for run in members:
      values = select_by_rate.setdefault(run.learning_rate, [])
      if run.status == "done" and budget is not None:
        values.append(run.at(select, unit, budget))
    choice = stats.choose_learning_rate(select_by_rate, sweep["select_mode"])
    chosen = [run for run in members if run.status == "done" and run.learning_rate == choice.learning_rate]
    summaries = {metric: stats.summarize([run.at(metric, unit, budget) for run in chosen]) for metric in metrics}
    points.append(PointSummary(variant, {field: members[0].grid.get(field) for field in point_fields},
                               len(members), choice, select_by_rate, chosen, summaries, members[0].overrides))
  report = Report(sweep, runs, swept_fields, point_fields, metrics, budget, points)
  option_tables.add_options(report, resolved)
  return report


def coverage_line(runs: list) -> str:
  """'report covers 6 of 8 runs: 1 failed, 1 not run' (or 'report covers all 8 runs')."""
  done = sum(run.status == "done" for run in runs)
  if done == len(runs):
    return f"report covers all {len(runs)} runs"
  counts = {}
  for run in runs:
    if run.status != "done":
      counts[run.status] = counts.get(run.status, 0) + 1
  order = ["failed", "running", "not run"] + sorted(set(counts) - {"failed", "running", "not run"})
  missing = ", ".join(f"{counts[status]} {status}" for status in order if status in counts)
  return f"report covers {done} of {len(runs)} runs: {missing}"


_cell, _csv, _number, _text, _table = tables.cell, tables.csv_text, tables.number, tables.text, tables.markdown_table


def results_csv(report: Report) -> str:
  """One row per planned run: swept fields, seed, learning rate, status, budget, final / best metrics, error."""
  eval_metrics = [metric for metric in report.metrics if metric != TRAIN_LOSS]
  header = (["name", "variant", *report.swept_fields, "seed", "learning_rate", "status", "steps", "tokens",
             "model_flops", "wall_time_s", f"final/{TRAIN_LOSS}"]
            + [f"{kind}/{metric}" for metric in eval_metrics for kind in ("final", "best")] + ["error"])
  rows = []
  for run in report.runs:
    swept = [run.swept_value(field) for field in report.swept_fields]
    tokens = None if run.steps is None or run.tokens_per_step is None else run.steps * run.tokens_per_step
    flops = None if tokens is None or run.flops_per_token is None else tokens * run.flops_per_token
    values = [value for metric in eval_metrics for value in (run.final(metric), run.best(metric))]
    rows.append([run.name, run.variant, *swept, run.seed, run.learning_rate, run.status, run.steps, tokens, flops,
                 run.wall_time_s, run.final(TRAIN_LOSS), *values, run.error])
  return _csv(header, rows)


def summary_csv(report: Report) -> str:
  """One row per variant x grid point x metric, at the chosen learning rate (tidy / long format)."""
  header = ["variant", *report.point_fields, "learning_rate", "lr_at_edge", "learning_rates_tried", "compare_at",
            "compare_value", "metric", "n", "mean", "std", "ci95_low", "ci95_high"]
  rows = []
  for point in report.points:
    tried = ";".join(repr(rate) for rate in sorted(point.select_by_rate))
    for metric, summary in point.metrics.items():
      rows.append([point.variant, *point.point.values(), point.choice.learning_rate, point.choice.at_edge, tried,
                   report.sweep["compare_at"], report.budget, metric, summary.n, summary.mean, summary.std,
                   summary.ci_low, summary.ci_high])
  return _csv(header, rows)


EDGE_FLAG = "⚠ edge"


def summary_markdown(report: Report) -> str:
  """summary.md: coverage, how the learning rate was chosen, one table per metric, the runs left out."""
  sweep, label = report.sweep, report.compare_label
  coverage = coverage_line(report.runs)
  lines = [f"# Sweep report: {sweep.get('experiment', '?')}", "", coverage[0].upper() + coverage[1:] + ".", "",
           f"Per variant and grid point the learning rate is the one with the best mean over seeds of "
           f"`{sweep['select']}` ({sweep['select_mode']}) {label}; every metric is then taken {label} over the "
           f"finished runs at that rate: mean ± sample std (ddof = 1), n, and the 95 % Student-t interval of the "
           f"mean. {EDGE_FLAG}: the chosen rate is the smallest or largest tried, so the best one may lie outside "
           "the grid."]
  unreached = sum(point.choice.learning_rate is None and any(values for values in point.select_by_rate.values())
                  for point in report.points)
  if unreached:
    lines += ["", f"{EDGE_FLAG[0]} {unreached} point(s) logged no `{sweep['select']}` {label} in any finished run: "
              "evaluate more often (train.eval_every) or compare at another budget (compare_at)."]
  if sweep.get("overrides"):
    lines += ["", "Base overrides: " + " ".join(f"`{item}`" for item in sweep["overrides"])]
  keys = lambda point: [_text(point.variant)] + [_text(value) for value in point.point.values()]
  rates = sorted({rate for point in report.points for rate in point.select_by_rate})
  rows = []
  for point in report.points:
    cells = []
    for rate in rates:
      if rate not in point.select_by_rate:
        cells.append("")
        continue
      finite = [value for value in point.select_by_rate[rate] if not math.isnan(value)]
      cell = f"{_number(point.choice.seed_means[rate])} ({len(finite)})"
      cells.append(f"**{cell}**" if rate == point.choice.learning_rate else cell)
    rows.append(keys(point) + cells)
  lines += ["", f"## Learning rate: mean of `{sweep['select']}` over finished seeds (n) {label}", ""]
  lines += _table(["variant", *report.point_fields] + [f"lr {rate:.3g}" for rate in rates], rows)
  for metric in report.metrics:
    rows = []
    for point in report.points:
      summary, rate = point.metrics[metric], point.choice.learning_rate
      shown_rate = "–" if rate is None else f"{rate:.3g}" + (f" {EDGE_FLAG}" if point.choice.at_edge else "")
      interval = "–" if math.isnan(summary.ci_low) else f"[{_number(summary.ci_low)}, {_number(summary.ci_high)}]"
      mean_std = "–" if not summary.n else f"{_number(summary.mean)} ± {_number(summary.std)}"
      rows.append(keys(point) + [shown_rate, str(summary.n), mean_std, interval])
    selected = " (selection metric)" if metric == sweep["select"] else ""
    lines += ["", f"## `{metric}` {label}{selected}", ""]
    lines += _table(["variant", *report.point_fields, "learning rate", "n", "mean ± std", "95 % interval"], rows)
  lines += option_tables.sections(report)
  left_out = [run for run in report.runs if run.status != "done"]
  if left_out:
    rows = [[_text(run.name), run.status, _cell(run.steps) or "–", _text(run.error or "")[:300]] for run in left_out]
    lines += ["", "## Runs not in the statistics", ""] + _table(["run", "status", "steps", "error"], rows)
  return "\n".join(lines) + "\n"


def _replace_dir(source: str, target: str) -> None:
  """Moves the finished directory `source` to `target`, replacing what was there."""
  old = None
  if os.path.exists(target):
    old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(target))
    os.replace(target, os.path.join(old, "previous"))
  os.replace(source, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def write_report(sweep_dir: str, **options) -> dict:
  """Writes results.csv, summary.csv, summary.md, plots/ and tensorboard_hparams/ into `sweep_dir`, and the
  CSVs of the options (`analyze`): steps_to_target.csv, train_metrics.csv, frontier.csv.

  Returns {"results_csv", "summary_csv", "summary_md", "plots": [paths], "hparams_dir", "runs",
  "done", "failed", "not_done", "coverage"}, plus the path of each option CSV (e.g. "steps_to_target_csv") and
  "skipped" (train metrics not tabulated, and why) where there are any. Everything is computed and drawn
  before the first output is replaced, so an error leaves the previous report as it was; an option CSV of an
  earlier report that this one does not write is removed with it.
  """
  report = analyze(sweep_dir, **options)
  extra = option_tables.files(report)
  staging = tempfile.mkdtemp(prefix=".report-", dir=sweep_dir)
  try:
    files = {"results.csv": results_csv(report), "summary.csv": summary_csv(report),
             "summary.md": summary_markdown(report), **extra}
    for name, text in files.items():
      with open(os.path.join(staging, name), "w", encoding="utf-8", newline="") as file:
        file.write(text)
    plot_names = plots.write_plots(report, os.path.join(staging, "plots"))
    hparams.write_hparams(os.path.join(staging, "tensorboard_hparams"), hparams.sessions(report))
    for name in files:
      os.replace(os.path.join(staging, name), os.path.join(sweep_dir, name))
    for name in set(option_tables.FILES) - set(extra):
      if os.path.exists(os.path.join(sweep_dir, name)):
        os.remove(os.path.join(sweep_dir, name))
    _replace_dir(os.path.join(staging, "plots"), os.path.join(sweep_dir, "plots"))
    _replace_dir(os.path.join(staging, "tensorboard_hparams"), os.path.join(sweep_dir, "tensorboard_hparams"))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  statuses = [run.status for run in report.runs]
  return {"results_csv": os.path.join(sweep_dir, "results.csv"),
          "summary_csv": os.path.join(sweep_dir, "summary.csv"), "summary_md": os.path.join(sweep_dir, "summary.md"),
          "plots": [os.path.join(sweep_dir, "plots", name) for name in plot_names],
          "hparams_dir": os.path.join(sweep_dir, "tensorboard_hparams"), "runs": len(statuses),
          "done": statuses.count("done"), "failed": statuses.count("failed"),
          "not_done": len(statuses) - statuses.count("done"), "coverage": coverage_line(report.runs),
          **{name.replace(".", "_"): os.path.join(sweep_dir, name) for name in extra},
          **({"skipped": "; ".join(f"{name} ({why})" for name, why in report.train_skipped)}
             if report.train_skipped else {})}
