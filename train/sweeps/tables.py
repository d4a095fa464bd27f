"""CSV and Markdown rendering shared by the sweep report's tables (report.py, targets.py, train_metrics.py,
frontier.py): one cell format everywhere."""

import csv
import io
import json
import math


def cell(value) -> str:
  """A CSV cell: blank for missing / NaN, round-trip repr for floats, JSON for lists."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple, dict)):
    return json.dumps(value)
  return str(value)


def csv_text(header: list, rows: list) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([[cell(value) for value in row] for row in rows])
  return buffer.getvalue()


def number(value) -> str:
  """A Markdown number: 4 significant digits, '–' for missing / NaN."""
  return "–" if value is None or math.isnan(value) else f"{value:.4g}"


def mean_std(summary) -> str:
  """'mean ± std' of a stats.Summary ('–' with no value; the std is '–' with one)."""
  return "–" if not summary.n else f"{number(summary.mean)} ± {number(summary.std)}"


def text(value) -> str:
  """A Markdown table cell: JSON for lists, pipes escaped, one line."""
  shown = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
  return shown.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list, rows: list) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
         ["| " + " | ".join(row) + " |" for row in rows]


def point_keys(point) -> list[str]:
  """The leading cells of a report.PointSummary's row: its variant, then its grid values."""
  return [text(point.variant)] + [text(value) for value in point.point.values()]
