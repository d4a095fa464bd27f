"""Multi-process start-up through `jax.distributed`, from flags or the environment."""

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, cpu_collectives: str = "gloo") -> bool:
  """Connects this process to the others; returns True when running multi-process.

  Flags win over the environment variables SPARSEFORMER_COORDINATOR, SPARSEFORMER_NUM_PROCESSES and
  SPARSEFORMER_PROCESS_ID. With none of them set this is a no-op, except on clusters where
  `jax.distributed.initialize()` detects everything itself (set SPARSEFORMER_AUTO_DISTRIBUTED=1 there,
  e.g. Cloud TPU pods or SLURM). On CPU the collectives go through gloo.
  """
  coordinator = coordinator or os.environ.get("SPARSEFORMER_COORDINATOR")
  if num_processes is None and "SPARSEFORMER_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["SPARSEFORMER_NUM_PROCESSES"])
  if process_id is None and "SPARSEFORMER_PROCESS_ID" in os.environ:
    process_id = int(os.environ["SPARSEFORMER_PROCESS_ID"])
  if coordinator is None and os.environ.get("SPARSEFORMER_AUTO_DISTRIBUTED") != "1":
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT (or SPARSEFORMER_COORDINATOR).")
    return False
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ValueError("--coordinator needs --num-processes and --process-id (or their SPARSEFORMER_* variables).")
  if coordinator is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id {process_id} must lie in [0, --num-processes={num_processes}).")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return jax.process_count() > 1


def is_multiprocess() -> bool:
  return jax.process_count() > 1
