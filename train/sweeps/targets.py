"""Steps to a target (`sweep report --target METRIC:REFERENCE`): when does each variant reach the reference's
final value of a metric (Switch Transformer's "steps to reach the dense model's final loss").

Per grid point, target = the mean over seeds of the reference variant's final `METRIC` (its finished runs at
its chosen learning rate). A run reaches it at the first logged step whose value is at or past the target in
the metric's direction (stats.metric_direction), within a relative 1e-12; the step is interpolated linearly
between that logged step and the one before it (the first logged step itself when it already reaches the
target, or when the value before it is not finite). A run that never reaches it is "not reached": no number.

Per variant: the steps of each seed, their mean ± std when every seed reached the target, and the same on the
seed-mean curve (the mean over seeds at the steps every seed logged), whose value at the reference's last
step is the target itself, so the reference always reaches it there or earlier even when some of its seeds
end short of the mean. speedup = reference curve steps / variant curve steps.
"""

import dataclasses
import difflib
import json
import math

import numpy as np

from sparseformer.train.sweeps import report_options, stats, tables

REACH_TOLERANCE = 1e-12


def reaches(value: float, target: float, direction: str) -> bool:
  """Whether `value` is at or past `target` ('min': at or below), within a relative REACH_TOLERANCE."""
  slack = REACH_TOLERANCE * abs(target)
  return bool(value <= target + slack) if direction == "min" else bool(value >= target - slack)


def first_reach(steps, values, target: float, direction: str) -> float | None:
  """The (interpolated) first step at which `values` (logged at `steps`, ascending) reach `target`; None if never."""
  for index, (step, value) in enumerate(zip(steps, values)):
    if not reaches(value, target, direction):
      continue
    previous = float(values[index - 1]) if index else math.nan
    if not math.isfinite(previous) or previous == value:
      return float(step)
    fraction = min(max((target - previous) / (value - previous), 0.0), 1.0)
    return float(steps[index - 1] + fraction * (step - steps[index - 1]))
  return None


@dataclasses.dataclass
class TargetRow:
  """One variant at one grid point."""

  variant: str
  point: dict
  learning_rate: float | None
  target: float  # NaN where the reference has no finished run at this point
  seeds: list
  seed_steps: list  # per seed: the step it reached the target, None if not reached
  curve_steps: float | None  # on the seed-mean curve
  speedup: float | None

  @property
  def all_reached(self) -> bool:
    return bool(self.seed_steps) and all(step is not None for step in self.seed_steps)

  @property
  def summary(self) -> stats.Summary:
    """Mean ± std of the seeds' steps; n = 0 unless every seed reached the target."""
    return stats.summarize(self.seed_steps if self.all_reached else [])


