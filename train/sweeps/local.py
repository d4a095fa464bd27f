"""The local engine: N sweep runs at once on this machine, each pinned to its share of the cores.

Slot i of `--parallel N` owns cores [i*K, (i+1)*K) with K = cores // N (os.sched_setaffinity, which also
sizes XLA's CPU thread pool) and K OpenMP / MKL threads; on a GPU machine one GPU each
(CUDA_VISIBLE_DEVICES), or, with more slots than GPUs, a shared GPU and an equal share of its memory
(XLA_PYTHON_CLIENT_MEM_FRACTION). Runs start and finish in plan order as slots free up, from the main
thread only (a PR_SET_PDEATHSIG child dies with the thread that forked it).
"""

import math
import os
import shutil
import subprocess
import time
from typing import Callable

from sparseformer.train.sweeps import engine_common, store
from sparseformer.train.sweeps.spec import Plan

MEMORY_FRACTION_TOTAL = 0.9  # of each GPU's memory, split between the runs that share it


def available_cores() -> list[int]:
  """The cores this process may run on (its affinity mask), sorted."""
  return sorted(os.sched_getaffinity(0))


def visible_gpus() -> list[str]:
  """GPU ids the runs may use: CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L` lists ([] if none)."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [item for item in visible.split(",") if item.strip() and item.strip() != "-1"]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(index) for index, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def check_parallel(parallel: int, cores: list[int]) -> None:
  if parallel < 1:
    raise ValueError(f"--parallel must be at least 1, got {parallel}.")
  if parallel > len(cores):
    raise ValueError(f"--parallel {parallel} exceeds the {len(cores)} cores this process may use "
                     f"({cores}); lower --parallel to at most {len(cores)}.")


def slot_resources(parallel: int, cores: list[int], gpus: list[str]) -> list[tuple[list[int], dict[str, str]]]:
  """(cores, environment) of each of the `parallel` slots: a disjoint share of the cores, and of the GPUs."""
  check_parallel(parallel, cores)
  per_slot = len(cores) // parallel
  slots = []
  for slot in range(parallel):
    slot_cores = cores[slot * per_slot:(slot + 1) * per_slot]
    env = engine_common.thread_environment(len(slot_cores))
    if gpus and parallel <= len(gpus):
      per_run = len(gpus) // parallel
      env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * per_run:(slot + 1) * per_run])
    elif gpus:
      sharing = math.ceil(parallel / len(gpus))
      env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{MEMORY_FRACTION_TOTAL / sharing:.3f}"
    slots.append((slot_cores, env))
  return slots


def run_sweep(plan: Plan, sweep_dir: str, parallel: int, *, log: Callable[[str], None] = print,
              poll_interval_s: float = 0.5) -> dict[str, int]:
  """Runs every run of `plan` not yet done under `sweep_dir`; returns counts {"done", "failed", "skipped"}.

  Raises ValueError (before anything is written) for a bad `--parallel` or a DIR holding another sweep.
  """
  slots = slot_resources(parallel, available_cores(), visible_gpus())
  store.write_sweep(sweep_dir, plan.to_json())
  pending = list(plan.runs)
  active: dict[int, tuple] = {}  # slot -> (run, attempt)
  counts = {"done": 0, "failed": 0, "skipped": 0}
  total = len(plan.runs)

  def progress() -> str:
    finished = counts["done"] + counts["failed"] + counts["skipped"]
    return f"[{finished}/{total} finished, {len(active)} running]"

  try:
    while pending or active:
      deferred = []
      while pending and len(active) < parallel:
        run = pending.pop(0)
        slot = min(set(range(parallel)) - set(active))
        cores, env = slots[slot]
        path = store.run_dir(sweep_dir, run.name)
        attempt = engine_common.RunAttempt(path, engine_common.train_command(plan.experiment, path, run.overrides),
                                           env, cores)
        outcome = attempt.start()
        if outcome == "done":
          counts["skipped"] += 1
          log(f"{progress()} {run.name}: already done, skipped")
        elif outcome == "locked":  # another sweep runs it now: come back to it when it is over
          deferred.append(run)
        else:
          active[slot] = (run, attempt)
          log(f"{progress()} started {run.name} (cores {','.join(map(str, cores))}"
              f"{', GPU ' + env['CUDA_VISIBLE_DEVICES'] if 'CUDA_VISIBLE_DEVICES' in env else ''}, "
              f"attempt {attempt.status['attempts']})")
      pending += deferred
      for slot, (run, attempt) in list(active.items()):
        status = attempt.poll()
        if status is None:
          continue
        del active[slot]
        counts[status["status"]] += 1
        if status["status"] == "done":
          log(f"{progress()} done {run.name} in {status['wall_time_s']:.1f} s")
        else:
          last = (status["error"] or "").strip().splitlines()[-1:] or [""]
          log(f"{progress()} FAILED {run.name} (exit {status['returncode']}): {last[0]}")
      if pending or active:
        time.sleep(poll_interval_s)
  except KeyboardInterrupt:
    log(f"Interrupted: stopping {len(active)} running run(s); each saves a checkpoint and resumes on the next "
        "`sweep run`.")
    for _, attempt in active.values():
      attempt.terminate()
    for run, attempt in active.values():
      attempt.wait()
    raise
  return counts
