"""The tables of a report's options (report_options.py) on a report.Report: computed by `add_options` inside
report.analyze, so that every check runs before any output is written; `files` and `sections` render them."""

from sparseformer.train.sweeps import frontier, report_options, targets, train_metrics


def add_options(report, options: report_options.ReportOptions) -> None:
  """The tables the options ask for; every check of theirs runs here, before any output is written."""
  report.options = options
  if options.target:
    metric, reference = options.target
    report.target_direction = targets.check(report.runs, metric, reference, options.where["target"])
    report.target_rows = targets.steps_to_target(report.points, metric, reference, report.target_direction)
  if options.train_metrics:
    report.train_metric_names, report.train_skipped = train_metrics.match(
        options.train_metrics, report.runs, options.where["train_metrics"])
    report.train_rows = train_metrics.metric_rows(report.points, report.train_metric_names)
  if options.frontier_x:
    where = options.where["frontier_x"]
    function = frontier.load_function(options.frontier_x, where)
    report.frontier_rows = frontier.frontier_rows(report.points, function, options.frontier_x, where,
                                                  report.sweep["select"], report.sweep["select_mode"])


FILES = ("steps_to_target.csv", "train_metrics.csv", "frontier.csv")


def files(report) -> dict:
  """{file name: text} of the CSVs the options ask for (steps_to_target.csv, train_metrics.csv, frontier.csv)."""
  written = {}
  if report.target_rows is not None:
    written["steps_to_target.csv"] = targets.to_csv(report.target_rows, report.point_fields, *report.options.target)
  if report.train_rows:
    written["train_metrics.csv"] = train_metrics.to_csv(report.train_rows, report.point_fields)
  if report.frontier_rows is not None:
    written["frontier.csv"] = frontier.to_csv(report.frontier_rows, report.point_fields, report.options.frontier_x,
                                            report.sweep["select"])
  return written


def sections(report) -> list[str]:
  """The summary.md sections of the options, after the metric tables."""
  lines = []
  if report.target_rows is not None:
    lines += targets.markdown(report.target_rows, report.point_fields, *report.options.target,
                              report.target_direction)
  if report.train_rows or report.train_skipped:
    lines += train_metrics.markdown(report.train_rows, report.point_fields, report.train_skipped)
  if report.frontier_rows is not None:
    lines += frontier.markdown(report.frontier_rows, report.point_fields, report.options.frontier_x,
                               report.sweep["select"], report.compare_label)
  return lines