def check(runs: list, metric: str, reference: str, where: str) -> str:
  """Raises a ValueError naming `where` unless `reference` is a variant of `runs` and `metric` has a direction
  and is logged by a finished run (when there is one); returns the direction."""
  fix = report_options.fix_hint("target", where)
  variants = list(dict.fromkeys(run.variant for run in runs))
  if reference not in variants:
    close = difflib.get_close_matches(reference, variants, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{where}: reference variant {reference!r} is not in this sweep (its variants: "
                     f"{', '.join(variants)}).{hint} Name one of them{fix}.")
  direction = stats.metric_direction(metric)
  if direction is None:
    raise ValueError(f"{where}: {metric!r} has no direction to reach a target in; name a loss, bits_per_byte, "
                     f"perplexity or accuracy metric{fix}.")
  finished = [run for run in runs if run.status == "done"]
  if finished and not any(run.series(metric)[0].size for run in finished):
    logged = sorted({key for run in finished for record in run.records for key in record} - {"step"})
    raise ValueError(f"{where}: {metric!r} is logged by no finished run (they log: {', '.join(logged)}); name "
                     f"one of those{fix}.")
  return direction


def steps_to_target(points: list, metric: str, reference: str, direction: str) -> list[TargetRow]:
  """TargetRows of every report.PointSummary in `points` (plan order), each against its grid point's target."""
  groups = {}
  for point in points:
    groups.setdefault(json.dumps(list(point.point.values()), default=str), []).append(point)
  rows = []
  for members in groups.values():
    reference_point = next((point for point in members if point.variant == reference), None)
    finals = [run.final(metric) for run in reference_point.runs] if reference_point else []
    target = stats.summarize(finals).mean
    rows_here = []
    for point in members:
      seed_steps, curve_steps = [], None
      if not math.isnan(target):
        seed_steps = [first_reach(*run.series(metric), target, direction) for run in point.runs]
        steps, values = stats.seed_curves([run.series(metric) for run in point.runs])
        curve_steps = first_reach(steps, values.mean(axis=0), target, direction) if steps.size else None
      rows_here.append(TargetRow(point.variant, dict(point.point), point.choice.learning_rate, target,
                                 [run.seed for run in point.runs], seed_steps, curve_steps, None))
    reference_steps = next((row.curve_steps for row in rows_here if row.variant == reference), None)
    for row in rows_here:
      if reference_steps is not None and row.curve_steps:
        row.speedup = reference_steps / row.curve_steps
    rows += rows_here
  return rows


def _steps_text(step: float | None) -> str:
  return "not reached" if step is None else tables.number(step)


def to_csv(rows: list, point_fields: list, metric: str, reference: str) -> str:
  """DIR/steps_to_target.csv: one row per variant and grid point; per-seed steps as JSON (null = not reached)."""
  header = ["variant", *point_fields, "learning_rate", "metric", "reference", "target", "seeds", "steps_per_seed",
            "seeds_reached", "n", "mean_steps", "std_steps", "curve_steps", "speedup"]
  body = []
  for row in rows:
    summary = row.summary
    body.append([row.variant, *row.point.values(), row.learning_rate, metric, reference, row.target, row.seeds,
                 row.seed_steps, sum(step is not None for step in row.seed_steps), summary.n, summary.mean,
                 summary.std, row.curve_steps, row.speedup])
  return tables.csv_text(header, body)


def markdown(rows: list, point_fields: list, metric: str, reference: str, direction: str) -> list[str]:
  """The summary.md section of the steps-to-target table."""
  side = "at or below" if direction == "min" else "at or above"
  lines = ["", f"## Steps to reach `{reference}`'s final `{metric}`", "",
           f"Target per grid point: the mean over seeds of `{reference}`'s final `{metric}` at its chosen learning "
           f"rate. A run reaches it at the first logged step {side} the target, interpolated linearly from the "
           "logged step before; not reached: no logged value gets there. Mean ± std over seeds only when every "
           "seed reaches it. Seed-mean curve: the same on the mean over seeds at the steps every seed logged. "
           f"Speedup: `{reference}`'s seed-mean-curve steps / the variant's.", ""]
  body = []
  for row in rows:
    per_seed = "; ".join(f"seed {seed}: {_steps_text(step)}" for seed, step in zip(row.seeds, row.seed_steps))
    reached = sum(step is not None for step in row.seed_steps)
    spread = tables.mean_std(row.summary) if row.all_reached else f"{reached} of {len(row.seed_steps)} reached"
    if math.isnan(row.target):
      per_seed = spread = f"no target ({reference} has no finished run here)"
    elif not row.seed_steps:
      per_seed, spread = "–", "no finished run"
    body.append([tables.text(row.variant)] + [tables.text(value) for value in row.point.values()] +
                ["–" if row.learning_rate is None else f"{row.learning_rate:.3g}", tables.number(row.target),
                 per_seed or "–", spread, _steps_text(row.curve_steps) if row.seed_steps else "–",
                 "–" if row.speedup is None else f"{row.speedup:.3g}x"])
  return lines + tables.markdown_table(["variant", *point_fields, "learning rate", "target", "steps per seed",
                                        "mean ± std", "seed-mean curve", "speedup"], body)
