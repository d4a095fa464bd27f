"""Checks shared by the compression commands: the source is a trained run, and the output is new and elsewhere."""

import os


def check_source_and_out(workdir: str, out: str, command: str) -> None:
  """ValueError naming --workdir / --out and the fix, before any work: `command` only reads `workdir` and never
  overwrites anything."""
  source, target = os.path.abspath(workdir), os.path.abspath(out)
  if os.path.lexists(target):
    raise ValueError(f"--out {out} already exists; pick a new directory ({command} never overwrites).")
  if target == source or target.startswith(source + os.sep):
    raise ValueError(f"--out {out} lies inside --workdir {workdir}; the source run is only read, so write "
                     "elsewhere.")
  if not os.path.isfile(os.path.join(source, "config.json")):
    raise ValueError(f"--workdir {workdir} has no config.json; pass the directory of a training run.")
  checkpoints = os.path.join(source, "checkpoints")
  if not os.path.isdir(checkpoints) or not any(name.isdigit() for name in os.listdir(checkpoints)):
    raise ValueError(f"--workdir {workdir} has no checkpoint under checkpoints/; train it first.")
