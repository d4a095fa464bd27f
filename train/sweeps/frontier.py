"""A cost-quality frontier (`sweep report --frontier-x MODULE:FUNCTION`), e.g. bits per byte against attention
FLOPs per token.

x of a variant at a grid point = FUNCTION(variant, overrides), where overrides is the `--set` list of the
point's first planned run in sweep.json (the variant's sets, the grid values, the base --sets, a learning
rate and seed), e.g. sparseformer.experiments.sparse_lm:attention_flops_per_token; it must return a finite
positive number (the plot's x axis is logarithmic). y = the seed-mean of the sweep's `select` at the chosen
learning rate, at the comparison budget (the final value when every run trains the same steps). Per grid
point, the Pareto frontier is the set of points that no other point beats: none is at most as costly and at
least as good, and strictly one of the two.
"""

import dataclasses
import importlib
import math

from sparseformer.train.sweeps import report_options, tables


def load_function(spec: str, where: str):
  """The callable named 'module:function'; ValueError naming `where` when it cannot be imported or called."""
  module_name, _, function_name = spec.partition(":")
  fix = report_options.fix_hint("frontier_x", where)
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ValueError(f"{where}={spec!r}: cannot import {module_name!r} ({error}); give an importable module, "
                     f"e.g. 'sparseformer.experiments.sparse_lm:attention_flops_per_token'{fix}.") from error
  function = getattr(module, function_name, None)
  if not callable(function):
    public = sorted(name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name)))
    raise ValueError(f"{where}={spec!r}: {module_name} has no function {function_name!r} (it has: "
                     f"{', '.join(public) or 'none'}); name one taking (variant, overrides){fix}.")
  return function


def pareto_front(xs: list, ys: list, mode: str) -> list[bool]:
  """Whether each (x, y) is on the frontier: no other point has x' <= x and y' at least as good ('min': y' <= y),
  with one of the two strictly. A point with a NaN is never on it, nor beats one."""
  better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
  finite = [not (math.isnan(x) or math.isnan(y)) for x, y in zip(xs, ys)]
  front = []
  for i, (x, y) in enumerate(zip(xs, ys)):
    beaten = any(finite[j] and j != i and xs[j] <= x and not better(y, ys[j]) and (xs[j] < x or better(ys[j], y))
                 for j in range(len(xs)))
    front.append(finite[i] and not beaten)
  return front


@dataclasses.dataclass
class FrontierRow:
  """One variant at one grid point: its cost x and the selection metric's seed statistics."""

  variant: str
  point: dict
  learning_rate: float | None
  x: float
  summary: object  # stats.Summary of select
  on_frontier: bool


def frontier_rows(points: list, function, spec: str, where: str, select: str, mode: str) -> list[FrontierRow]:
  """FrontierRows of every report.PointSummary (plan order), the frontier taken per grid point."""
  rows, cache = [], {}
  for point in points:
    key = (point.variant, tuple(point.overrides))
    if key not in cache:
      try:
        value = function(point.variant, list(point.overrides))
      except Exception as error:  # pylint: disable=broad-except  # any failure of user code, reported with its source
        raise ValueError(f"{where}={spec!r}: {spec}({point.variant!r}, overrides) raised {type(error).__name__}: "
                         f"{error}{report_options.fix_hint('frontier_x', where)}.") from error
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}={spec!r}: {spec}({point.variant!r}, overrides) returned {value!r}; it must "
                         "return a finite positive number (the x axis is logarithmic).")
      cache[key] = float(value)
    rows.append(FrontierRow(point.variant, dict(point.point), point.choice.learning_rate, cache[key],
                            point.metrics[select], False))
  groups = {}
  for row in rows:
    groups.setdefault(repr(list(row.point.values())), []).append(row)
  for members in groups.values():
    front = pareto_front([row.x for row in members], [row.summary.mean for row in members], mode)
    for row, on_front in zip(members, front):
      row.on_frontier = on_front
  return rows


def to_csv(rows: list, point_fields: list, spec: str, select: str) -> str:
  """DIR/frontier.csv: one row per variant and grid point."""
  header = ["variant", *point_fields, "learning_rate", "x_function", "x", "metric", "n", "mean", "std",
            "on_frontier"]
  return tables.csv_text(header, [[row.variant, *row.point.values(), row.learning_rate, spec, row.x, select,
                                   row.summary.n, row.summary.mean, row.summary.std, row.on_frontier]
                                  for row in rows])


def markdown(rows: list, point_fields: list, spec: str, select: str, label: str) -> list[str]:
  """The summary.md section: the frontier table, cheapest first within each grid point."""
  lines = ["", f"## Frontier: `{select}` {label} against `{spec}`", "",
           "x = the function of (variant, the point's --set list); y = the seed-mean at the chosen learning rate. "
           "On the frontier: no other point at this grid point is at most as costly and at least as good.", ""]
  groups = {}
  for row in rows:
    groups.setdefault(repr(list(row.point.values())), len(groups))
  ordered = sorted(rows, key=lambda row: (groups[repr(list(row.point.values()))], row.x))
  body = [[tables.text(row.variant)] + [tables.text(value) for value in row.point.values()] +
          ["–" if row.learning_rate is None else f"{row.learning_rate:.3g}", f"{row.x:.4g}", str(row.summary.n),
           tables.mean_std(row.summary), "yes" if row.on_frontier else ""] for row in ordered]
  return lines + tables.markdown_table(["variant", *point_fields, "learning rate", "x", "n", "mean ± std",
                                        "on the frontier"], body)
