"""Experiments registry: `experiments/<name>.py` defines `config() -> RunConfig`.

Each file's docstring gives the exact command that runs it and what to expect. A study may also define
`VARIANTS: dict[str, list[str]]`, its ablation grid: named lists of `--set` overrides on the base config,
run with `sparseformer train --experiment NAME --variant VARIANT`.
"""

import dataclasses
import difflib
import importlib
import pkgutil

from sparseformer.train import overrides
from sparseformer.train.config import RunConfig


def names() -> list[str]:
  """All registered experiment names, sorted."""
  return sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))


def variants(name: str) -> dict[str, list[str]]:
  """The ablation grid of experiment `name` ({} when it has none)."""
  get(name)
  return dict(getattr(importlib.import_module(f"{__name__}.{name}"), "VARIANTS", {}))


def get(name: str, variant: str | None = None) -> RunConfig:
  """The RunConfig of experiment `name`, with `variant`'s overrides applied (ValueErrors list close names)."""
  if name not in names():
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown experiment {name!r}.{hint} Available: {', '.join(names())}.")
  module = importlib.import_module(f"{__name__}.{name}")
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
  return (importlib.import_module(f"{__name__}.{name}").__doc__ or "").strip()
