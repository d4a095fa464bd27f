"""Experiments registry: `experiments/<name>.py` defines `config() -> RunConfig`.

Each file's docstring gives the exact command that runs it and what to expect.
"""

import difflib
import importlib
import pkgutil

from sparseformer.train.config import RunConfig


def names() -> list[str]:
  """All registered experiment names, sorted."""
  return sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))


def get(name: str) -> RunConfig:
  """The base RunConfig of experiment `name` (ValueError listing close names if it does not exist)."""
  if name not in names():
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown experiment {name!r}.{hint} Available: {', '.join(names())}.")
  module = importlib.import_module(f"{__name__}.{name}")
  config = module.config()
  if not isinstance(config, RunConfig):
    raise TypeError(f"experiments/{name}.py: config() must return a RunConfig, got {type(config).__name__}.")
  return config


def describe(name: str) -> str:
  """The docstring of experiment `name` (its command and expected result)."""
  get(name)
  return (importlib.import_module(f"{__name__}.{name}").__doc__ or "").strip()
