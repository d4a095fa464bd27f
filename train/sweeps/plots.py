"""PNG plots of a sweep report (matplotlib's Agg canvas through `Figure`: headless, no pyplot state).

    <select>_vs_<field>.png     the selected metric at the chosen learning rate against each numeric grid
                                field: one line per variant, error bars = std over seeds, one panel per
                                value of the other grid fields (zipped fields get one plot together)
    <select>_vs_learning_rate.png   the seed-mean against every tried learning rate (the choice circled),
                                one panel per grid point: shows whether the chosen rate sits at an edge
    curve_<metric>.png          learning curves (select and train/loss against step) at the chosen rate,
                                mean over seeds with a ± std band, one panel per grid point; for each metric
                                of --train-metrics (train_metrics.py) the same with a min-max band over seeds
    frontier_<select>.png       with --frontier-x (frontier.py): the seed-mean of select against x per
                                variant, log x, points labelled, the Pareto frontier as a step line

A log x axis is used where the positive values span more than 10x.
"""

import json
import math
import os
import re

import numpy as np

from sparseformer.train.sweeps import stats

PANEL_SIZE = (4.6, 3.4)  # inches per panel
TRAIN_LOSS = "train/loss"


def _slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _log_x(values) -> bool:
  values = [value for value in values if _is_number(value)]
  return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _panel_title(fields: list, values: tuple) -> str:
  return ", ".join(f"{field}={value}" for field, value in zip(fields, values)) or "all runs"


def _figure(num_panels: int):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  columns = min(num_panels, 3)
  rows = math.ceil(num_panels / columns)
  width = max(PANEL_SIZE[0] * columns, 7.0)  # room for the two-line title above a single panel
  figure = Figure(figsize=(width, PANEL_SIZE[1] * rows + 0.6), layout="constrained")
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  for extra in axes[num_panels:]:
    extra.set_visible(False)
  return figure, axes[:num_panels]


def _save(figure, axes, path: str, title: str) -> None:
  for ax in axes:
    if ax.has_data():
      ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  figure.suptitle(title, fontsize="medium")
  figure.savefig(path, dpi=90)


def _std(values) -> float:
  values = np.asarray([value for value in values if not math.isnan(value)], np.float64)
  return float(values.std(ddof=1)) if values.size > 1 else math.nan


def _panels(points: list, panel_fields: list) -> dict:
  """{panel key (values of panel_fields): [points]}, in plan order."""
  panels = {}
  for point in points:
    key = tuple(json.dumps(point.point[field]) if isinstance(point.point[field], (list, dict)) else point.point[field]
                for field in panel_fields)
    panels.setdefault(key, []).append(point)
  return panels


def _determines(points: list, field: str, other: str) -> bool:
  """Whether `field`'s value fixes `other`'s at every point (zipped grid keys such as seq_len / max_seq_len)."""
  seen = {}
  for point in points:
    key = json.dumps(point.point[field])
    if seen.setdefault(key, json.dumps(point.point[other])) != json.dumps(point.point[other]):
      return False
  return True


def field_panels(report, field: str) -> tuple[list, dict]:
  """(panel fields, {panel key: [points]}) of the plot against `field`: one panel per value of the other
  grid fields, leaving out those that `field` determines (they would leave one x value per panel)."""
  others = [name for name in report.point_fields if name != field and not _determines(report.points, field, name)]
  return others, _panels(report.points, others)


def plot_against_field(report, field: str, path: str) -> None:
  """The selection metric at the chosen learning rate against the numeric grid field `field`."""
  select = report.sweep["select"]
  others, panels = field_panels(report, field)
  figure, axes = _figure(len(panels))
  for ax, (key, points) in zip(axes, panels.items()):
    variants = list(dict.fromkeys(point.variant for point in points))
    for variant in variants:
      mine = sorted((point for point in points if point.variant == variant and point.metrics[select].n),
                    key=lambda point: point.point[field])
      if not mine:
        continue
      x = [point.point[field] for point in mine]
      ax.errorbar(x, [point.metrics[select].mean for point in mine], yerr=[point.metrics[select].std for point in mine],
                  marker="o", capsize=3, label=variant)
    if _log_x([point.point[field] for point in points]):
      ax.set_xscale("log")
    ax.set(xlabel=field, ylabel=select, title=_panel_title(others, key))
  _save(figure, axes, path, f"{report.sweep.get('experiment', '')}: {select} {report.compare_label} vs {field}\n"
        "at the chosen learning rate; error bars: std over seeds")


