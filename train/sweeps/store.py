"""The sweep directory contract: what `sweep run` writes and `sweep status` / `sweep report` read.

    DIR/sweep.json                  the plan: {"format": FORMAT, "experiment", "overrides", "select",
                                    "select_mode", "compare_at", "swept_fields", "runs": [{"name", "variant",
                                    "grid", "learning_rate", "seed", "overrides"}]}
    DIR/runs/<name>/                an ordinary training workdir (config.json, metrics.jsonl, tensorboard/,
                                    checkpoints/), plus
    DIR/runs/<name>/train.log       the run's stdout + stderr (appended over attempts)
    DIR/runs/<name>/run_status.json {"status": "running" | "done" | "failed", "error", "returncode",
                                    "wall_time_s" (summed over attempts), "attempts", "started", "finished",
                                    "host"}
    DIR/runs/<name>/.lock           flock-ed while an attempt is active (see `RunLock`)

Every JSON file is written atomically (a temporary file, then os.replace). This module imports no JAX, so
`sweep status` answers at once.
"""

import datetime
import fcntl
import json
import os
import socket

FORMAT = "sparseformer.sweep/1"
STATUSES = ("running", "done", "failed")
SWEEP_FILE = "sweep.json"
STATUS_FILE = "run_status.json"
LOG_FILE = "train.log"
LOCK_FILE = ".lock"
# The fields of sweep.json that define a sweep: another value in an existing DIR is a different sweep.
IDENTITY_FIELDS = ("experiment", "overrides", "runs")


def write_json_atomic(path: str, value) -> None:
  """Writes `value` as JSON to `path` through a temporary file and os.replace (never a half-written file)."""
  temporary = f"{path}.tmp.{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as file:
    json.dump(value, file, indent=2)
    file.flush()
    os.fsync(file.fileno())
  os.replace(temporary, path)


def now_iso() -> str:
  """The current UTC time, ISO 8601 with seconds."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_sweep(sweep_dir: str) -> dict:
  """The parsed DIR/sweep.json; FileNotFoundError / ValueError say what DIR is missing or holds instead."""
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: DIR must be the --out directory of `sparseformer sweep run`.")
  with open(path, encoding="utf-8") as file:
    try:
      sweep = json.load(file)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path} is not valid JSON ({error}); it was not written by `sparseformer sweep run`.")
  if not isinstance(sweep, dict) or sweep.get("format") != FORMAT:
    found = sweep.get("format") if isinstance(sweep, dict) else type(sweep).__name__
    raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r}; point DIR at a sweep directory.")
  return sweep


def sweep_differences(old: dict, new: dict) -> list[str]:
  """Human-readable differences between two sweep.json dicts in the fields that define a sweep."""
  differences = []
  for field in IDENTITY_FIELDS:
    if old.get(field) == new.get(field):
      continue
    if field != "runs":
      differences.append(f"{field}: {old.get(field)!r} in DIR, {new.get(field)!r} now")
      continue
    old_runs = {run["name"]: run for run in old.get("runs", [])}
    new_runs = {run["name"]: run for run in new.get("runs", [])}
    only_old, only_new = sorted(set(old_runs) - set(new_runs)), sorted(set(new_runs) - set(old_runs))
    changed = sorted(name for name in set(old_runs) & set(new_runs) if old_runs[name] != new_runs[name])
    for label, names in (("runs only in DIR", only_old), ("runs only now", only_new), ("runs changed", changed)):
      if names:
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        differences.append(f"{label}: {shown}")
    if not (only_old or only_new or changed):
      differences.append("runs: the same runs in another order")
  return differences


def write_sweep(sweep_dir: str, sweep: dict) -> None:
  """Writes DIR/sweep.json, or checks that the one there holds the same sweep (ValueError naming what differs).

  Nothing is written when the check fails.
  """
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if os.path.exists(path):
    differences = sweep_differences(load_sweep(sweep_dir), sweep)
    if differences:
      raise ValueError(f"{sweep_dir} holds a different sweep ({'; '.join(differences)}); rerun with the same "
                       "experiment and --set options to resume it, or choose a new --out directory.")
  os.makedirs(sweep_dir, exist_ok=True)
  write_json_atomic(path, sweep)


def run_dir(sweep_dir: str, name: str) -> str:
  return os.path.join(sweep_dir, "runs", name)


def run_dirs(sweep_dir: str) -> list[str]:
  """DIR/runs/<name> of every run in sweep.json, in plan order (including runs not started yet)."""
  return [run_dir(sweep_dir, run["name"]) for run in load_sweep(sweep_dir)["runs"]]


def read_status(path: str) -> dict | None:
  """The run_status.json of the run directory `path`, or None if the run has not started."""
  status_path = os.path.join(path, STATUS_FILE)
  if not os.path.exists(status_path):
    return None
  with open(status_path, encoding="utf-8") as file:
    return json.load(file)


def write_status(path: str, status: dict) -> None:
  """Writes run_status.json of the run directory `path` atomically."""
  if status.get("status") not in STATUSES:
    raise ValueError(f"run status must be one of {STATUSES}, got {status.get('status')!r}.")
  write_json_atomic(os.path.join(path, STATUS_FILE), status)


def start_status(path: str) -> dict:
  """The status of a new attempt of the run in `path`: "running", attempts and wall time carried over."""
  previous = read_status(path) or {}
  return {"status": "running", "error": None, "returncode": None,
          "wall_time_s": float(previous.get("wall_time_s", 0.0)), "attempts": int(previous.get("attempts", 0)) + 1,
          "started": now_iso(), "finished": None, "host": socket.gethostname()}


def read_records(path: str) -> list[dict]:
  """The run's metrics.jsonl records that carry an integer step, skipping a torn line (a killed writer)."""
  metrics_path = os.path.join(path, "metrics.jsonl")
  if not os.path.exists(metrics_path):
    return []
  records = []
  with open(metrics_path, encoding="utf-8") as file:
    for line in file:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
        records.append(record)
  return records


