"""An experiment's SWEEP expanded into runs: variants x grid x learning rates x seeds, each a list of `--set`s.

    SWEEP = dict(
        variants=VARIANTS,                      # {name: [--set overrides]}; omitted = one variant "base"
        grid={"model.d_model": [64, 128],       # one field per key, or a tuple of fields zipped together
              ("data.seq_len", "model.max_seq_len"): [(64, 64), (128, 128)]},
        learning_rates=[1e-3, 3e-3],            # -> train.learning_rate (omitted = the config's)
        seeds=[0, 1, 2],                        # -> train.seed and data.seed (omitted = the config's train.seed)
        select="eval/loss",                     # the metric that picks the learning rate in the report
        select_mode="min",                      # max | min (default: min for */loss, */bits_per_byte, else max)
        compare_at="steps",                     # steps | tokens | flops held equal across the compared runs
        report=dict(                            # optional extras of `sweep report` (report_options.py)
            target="eval/loss:dense",           #   steps for every variant to reach dense's final eval/loss
            train_metrics=["train/layer*/moe/max_violation"],  # tables + curves of logged train metrics
            frontier_x="sparseformer.experiments.sparse_lm:attention_flops_per_token"),  # select vs x frontier
    )

The learning rate is swept per grid point because the best one moves with width (Yang et al. 2022,
"Tensor Programs V"); the report picks it by the mean over seeds. Every run's RunConfig is built here,
so an invalid point fails at plan time, before anything is written or started.
"""

import ast
import dataclasses
import difflib
import hashlib
import itertools
import re
from typing import Any

from sparseformer.train import overrides as overrides_lib
from sparseformer.train.sweeps import report_options

SWEEP_KEYS = ("variants", "grid", "learning_rates", "seeds", "select", "select_mode", "compare_at", "report")
SELECT_MODES = ("max", "min")
COMPARE_AT = ("steps", "tokens", "flops")
SEED_FIELDS = ("train.seed", "data.seed")
LEARNING_RATE_FIELD = "train.learning_rate"
MAX_NAME_LENGTH = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep: its directory name, coordinates and the `--set` list that makes its config."""

  name: str
  variant: str
  grid: dict  # {flattened field: value}; zipped keys appear as their member fields
  learning_rate: float
  seed: int
  overrides: tuple[str, ...]

  def to_json(self) -> dict:
    return {"name": self.name, "variant": self.variant, "grid": dict(self.grid), "learning_rate": self.learning_rate,
            "seed": self.seed, "overrides": list(self.overrides)}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Every run of a sweep, in a stable order (variants, then grid points, learning rates, seeds)."""

  experiment: str
  overrides: tuple[str, ...]  # the command line's --set list, as given
  select: str
  select_mode: str
  compare_at: str
  swept_fields: tuple[str, ...]  # grid fields taking more than one value
  runs: tuple[Run, ...]
  report: dict = dataclasses.field(default_factory=dict)  # SWEEP['report'], normalized (report_options.py)

  def to_json(self) -> dict:
    """The DIR/sweep.json document (store.py); "report" only when the SWEEP has one."""
    from sparseformer.train.sweeps import store  # pylint: disable=import-outside-toplevel
    document = {"format": store.FORMAT, "experiment": self.experiment, "overrides": list(self.overrides),
                "select": self.select, "select_mode": self.select_mode, "compare_at": self.compare_at,
                "swept_fields": list(self.swept_fields), "runs": [run.to_json() for run in self.runs]}
    return document | ({"report": dict(self.report)} if self.report else {})


def default_select_mode(select: str) -> str:
  """min for losses and bits per byte, max otherwise (accuracies)."""
  return "min" if select.endswith(("loss", "bits_per_byte")) else "max"


def _flat_fields(config: Any, prefix: str = "") -> list[str]:
  """Dotted names of every leaf field of a (nested) dataclass config."""
  names = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      names.extend(_flat_fields(value, prefix + field.name + "."))
    else:
      names.append(prefix + field.name)
  return names


def _parse_literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word such as `bfloat16`, as `--set` reads it


