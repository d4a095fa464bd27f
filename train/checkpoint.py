"""Orbax checkpoints of a TrainState plus the data iterator's position, saved asynchronously."""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from sparseformer.train.state import TrainState


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be used; the message says which and why."""


def check_workdir(workdir: str) -> str:
  """Absolute workdir, created if missing; raises before any work if it cannot hold a run."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir} exists and is not a directory; pass a directory path.")
  os.makedirs(workdir, exist_ok=True)
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
    raise CheckpointError(f"{checkpoints} exists and is not a directory; move it away or use a new --workdir.")
  if not os.access(workdir, os.W_OK | os.X_OK) or (os.path.isdir(checkpoints) and
                                                   not os.access(checkpoints, os.R_OK | os.W_OK | os.X_OK)):
    raise CheckpointError(f"{workdir} (or its checkpoints/) is not readable and writable by this user; "
                          "fix its permissions or use a new --workdir.")
  return workdir


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `workdir/checkpoints/<step>/` (state + data-iterator state)."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict[str, Any], *, wait: bool = False) -> None:
    """Starts an async save (returns once the arrays are copied off the devices)."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)), force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restores onto the shardings carried by `abstract_state` (any mesh, not only the one that saved)."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types; name the step and the directory
      raise CheckpointError(f"Cannot restore checkpoint {step} from {self.directory}: {error}. If the model "
                            "config changed since it was written, use a new --workdir.") from error
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
