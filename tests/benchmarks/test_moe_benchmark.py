"""benchmarks/moe.py: Zipf-skewed routing really skews the loads, and the grid runs end to end."""

import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.benchmarks import moe as bench


def test_zipf_tokens_skew_the_top1_loads_by_rank():
  x, weight = bench.zipf_tokens(4096, 64, 8, a=1.2, strength=3.0, dtype=jnp.float32)
  logits = np.asarray(x[0]) @ np.asarray(weight)
  load = np.bincount(logits.argmax(-1), minlength=8) / 4096
  probs = np.arange(1, 9) ** -1.2
  assert abs(load[0] - probs[0] / probs.sum()) < 0.08 and load[0] > 2.5 * load[7]  # rank 1 dominates, r^-a
  assert bench.load_imbalance(x, weight, 1) > 2.5
  with pytest.raises(ValueError, match="d_model"):
    bench.zipf_tokens(16, 4, 8, a=1.2, strength=3.0, dtype=jnp.float32)


def test_grid_runs_with_dense_baseline_and_reports_imbalance():
  rows = bench.run_grid([4], [1], ["dropless_gather"], tokens=64, d_model=16, hidden=32, repeats=3,
                        dtype=jnp.float32, max_step_seconds=60.0, routing="zipf", log=lambda *_: None)
  by_dispatch = {row["dispatch"]: row for row in rows}
  assert set(by_dispatch) == {"dense", "dropless_gather"} and all(row["runs"] == 3 for row in rows)
  assert by_dispatch["dropless_gather"]["load_max_over_mean"] > 1.5
  with pytest.raises(ValueError, match="routing"):
    bench.run_grid([4], [1], ["dropless_gather"], tokens=64, d_model=16, hidden=32, repeats=3, dtype=jnp.float32,
                   max_step_seconds=60.0, routing="skewed")
  assert "| 4 | 1 |" in bench.to_markdown(rows, "header")