def _format_value(value: Any) -> str:
  """A short, filesystem-safe rendering of a grid value for run names (1e-3, 64, local+global)."""
  if isinstance(value, float):
    plain = f"{value:.12g}"
    mantissa, exponent = f"{value:.12e}".split("e")
    scientific = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return scientific if len(scientific) < len(plain) else plain
  if isinstance(value, (tuple, list)):
    return "+".join(_format_value(item) for item in value)
  return _UNSAFE.sub("-", str(value)).strip("-") or "_"


def _check_field(field: Any, known: list[str], where: str) -> str:
  if not isinstance(field, str):
    raise ValueError(f"{where}: a grid field must be a dotted config name such as 'model.d_model', got {field!r}.")
  if field not in known:
    close = difflib.get_close_matches(field, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `sparseformer show-config` to list fields."
    raise ValueError(f"{where}: {field!r} is not a config field.{hint}")
  if field == LEARNING_RATE_FIELD or field in SEED_FIELDS:
    raise ValueError(f"{where}: sweep {field} with SWEEP['learning_rates'] / SWEEP['seeds'], not in the grid.")
  return field


def _grid_axes(grid: Any, known: list[str]) -> list[tuple[tuple[str, ...], list[tuple]]]:
  """[(fields, [value tuple per point])] of SWEEP['grid']: a plain key is a one-field axis."""
  if not isinstance(grid, dict):
    raise ValueError(f"SWEEP['grid'] must be a dict {{field: [values]}}, got {type(grid).__name__}.")
  axes, seen = [], set()
  for key, values in grid.items():
    fields = key if isinstance(key, tuple) else (key,)
    where = f"SWEEP['grid'][{key!r}]"
    if not fields:
      raise ValueError(f"{where}: an empty tuple of fields; name the fields to zip, e.g. ('data.seq_len', ...).")
    for field in fields:
      _check_field(field, known, where)
      if field in seen:
        raise ValueError(f"{where}: {field} is swept by two grid keys; keep it in one.")
      seen.add(field)
    if not isinstance(values, (list, tuple)) or not values:
      raise ValueError(f"{where} is empty; give it at least one value (or remove the key).")
    points = []
    for value in values:
      point = tuple(value) if isinstance(key, tuple) and isinstance(value, (tuple, list)) else (value,)
      if isinstance(key, tuple) and (not isinstance(value, (tuple, list)) or len(point) != len(fields)):
        raise ValueError(f"{where}: each value of a zipped key is a tuple of {len(fields)} values "
                         f"(one per field), got {value!r}.")
      points.append(point)
    if len(set(map(repr, points))) != len(points):
      raise ValueError(f"{where} lists a value twice; remove the repeat.")
    axes.append((fields, points))
  return axes


def _number_list(sweep: dict, key: str, default: list, kind: type) -> list:
  if key not in sweep:
    return default
  values = sweep[key]
  if not isinstance(values, (list, tuple)) or not values:
    raise ValueError(f"SWEEP[{key!r}] is empty; give at least one value (or omit it to use the config's).")
  for value in values:
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is int else (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
    if not ok or (kind is int and value < 0):
      raise ValueError(f"SWEEP[{key!r}]: {value!r} is not a valid {'seed (an integer >= 0)' if kind is int else 'learning rate (a positive number)'}.")
  if len(set(values)) != len(values):
    raise ValueError(f"SWEEP[{key!r}] lists a value twice; remove the repeat.")
  return [kind(value) for value in values]


def _restrict(axes, learning_rates, seeds, cli_overrides):
  """Applies command-line `--set`s of swept fields as restrictions; returns (axes, lrs, seeds, the other sets)."""
  others = []
  for assignment in cli_overrides:
    if "=" not in assignment:
      raise ValueError(f"--set expects key=value, got {assignment!r} (e.g. --set train.steps=100).")
    key, raw = (part.strip() for part in assignment.split("=", 1))
    value = _parse_literal(raw)
    if key == LEARNING_RATE_FIELD:
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"--set {assignment}: expected a number for {key}.")
      learning_rates = [float(value)]
      continue
    if key in SEED_FIELDS:
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"--set {assignment}: expected an integer seed for {key}.")
      seeds = [value]
      continue
    for index, (fields, points) in enumerate(axes):
      if key not in fields:
        continue
      if len(fields) == 1:
        axes[index] = (fields, [(value,)])
      else:
        member = fields.index(key)
        kept = [point for point in points if point[member] == value]
        if not kept:
          raise ValueError(f"--set {assignment}: no point of the zipped grid axis {fields} has {key}={value!r} "
                           f"(it takes {sorted({repr(point[member]) for point in points})}); pick one of those.")
        axes[index] = (fields, kept)
      break
    else:
      others.append(assignment)
  return axes, learning_rates, seeds, others