def last_step(path: str) -> int | None:
  """The highest step recorded in the run's metrics.jsonl (None if none), tolerating a torn last line."""
  return max((record["step"] for record in read_records(path)), default=None)


def final_checkpoint_written(path: str) -> bool:
  """Whether the run in `path` holds a finished checkpoint of step train.steps (of its config.json).

  Orbax writes into a temporary directory and renames it to `checkpoints/<step>` when complete, so a
  directory with the plain step name is a finished save.
  """
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    return False
  with open(config_path, encoding="utf-8") as file:
    steps = json.load(file)["train"]["steps"]
  return os.path.isdir(os.path.join(path, "checkpoints", str(steps)))


def tail(path: str, lines: int = 20, max_bytes: int = 16384) -> str:
  """The last `lines` lines of the text file `path` ("" if it does not exist)."""
  if not os.path.exists(path):
    return ""
  with open(path, "rb") as file:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - max_bytes))
    text = file.read().decode("utf-8", errors="replace")
  return "\n".join(text.splitlines()[-lines:])


class RunLock:
  """An exclusive, non-blocking flock on DIR/runs/<name>/.lock while an attempt of the run is active.

  The kernel drops the lock when every descriptor of it is closed, so it dies with its holders: pass
  `fd` to the training subprocess (subprocess `pass_fds`) and the lock lasts as long as either lives;
  a "running" status whose lock nobody holds is stale (its sweep was killed) and is resumed.
  """

  def __init__(self, path: str):
    self.path = os.path.join(path, LOCK_FILE)
    self.fd: int | None = None

  def acquire(self) -> bool:
    """Takes the lock; False (holding nothing) if another process holds it."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return False
    self.fd = fd
    return True

  def release(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None


def is_locked(path: str) -> bool:
  """Whether some process holds the run lock of the run directory `path` (an attempt is active)."""
  if not os.path.exists(os.path.join(path, LOCK_FILE)):
    return False
  probe = RunLock(path)
  if probe.acquire():
    probe.release()
    return False
  return True
