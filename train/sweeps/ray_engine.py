"""The Ray engine: the sweep's runs as Ray tasks with declared resources, on one machine or a cluster.

Each task runs the same trainer subprocess as the local engine (engine_common.RunAttempt) on its worker,
with `num_cpus` / `num_gpus` per run (Ray sets CUDA_VISIBLE_DEVICES for GPU tasks); on the worker the run
is pinned to free cores of its node (one flock per core under the node's temporary directory). DIR must
be on a filesystem every node sees at the same path (NFS, a cluster filesystem): the driver writes
sweep.json, the workers write runs/<name>/. Ray is an optional extra (`pip install -e '.[ray]'`) and
is imported only here. Ray >= 2.9 (2.60 has no local_mode: a local run starts a real local cluster).
"""

import fcntl
import math
import os
import tempfile
import time
from typing import Callable

from sparseformer.train.sweeps import engine_common, store
from sparseformer.train.sweeps.spec import Plan

LOCAL_OBJECT_STORE_BYTES = 200 * 2**20  # runs pass no data through Ray; keep a local cluster's /dev/shm use small


def import_ray():
  """The ray module, or a ValueError that says how to install it."""
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ValueError("--engine ray needs Ray, an optional extra: pip install -e '.[ray]' (or use --engine local)."
                     ) from error
  return ray


def _claim_cores(count: int) -> tuple[list[int], list[int]]:
  """(cores, lock fds): `count` cores of this node no other sweep run holds, or ([], []) if too few are free."""
  directory = os.path.join(tempfile.gettempdir(), f"sparseformer-cores-{os.getuid()}")
  os.makedirs(directory, exist_ok=True)
  cores, fds = [], []
  for core in sorted(os.sched_getaffinity(0)):
    fd = os.open(os.path.join(directory, f"core{core}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      continue
    cores.append(core)
    fds.append(fd)
    if len(cores) == count:
      return cores, fds
  for fd in fds:
    os.close(fd)
  return [], []


def run_on_worker(path: str, experiment: str, overrides: list[str], cpus_per_run: float,
                  poll_interval_s: float = 1.0) -> dict:
  """Runs one attempt of the run in `path` on this node; its final status, or {"status": "skipped"} if done.

  The trainer command is built here, so it uses this node's Python.
  """
  command = engine_common.train_command(experiment, path, overrides)
  cores, core_fds = _claim_cores(max(1, math.floor(cpus_per_run)))
  try:
    env = engine_common.thread_environment(len(cores) or max(1, math.floor(cpus_per_run)))
    while True:
      attempt = engine_common.RunAttempt(path, command, env, cores or None)
      outcome = attempt.start()
      if outcome == "done":
        return {"status": "skipped"}
      if outcome == "started":
        return attempt.wait(poll_interval_s)
      time.sleep(poll_interval_s)  # "locked": another sweep runs it; its result decides
  finally:
    for fd in core_fds:
      os.close(fd)


def _check_resources(ray, cpus_per_run: float, gpus_per_run: float) -> None:
  if cpus_per_run <= 0 or gpus_per_run < 0:
    raise ValueError(f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, got {cpus_per_run} and {gpus_per_run}.")
  nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
  if not any(node.get("CPU", 0) >= cpus_per_run and node.get("GPU", 0) >= gpus_per_run for node in nodes):
    largest = max(((node.get("CPU", 0), node.get("GPU", 0)) for node in nodes), default=(0, 0))
    raise ValueError(f"No Ray node has --cpus-per-run {cpus_per_run} CPUs and --gpus-per-run {gpus_per_run} GPUs "
                     f"(the largest has {largest[0]:g} CPUs, {largest[1]:g} GPUs); lower them or add nodes.")


def run_sweep(plan: Plan, sweep_dir: str, *, address: str | None = None, cpus_per_run: float = 1.0,
              gpus_per_run: float = 0.0, max_parallel: int | None = None, num_cpus: int | None = None,
              log: Callable[[str], None] = print) -> dict[str, int]:
  """Runs every run of `plan` not yet done as Ray tasks; returns counts {"done", "failed", "skipped"}.

  Uses the Ray session of this process if there is one; else connects to `address`, or with `address`
  None starts a local Ray cluster with `num_cpus` CPUs (default: this process's cores), and shuts it down
  at the end. Ray is reached and the resources checked before anything is written to `sweep_dir`.
  """
  ray = import_ray()
  if max_parallel is not None and max_parallel < 1:
    raise ValueError(f"--parallel must be at least 1, got {max_parallel}.")
  connect = not ray.is_initialized()  # a caller's own Ray session (a notebook, a test) is used as it is
  if connect and address:
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
  elif connect:
    ray.init(num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES)
  try:
    _check_resources(ray, cpus_per_run, gpus_per_run)
    store.write_sweep(sweep_dir, plan.to_json())
    task = ray.remote(run_on_worker).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
    counts = {"done": 0, "failed": 0, "skipped": 0}
    pending, in_flight = list(plan.runs), {}
    while pending or in_flight:
      while pending and (max_parallel is None or len(in_flight) < max_parallel):
        run = pending.pop(0)
        path = os.path.abspath(store.run_dir(sweep_dir, run.name))
        in_flight[task.remote(path, plan.experiment, list(run.overrides), cpus_per_run)] = run
      ready, _ = ray.wait(list(in_flight), num_returns=1)
      run = in_flight.pop(ready[0])
      try:
        status = ray.get(ready[0])
      except ray.exceptions.RayError as error:  # the worker died: record it unless another attempt is live
        path = store.run_dir(sweep_dir, run.name)
        status = {**(store.read_status(path) or store.start_status(path)), "status": "failed",
                  "error": f"Ray task failed: {error}", "finished": store.now_iso()}
        if not store.is_locked(path):
          store.write_status(path, status)
      counts[status["status"]] += 1
      finished = sum(counts.values())
      if status["status"] == "failed":
        last = (status.get("error") or "").strip().splitlines()[-1:] or [""]
        log(f"[{finished}/{len(plan.runs)} finished] FAILED {run.name} (exit {status.get('returncode')}): {last[0]}")
      else:
        what = "already done, skipped" if status["status"] == "skipped" else f"done in {status['wall_time_s']:.1f} s"
        log(f"[{finished}/{len(plan.runs)} finished] {run.name}: {what} on {status.get('host', '?')}")
    return counts
  finally:
    if connect:
      ray.shutdown()
