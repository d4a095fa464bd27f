"""Test-wide randomness: fixed inputs in the default run, fresh ones under the `fuzz` marker.

    pytest                                    # fixed seeds, derandomized hypothesis: same cases every run
    pytest -m fuzz                            # the `seed` tests again with fresh entropy + hypothesis fuzz twins
    SPARSEFORMER_SEED=123 pytest -m fuzz -k 'name and fuzz'   # replays a fuzz failure's seed

A test that takes the `seed` fixture runs twice: `[seed0]` (seed FIXED_SEED, default run) and
`[fuzz]` (marked `fuzz`: fresh entropy, or SPARSEFORMER_SEED); a failing test's report shows its
seed in a "Captured seed" section. Hypothesis runs derandomized (`derandomize=True`, the profile
below); fuzz twins of property tests set `derandomize=False` themselves and are marked `fuzz`.

Compilation: one persistent XLA cache per test run (a fresh directory, removed at the end), shared by the xdist
workers and the CLI / sweep subprocesses they start, so a program that several tests compile alike (the tiny
model's train step, a sweep's identical runs) is compiled once. Set JAX_COMPILATION_CACHE_DIR to use your own.
"""

import os
import shutil
import sys
import tempfile
import uuid

import hypothesis
import numpy as np
import pytest

FIXED_SEED = 0

hypothesis.settings.register_profile("sparseformer", derandomize=True, print_blob=True)
hypothesis.settings.load_profile("sparseformer")

_CACHE_PREFIX = "sparseformer-xla-cache-"


def _use_compilation_cache(run_id: str) -> None:
  """Points this process (and, through the environment, its subprocesses) at the run's XLA cache."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ and not os.environ.get("SPARSEFORMER_TEST_CACHE"):
    return  # the user's own cache
  directory = os.path.join(tempfile.gettempdir(), _CACHE_PREFIX + run_id)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=directory, SPARSEFORMER_TEST_CACHE=directory,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if "jax" in sys.modules:  # imported by a plugin before this file: the environment was read already
    sys.modules["jax"].config.update("jax_compilation_cache_dir", directory)
    sys.modules["jax"].config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
  worker = getattr(config, "workerinput", None)
  if worker is not None:  # an xdist worker: the controller chose the run id
    _use_compilation_cache(worker["testrunuid"])
    return
  if getattr(config.option, "testrunuid", "unset") is None:
    config.option.testrunuid = uuid.uuid4().hex  # xdist hands it to the workers
  _use_compilation_cache(getattr(config.option, "testrunuid", None) or uuid.uuid4().hex)


def pytest_unconfigure(config):
  directory = os.environ.get("SPARSEFORMER_TEST_CACHE")
  if directory and getattr(config, "workerinput", None) is None:
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=[pytest.param(False, id="seed0"), pytest.param(True, id="fuzz", marks=pytest.mark.fuzz)])
def seed(request) -> int:
  """Input seed of the test: FIXED_SEED, or in the `fuzz` variant fresh entropy (SPARSEFORMER_SEED
  replays one); recorded in the report of a failing test."""
  if not request.param:
    value = FIXED_SEED
  elif os.environ.get("SPARSEFORMER_SEED"):
    value = int(os.environ["SPARSEFORMER_SEED"])
  else:
    value = int(np.random.SeedSequence().entropy % 2**31)
  replay = f"SPARSEFORMER_SEED={value} pytest -m fuzz '{request.node.nodeid}'" if request.param else "fixed"
  request.node.add_report_section("call", "seed", f"seed={value} ({replay})")
  return value
