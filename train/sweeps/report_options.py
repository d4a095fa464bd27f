"""What a sweep report computes beyond its tables: the `sweep report` flags and the SWEEP `report` dict.

    --target METRIC:VARIANT          SWEEP report["target"] = "eval/loss:dense"       (targets.py)
    --train-metrics PATTERN[,...]    SWEEP report["train_metrics"] = ["train/layer*/moe/max_violation"]
                                                                                       (train_metrics.py)
    --frontier-x MODULE:FUNCTION     SWEEP report["frontier_x"] = "sparseformer.experiments.sparse_lm:..."
                                                                                       (frontier.py)

The planner stores the SWEEP's dict in sweep.json as "report"; a flag given to `sweep report` replaces that
key's stored value, and the flag value `none` turns a stored one off. A sweep.json without "report" (planned
before these options existed) reports as before. Only the shape is checked here; whether the variant, the
metrics and the function exist is checked by the modules that use them, before any output is written.
"""

import dataclasses

KEYS = ("target", "train_metrics", "frontier_x")
FLAGS = {"target": "--target", "train_metrics": "--train-metrics", "frontier_x": "--frontier-x"}
OFF = "none"


@dataclasses.dataclass(frozen=True)
class ReportOptions:
  """The resolved options; `where` names each one's source for error messages (a flag or the SWEEP key)."""

  target: tuple[str, str] | None = None  # (metric, reference variant)
  train_metrics: tuple[str, ...] = ()  # metric names or fnmatch patterns
  frontier_x: str | None = None  # "module:function"
  where: dict = dataclasses.field(default_factory=dict)  # key -> "--target" | "SWEEP['report']['target']"


def sweep_key(key: str) -> str:
  return f"SWEEP['report'][{key!r}]"


def parse_target(value, where: str) -> tuple[str, str]:
  """'eval/loss:dense' -> ('eval/loss', 'dense')."""
  metric, _, variant = value.partition(":") if isinstance(value, str) else ("", "", "")
  if not metric.strip() or not variant.strip():
    raise ValueError(f"{where}={value!r}: expected METRIC:REFERENCE_VARIANT, e.g. 'eval/loss:dense'.")
  return metric.strip(), variant.strip()


def parse_patterns(value, where: str) -> tuple[str, ...]:
  """A comma-separated string or a list of strings -> a tuple of non-empty patterns."""
  items = value.split(",") if isinstance(value, str) else value
  if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
    raise ValueError(f"{where}={value!r}: expected metric names or glob patterns, e.g. "
                     "['train/layer*/moe/max_violation'] (a flag takes them comma-separated).")
  patterns = tuple(item.strip() for item in items if item.strip())
  if not patterns:
    raise ValueError(f"{where} names no metric; give one, e.g. 'train/layer*/moe/max_violation'.")
  return patterns


def parse_function(value, where: str) -> str:
  """'package.module:function', checked for shape only (frontier.load_function imports it)."""
  module, _, function = value.partition(":") if isinstance(value, str) else ("", "", "")
  if not module.strip() or not function.strip() or ":" in function:
    raise ValueError(f"{where}={value!r}: expected MODULE:FUNCTION, e.g. "
                     "'sparseformer.experiments.sparse_lm:attention_flops_per_token'.")
  return f"{module.strip()}:{function.strip()}"


_PARSERS = {"target": parse_target, "train_metrics": parse_patterns, "frontier_x": parse_function}


def normalize(report, where: str = "SWEEP['report']") -> dict:
  """The SWEEP `report` dict, checked and put in the form sweep.json stores (strings and lists)."""
  if not isinstance(report, dict):
    raise ValueError(f"{where} must be a dict with keys among {KEYS}, got {type(report).__name__}.")
  unknown = [key for key in report if key not in KEYS]
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; the keys are {', '.join(KEYS)}.")
  stored = {}
  for key, value in report.items():
    parsed = _PARSERS[key](value, f"{where}[{key!r}]")
    stored[key] = ":".join(parsed) if key == "target" else list(parsed) if key == "train_metrics" else parsed
  return stored


def resolve(stored: dict | None, **flags) -> ReportOptions:
  """The options from sweep.json's "report" (`stored`, may be None) and the flags given (None = not given)."""
  unknown = [key for key in flags if key not in KEYS]
  if unknown:
    raise TypeError(f"unknown report options {unknown}; the options are {', '.join(KEYS)}.")
  stored = normalize(stored or {}, "sweep.json report")
  values, where = {}, {}
  for key in KEYS:
    flag = flags.get(key)
    if flag is not None:
      if isinstance(flag, str) and flag.strip().lower() == OFF:
        continue
      values[key], where[key] = _PARSERS[key](flag, FLAGS[key]), FLAGS[key]
    elif key in stored:
      values[key], where[key] = _PARSERS[key](stored[key], sweep_key(key)), sweep_key(key)
  return ReportOptions(where=where, **values)


def fix_hint(key: str, where: str) -> str:
  """The end of an error's 'name a valid one' sentence: where to change the option."""
  flag = FLAGS[key]
  if where == flag:
    return f" in {flag}"
  return f" in {where} (sweep.json holds the planned value), or pass {flag} to `sweep report` ({flag} {OFF} skips it)"
