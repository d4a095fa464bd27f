"""Train-side metric tables (`sweep report --train-metrics PATTERN[,PATTERN]`), e.g. MaxVio over training.

A pattern is a metric name or an fnmatch glob (`train/layer*/moe/max_violation`) over the keys the runs'
metrics.jsonl records carry. Per run, over every logged value of a metric in step order (each logged point
weighs the same): the mean over training, the mean over the last 10 % of the logged points (at least one), the
final value and the max; a NaN logged anywhere makes that run's statistics NaN, which leaves it out of the
seed statistics (n says how many seeds count). Per variant and grid point, at the chosen learning rate: mean
± std over the finished seeds of each. A metric logged as anything but numbers (expert_load is a list per
step) is skipped with a note.
"""

import dataclasses
import difflib
import fnmatch
import math

import numpy as np

from sparseformer.train.sweeps import report_options, stats, tables

STATISTICS = ("mean", "last_10pct_mean", "final", "max")
HEADINGS = {"mean": "mean over training", "last_10pct_mean": "mean over the last 10 %", "final": "final",
            "max": "max"}
LAST_DIVISOR = 10  # the last 10 %


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def match(patterns: tuple, runs: list, where: str) -> tuple[list, list]:
  """(numeric metrics, [(skipped metric, why)]) matched by `patterns`, in pattern then name order.

  ValueError naming `where` for a pattern that matches no logged metric, once some run logged anything."""
  kinds = {}
  for run in runs:
    for record in run.records:
      for key, value in record.items():
        if key != "step" and not _is_number(value):
          kinds[key] = type(value).__name__
        else:
          kinds.setdefault(key, None)
  kinds.pop("step", None)
  metrics, skipped = [], []
  for pattern in patterns:
    matched = sorted(name for name in kinds if fnmatch.fnmatchcase(name, pattern))
    if not matched and kinds:
      close = difflib.get_close_matches(pattern, sorted(kinds), n=3, cutoff=0.5)
      listed = ", ".join(close) if close else ", ".join(sorted(name for name in kinds if name.startswith("train/")))
      raise ValueError(f"{where}: {pattern!r} matches no metric the runs logged (closest: {listed or 'none'}); "
                       f"name one{report_options.fix_hint('train_metrics', where)}.")
    for name in matched:
      if kinds[name] is None and name not in metrics:
        metrics.append(name)
      elif kinds[name] is not None and all(name != item for item, _ in skipped):
        skipped.append((name, f"logged as {kinds[name]}, not a number"))
  return metrics, skipped


def run_statistics(values) -> dict:
  """{statistic: value} of one run's logged values (in step order); NaN for every statistic with none."""
  values = np.asarray(values, np.float64)
  if not values.size:
    return {name: math.nan for name in STATISTICS}
  last = max(1, -(-values.size // LAST_DIVISOR))  # integer ceil: 0.1 * 30 is 3.0000000000000004
  return {"mean": float(values.mean()), "last_10pct_mean": float(values[-last:].mean()), "final": float(values[-1]),
          "max": float(values.max())}


@dataclasses.dataclass
class MetricRow:
  """One train metric of one variant at one grid point: {statistic: stats.Summary over seeds}."""

  variant: str
  point: dict
  learning_rate: float | None
  metric: str
  summaries: dict


def metric_rows(points: list, metrics: list) -> list[MetricRow]:
  """MetricRows per metric (outer) and report.PointSummary (inner), over each point's finished runs."""
  rows = []
  for metric in metrics:
    for point in points:
      per_run = [run_statistics(run.series(metric)[1]) for run in point.runs if run.series(metric)[0].size]
      rows.append(MetricRow(point.variant, dict(point.point), point.choice.learning_rate, metric,
                            {name: stats.summarize([item[name] for item in per_run]) for name in STATISTICS}))
  return rows


def to_csv(rows: list, point_fields: list) -> str:
  """DIR/train_metrics.csv: one row per variant, grid point, metric and statistic (tidy / long format)."""
  header = ["variant", *point_fields, "learning_rate", "metric", "statistic", "n", "mean", "std"]
  body = [[row.variant, *row.point.values(), row.learning_rate, row.metric, name, summary.n, summary.mean,
           summary.std] for row in rows for name, summary in row.summaries.items()]
  return tables.csv_text(header, body)


def markdown(rows: list, point_fields: list, skipped: list) -> list[str]:
  """The summary.md sections: one table per train metric, then the skipped metrics."""
  lines = []
  for metric in dict.fromkeys(row.metric for row in rows):
    lines += ["", f"## `{metric}` over training", "",
              "Per run over its logged values: their mean, the mean of the last 10 % of them, the final one and the "
              "max; then mean ± std over the finished seeds at the chosen learning rate.", ""]
    body = [[tables.text(row.variant)] + [tables.text(value) for value in row.point.values()] +
            ["–" if row.learning_rate is None else f"{row.learning_rate:.3g}", str(row.summaries["final"].n)] +
            [tables.mean_std(row.summaries[name]) for name in STATISTICS] for row in rows if row.metric == metric]
    lines += tables.markdown_table(["variant", *point_fields, "learning rate", "n"] +
                                   [HEADINGS[name] for name in STATISTICS], body)
  if skipped:
    lines += ["", "Train metrics skipped: " + "; ".join(f"`{name}` ({why})" for name, why in skipped) + "."]
  return lines