def _short_names(fields: list[str]) -> dict[str, str]:
  """The last component of each field, or the whole dotted name where two fields share their last one."""
  last = [field.rsplit(".", 1)[-1] for field in fields]
  return {field: short if last.count(short) == 1 else field for field, short in zip(fields, last)}


def _run_name(variant: str, axes_fields, point, learning_rate: float, seed: int, short: dict[str, str]) -> str:
  parts = [_format_value(variant)]
  for fields, values in zip(axes_fields, point):
    parts.append(",".join(f"{short[field]}={_format_value(value)}" for field, value in zip(fields, values)))
  parts += [f"lr={_format_value(learning_rate)}", f"seed={seed}"]
  name = "__".join(parts)
  if len(name) > MAX_NAME_LENGTH:  # deterministic: the hash of the full name keeps shortened names distinct
    name = name[:MAX_NAME_LENGTH - 12] + "__" + hashlib.sha1(name.encode()).hexdigest()[:10]
  return name


def validate(sweep: Any) -> None:
  """Checks the keys and value types of a SWEEP dict (the grid fields are checked by `expand`)."""
  if not isinstance(sweep, dict):
    raise ValueError(f"SWEEP must be a dict, got {type(sweep).__name__}.")
  unknown = [key for key in sweep if key not in SWEEP_KEYS]
  if unknown:
    hints = [f"{key!r} (did you mean {difflib.get_close_matches(str(key), SWEEP_KEYS, n=1, cutoff=0.5)[0]!r}?)"
             if difflib.get_close_matches(str(key), SWEEP_KEYS, n=1, cutoff=0.5) else repr(key) for key in unknown]
    raise ValueError(f"Unknown SWEEP keys {', '.join(hints)}; the keys are {', '.join(SWEEP_KEYS)}.")
  if "select" in sweep and (not isinstance(sweep["select"], str) or not sweep["select"]):
    raise ValueError(f"SWEEP['select'] must name a metric such as 'eval/loss', got {sweep['select']!r}.")
  if sweep.get("select_mode", "max") not in SELECT_MODES:
    raise ValueError(f"SWEEP['select_mode']={sweep['select_mode']!r}; set it to one of {SELECT_MODES}.")
  if sweep.get("compare_at", "steps") not in COMPARE_AT:
    raise ValueError(f"SWEEP['compare_at']={sweep['compare_at']!r}; set it to one of {COMPARE_AT}.")
  if "report" in sweep:
    report_options.normalize(sweep["report"])
  variants = sweep.get("variants")
  if "variants" in sweep:
    if not isinstance(variants, dict) or not variants:
      raise ValueError("SWEEP['variants'] must be a non-empty dict {name: [--set overrides]}; omit it for one "
                       "variant 'base'.")
    for name, sets in variants.items():
      if not isinstance(name, str) or not name or not isinstance(sets, (list, tuple)) or not all(
          isinstance(item, str) for item in sets):
        raise ValueError(f"SWEEP['variants'][{name!r}] must map a name to a list of 'key=value' strings.")


