"""Experiments registry: `experiments/<name>.py` defines `config() -> RunConfig`.

Each file's docstring gives the exact command that runs it and what to expect. A study may also define
`VARIANTS: dict[str, list[str]]`, its ablation grid: named lists of `--set` overrides on the base config,
run with `sparseformer train --experiment NAME --variant VARIANT`, and a `SWEEP` dict (variants x grid x
learning rates x seeds, train/sweeps/spec.py) run with `sparseformer sweep run --experiment NAME --out DIR`.

Wherever a NAME is taken, a path to a `.py` file defining the same (`--experiment path/to/study.py`) works
too: a study outside the package, or a test's.
"""

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
import types

from sparseformer.train import overrides
from sparseformer.train.config import RunConfig


def names() -> list[str]:
  """All registered experiment names, sorted."""
  return sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))


def is_path(name: str) -> bool:
  """Whether `name` names a file (ends in .py) rather than a registered experiment."""
  return name.endswith(".py")


def canonical(name: str) -> str:
  """`name` as stored in a sweep: a registered name unchanged, a file path made absolute."""
  return os.path.abspath(name) if is_path(name) else name


def _module(name: str) -> types.ModuleType:
  """The module of experiment `name` (a registered name or a .py path); ValueErrors list close names."""
  if is_path(name):
    path = os.path.abspath(name)
    if not os.path.isfile(path):
      raise ValueError(f"Experiment file {name} not found; pass an existing .py file or a registered name "
                       f"({', '.join(names())}).")
    module_name = f"_sparseformer_experiment_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
    if module_name not in sys.modules:
      spec = importlib.util.spec_from_file_location(module_name, path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      sys.modules[module_name] = module
    return sys.modules[module_name]
  if name not in names():
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown experiment {name!r}.{hint} Available: {', '.join(names())}.")
  return importlib.import_module(f"{__name__}.{name}")


def variants(name: str) -> dict[str, list[str]]:
  """The ablation grid of experiment `name` ({} when it has none)."""
  get(name)
  return dict(getattr(_module(name), "VARIANTS", {}))


def sweep(name: str) -> dict | None:
  """The SWEEP dict of experiment `name` (None when it has none)."""
  get(name)
  value = getattr(_module(name), "SWEEP", None)
  return None if value is None else dict(value)


def get(name: str, variant: str | None = None) -> RunConfig:
  """The RunConfig of experiment `name`, with `variant`'s overrides applied (ValueErrors list close names)."""
  module = _module(name)
  config = module.config()
  if not isinstance(config, RunConfig):
    raise TypeError(f"experiments/{name}.py: config() must return a RunConfig, got {type(config).__name__}.")
  if variant is None:
    return config
  grid = getattr(module, "VARIANTS", {})
  if variant not in grid:
    raise ValueError(f"Experiment {name!r} has no variant {variant!r}; choose one of {sorted(grid) or 'none'}.")
  return overrides.apply_overrides(dataclasses.replace(config, name=f"{config.name}-{variant}"), grid[variant])


def describe(name: str) -> str:
  """The docstring of experiment `name` (its command and expected result)."""
  get(name)
  return (_module(name).__doc__ or "").strip()
