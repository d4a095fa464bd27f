"""Test-wide randomness: fixed inputs in the default run, fresh ones under the `fuzz` marker.

    pytest                                    # fixed seeds, derandomized hypothesis: same cases every run
    pytest -m fuzz                            # the `seed` tests again with fresh entropy + hypothesis fuzz twins
    SPARSEFORMER_SEED=123 pytest -m fuzz -k 'name and fuzz'   # replays a fuzz failure's seed

A test that takes the `seed` fixture runs twice: `[seed0]` (seed FIXED_SEED, default run) and
`[fuzz]` (marked `fuzz`: fresh entropy, or SPARSEFORMER_SEED); a failing test's report shows its
seed in a "Captured seed" section. Hypothesis runs derandomized (`derandomize=True`, the profile
below); fuzz twins of property tests set `derandomize=False` themselves and are marked `fuzz`.
"""

import os

import hypothesis
import numpy as np
import pytest

FIXED_SEED = 0

hypothesis.settings.register_profile("sparseformer", derandomize=True, print_blob=True)
hypothesis.settings.load_profile("sparseformer")


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