def expand(experiment: str, base: Any, sweep: dict, cli_overrides: list[str] = (), *,
           variants: list[str] | None = None, seeds: list[int] | None = None,
           learning_rates: list[float] | None = None) -> Plan:
  """The Plan of `sweep` on the RunConfig `base`; every run's config is built (ValueError on any bad point).

  `cli_overrides` (--set) apply to every run, except those of a swept field (grid, learning rate, seed),
  which restrict that axis to the given value. `variants` / `seeds` / `learning_rates` select subsets.
  """
  validate(sweep)
  known = _flat_fields(base)
  variant_sets = dict(sweep.get("variants") or {"base": []})
  axes = _grid_axes(sweep.get("grid", {}), known)
  sweep_lrs = _number_list(sweep, "learning_rates", [base.train.learning_rate], float)
  sweep_seeds = _number_list(sweep, "seeds", [base.train.seed], int)
  axes, sweep_lrs, sweep_seeds, others = _restrict(axes, sweep_lrs, sweep_seeds, list(cli_overrides))
  for label, chosen, available in (("--variants", variants, list(variant_sets)),
                                   ("--seeds", seeds, sweep_seeds), ("--learning-rates", learning_rates, sweep_lrs)):
    missing = [value for value in chosen or () if value not in available]
    if missing:
      raise ValueError(f"{label}: {missing} not in the sweep's {available}; choose among those.")
  if variants:
    variant_sets = {name: variant_sets[name] for name in variant_sets if name in variants}
  sweep_seeds = [seed for seed in sweep_seeds if not seeds or seed in seeds]
  sweep_lrs = [lr for lr in sweep_lrs if not learning_rates or lr in learning_rates]

  select = sweep.get("select", "eval/loss")
  axes_fields = [fields for fields, _ in axes]
  grid_fields = [field for fields in axes_fields for field in fields]
  short = _short_names(grid_fields)
  runs, names = [], set()
  for variant, variant_overrides in variant_sets.items():
    for point in itertools.product(*(points for _, points in axes)):
      for learning_rate in sweep_lrs:
        for seed in sweep_seeds:
          grid = {field: value for fields, values in zip(axes_fields, point) for field, value in zip(fields, values)}
          sets = (list(variant_overrides) + [f"{field}={value!r}" for field, value in grid.items()] +
                  [f"{LEARNING_RATE_FIELD}={learning_rate!r}"] + [f"{field}={seed}" for field in SEED_FIELDS] +
                  others)
          name = _run_name(variant, axes_fields, point, learning_rate, seed, short)
          if name in names:
            raise ValueError(f"Two runs are both named {name!r} (values that render alike); make the variant "
                             "names or grid values distinct.")
          names.add(name)
          try:
            overrides_lib.apply_overrides(base, sets)
          except ValueError as error:
            raise ValueError(f"Run {name} of experiment {experiment!r} is invalid: {error}") from error
          runs.append(Run(name, variant, grid, learning_rate, seed, tuple(sets)))
  varying = [field for field in grid_fields if len({repr(run.grid[field]) for run in runs}) > 1]
  report = _check_report(sweep.get("report", {}), list(sweep.get("variants") or {"base": []}))
  return Plan(experiment=experiment, overrides=tuple(cli_overrides), select=select,
              select_mode=sweep.get("select_mode", default_select_mode(select)),
              compare_at=sweep.get("compare_at", "steps"), swept_fields=tuple(varying), runs=tuple(runs),
              report=report)


def _check_report(report: dict, variants: list[str]) -> dict:
  """SWEEP['report'] normalized, its reference variant and x function checked at plan time."""
  report = report_options.normalize(report)
  if "target" in report:
    _, reference = report_options.parse_target(report["target"], report_options.sweep_key("target"))
    if reference not in variants:
      raise ValueError(f"{report_options.sweep_key('target')}={report['target']!r}: reference variant "
                       f"{reference!r} is not in SWEEP['variants'] ({', '.join(variants)}); name one of them.")
  if "frontier_x" in report:
    from sparseformer.train.sweeps import frontier  # pylint: disable=import-outside-toplevel
    frontier.load_function(report["frontier_x"], report_options.sweep_key("frontier_x"))
  return report


def plan(experiment: str, cli_overrides: list[str] = (), **selection) -> Plan:
  """The Plan of experiment `experiment` (a registered name or a path to a .py file) under `cli_overrides`."""
  from sparseformer import experiments  # pylint: disable=import-outside-toplevel
  sweep = experiments.sweep(experiment)
  if sweep is None:
    sweep = {"variants": experiments.variants(experiment)} if experiments.variants(experiment) else {}
  return expand(experiments.canonical(experiment), experiments.get(experiment), sweep, cli_overrides, **selection)