def plot_against_learning_rate(report, path: str) -> None:
  """The seed-mean of the selection metric at every tried learning rate, the chosen one circled."""
  select = report.sweep["select"]
  panels = _panels(report.points, report.point_fields)
  figure, axes = _figure(len(panels))
  all_rates = []
  for ax, (key, points) in zip(axes, panels.items()):
    for point in points:
      rates = [rate for rate in sorted(point.select_by_rate) if not math.isnan(point.choice.seed_means[rate])]
      if not rates:
        continue
      all_rates += rates
      means = [point.choice.seed_means[rate] for rate in rates]
      line = ax.errorbar(rates, means, yerr=[_std(point.select_by_rate[rate]) for rate in rates], marker="o",
                         capsize=3, label=point.variant)
      chosen = point.choice.learning_rate
      ax.plot([chosen], [point.choice.seed_means[chosen]], marker="o", markersize=13, fillstyle="none",
              color=line.lines[0].get_color())
    if _log_x(all_rates):
      ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=f"{select} (mean over seeds)", title=_panel_title(report.point_fields, key))
  _save(figure, axes, path, f"{report.sweep.get('experiment', '')}: {select} {report.compare_label} vs learning rate"
        "\ncircled: chosen; error bars: std over seeds")


def plot_learning_curves(report, metric: str, path: str, band: str = "std") -> None:
  """`metric` against step at the chosen learning rate: mean over seeds at the steps every seed logged, with a
  band of ± std (band="std") or from the min to the max over seeds (band="range")."""
  panels = _panels(report.points, report.point_fields)
  figure, axes = _figure(len(panels))
  for ax, (key, points) in zip(axes, panels.items()):
    for point in points:
      steps, values = stats.seed_curves([run.series(metric) for run in point.runs])
      if not steps.size:
        continue
      mean = values.mean(axis=0)
      line, = ax.plot(steps, mean, marker="o", markersize=3,
                      label=f"{point.variant} (lr {point.choice.learning_rate:.3g}, n={len(values)})")
      if len(values) > 1:
        low, high = ((mean - values.std(axis=0, ddof=1), mean + values.std(axis=0, ddof=1)) if band == "std" else
                     (values.min(axis=0), values.max(axis=0)))
        ax.fill_between(steps, low, high, alpha=0.25, color=line.get_color(), linewidth=0)
    ax.set(xlabel="step", ylabel=metric, title=_panel_title(report.point_fields, key))
  shown = "± std" if band == "std" else "min to max over seeds"
  _save(figure, axes, path, f"{report.sweep.get('experiment', '')}: {metric} during training at the chosen learning "
        f"rate\nmean over seeds, band: {shown}")


def plot_frontier(report, path: str) -> None:
  """report.frontier_rows: the selection metric's seed-mean against x, log x, the Pareto frontier as steps."""
  select, spec = report.sweep["select"], report.options.frontier_x
  panels = _panels(report.frontier_rows, report.point_fields)
  figure, axes = _figure(len(panels))
  for ax, (key, rows) in zip(axes, panels.items()):
    shown = [row for row in rows if row.summary.n]
    ax.plot([row.x for row in shown], [row.summary.mean for row in shown], "o", label="variants")
    for row in shown:
      ax.annotate(row.variant, (row.x, row.summary.mean), textcoords="offset points", xytext=(4, 4),
                  fontsize="small")
    front = sorted((row for row in shown if row.on_frontier), key=lambda row: row.x)
    ax.step([row.x for row in front], [row.summary.mean for row in front], where="post", color="black",
            alpha=0.6, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set(xlabel=spec.rpartition(":")[2], ylabel=f"{select} (mean over seeds)",
           title=_panel_title(report.point_fields, key))
  _save(figure, axes, path, f"{report.sweep.get('experiment', '')}: {select} {report.compare_label} vs {spec}\n"
        "at the chosen learning rate; frontier: points no cheaper point beats")


def write_plots(report, out_dir: str) -> list[str]:
  """Draws every plot of `report` (a report.Report) into `out_dir`; returns the file names written."""
  os.makedirs(out_dir, exist_ok=True)
  select, names = report.sweep["select"], []
  if not any(point.runs for point in report.points):
    return names
  plotted = []
  for field in report.point_fields:
    values = {point.point[field] for point in report.points if point.point[field] is not None}
    tied = any(_determines(report.points, field, done) and _determines(report.points, done, field) for done in plotted)
    if len(values) > 1 and all(_is_number(value) for value in values) and not tied:  # one plot per zipped group
      plotted.append(field)
      names.append(f"{_slug(select)}_vs_{_slug(field)}.png")
      plot_against_field(report, field, os.path.join(out_dir, names[-1]))
  names.append(f"{_slug(select)}_vs_learning_rate.png")
  plot_against_learning_rate(report, os.path.join(out_dir, names[-1]))
  for metric in dict.fromkeys([select, TRAIN_LOSS]):
    names.append(f"curve_{_slug(metric)}.png")
    plot_learning_curves(report, metric, os.path.join(out_dir, names[-1]))
  for metric in report.train_metric_names:
    if f"curve_{_slug(metric)}.png" not in names:  # select and train/loss keep their ± std plot
      names.append(f"curve_{_slug(metric)}.png")
      plot_learning_curves(report, metric, os.path.join(out_dir, names[-1]), band="range")
  if report.frontier_rows is not None:
    names.append(f"frontier_{_slug(select)}.png")
    plot_frontier(report, os.path.join(out_dir, names[-1]))
  return names
