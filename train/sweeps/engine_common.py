"""One attempt of one sweep run as a subprocess of the ordinary trainer, shared by the local and Ray engines.

    python -m sparseformer.train.cli train --experiment NAME --workdir DIR/runs/<name> --set ...

`RunAttempt` takes the run's lock (store.RunLock), records "running", starts the trainer with its output
appended to train.log, and on exit records "done" (exit 0 and the final checkpoint of train.steps
written) or "failed" (the exit code and the tail of train.log). The trainer inherits the lock's
descriptor and dies with its parent (PR_SET_PDEATHSIG), so killing the sweep never leaves an orphan
training, and a second sweep can never run the same run while the first attempt lives.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

from sparseformer.train.sweeps import store

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Thread pools a child's numerical libraries size from these; XLA's CPU pool follows the affinity mask
# (measured with jax 0.10.2: `taskset -c 0` gives 1.00 cores busy in a matmul loop, while
# --xla_cpu_multi_thread_eigen=false still gave 1.7 and intra_op_parallelism_threads is not an XLA flag).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ERROR_TAIL_LINES = 20


def train_command(experiment: str, workdir: str, overrides: list[str]) -> list[str]:
  """The trainer's command line for one run."""
  command = [sys.executable, "-m", "sparseformer.train.cli", "train", "--experiment", experiment, "--workdir", workdir]
  for assignment in overrides:
    command += ["--set", assignment]
  return command


def thread_environment(num_cpus: int) -> dict[str, str]:
  """Environment variables that cap the child's OpenMP / MKL / OpenBLAS threads at `num_cpus`."""
  return {name: str(max(1, num_cpus)) for name in THREAD_VARIABLES}


def _child_setup(parent_pid: int, cpus: list[int] | None):
  """A preexec_fn: die with the parent (SIGTERM, so the trainer saves a checkpoint), pin to `cpus`."""
  def setup():
    if sys.platform.startswith("linux"):
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
      if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)  # pylint: disable=protected-access
    if cpus:
      os.sched_setaffinity(0, cpus)
  return setup


class RunAttempt:
  """One attempt of the run in `path` (DIR/runs/<name>): start(), then poll() until it returns a status."""

  def __init__(self, path: str, command: list[str], env: dict[str, str] | None = None, cpus: list[int] | None = None):
    self.path, self.command, self.cpus = path, command, cpus
    self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    self.lock = store.RunLock(path)
    self.process: subprocess.Popen | None = None
    self.status: dict | None = None
    self._start_time = 0.0

  def start(self) -> str:
    """"started", "done" (finished earlier: nothing started) or "locked" (another process runs it)."""
    os.makedirs(self.path, exist_ok=True)
    if not self.lock.acquire():
      return "locked"
    previous = store.read_status(self.path)
    if previous and previous["status"] == "done" and store.final_checkpoint_written(self.path):
      self.lock.release()
      return "done"
    self.status = store.start_status(self.path)
    store.write_status(self.path, self.status)
    log_path = os.path.join(self.path, store.LOG_FILE)
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"=== attempt {self.status['attempts']} on {self.status['host']} at {self.status['started']}: "
                f"{' '.join(self.command)}\n")
      log.flush()
      self._start_time = time.monotonic()
      try:
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=self.env, pass_fds=(self.lock.fd,),
                                        preexec_fn=_child_setup(os.getpid(), self.cpus))
      except OSError as error:
        self._finish(None, f"could not start the trainer: {error}")
        return "started"
    return "started"

  def poll(self) -> dict | None:
    """The final status once the trainer has exited (recorded in run_status.json), else None."""
    if self.process is None:
      return self.status if self.status and self.status["status"] != "running" else None
    returncode = self.process.poll()
    if returncode is None:
      return None
    self.process = None
    return self._finish(returncode)

  def wait(self, interval_s: float = 0.5) -> dict:
    while (status := self.poll()) is None:
      time.sleep(interval_s)
    return status

  def terminate(self) -> None:
    """Asks the trainer to save and stop (SIGTERM); poll() records the result."""
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()

  def _finish(self, returncode: int | None, error: str | None = None) -> dict:
    status = dict(self.status)
    status["returncode"] = returncode
    status["wall_time_s"] = round(status["wall_time_s"] + time.monotonic() - self._start_time, 3)
    status["finished"] = store.now_iso()
    if returncode == 0 and store.final_checkpoint_written(self.path):
      status.update(status="done", error=None)
    else:
      if error is None and returncode == 0:
        step = store.last_step(self.path)
        error = (f"the trainer exited 0 at step {step} before train.steps (interrupted or train.stop_at_step); "
                 "rerun the sweep to resume it.")
      elif error is None:
        error = store.tail(os.path.join(self.path, store.LOG_FILE), ERROR_TAIL_LINES) or f"exit code {returncode}"
      status.update(status="failed", error=error)
    store.write_status(self.path, status)
    self.status = status
    self.lock.release()
    return status
