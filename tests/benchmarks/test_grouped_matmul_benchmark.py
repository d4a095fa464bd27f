"""benchmarks/grouped_matmul.py: argument checks, the report table, and (slow) the whole script on tiny shapes."""

import json

import jax
import pytest

from sparseformer.benchmarks import grouped_matmul as bench


def test_refuses_existing_out_and_full_run_on_cpu(tmp_path):
  existing = tmp_path / "old.json"
  existing.write_text("{}")
  with pytest.raises(SystemExit):
    bench.main(["--smoke", "--out", str(existing)])
  assert existing.read_text() == "{}"
  if jax.default_backend() == "cpu":
    with pytest.raises(SystemExit):
      bench.main(["--out", str(tmp_path / "new.json")])
  assert not (tmp_path / "new.json").exists()


def test_markdown_reports_ratios_and_skips():
  report = dict(header="h", matmul=[dict(experts=8, top_k=2, mode="fwd", gmm_ms=2.0, dense_ms=1.5, gmm_tflops=75.0,
                                         dense_tflops=100.0, gmm_fraction_of_dense=0.75)],
                layer=[dict(experts=8, top_k=2, dispatch="dense", seconds=0.001, ratio_to_dense=1.0),
                       dict(experts=8, top_k=2, dispatch="dropless_pallas", skipped="skipped: budget")])
  text = bench.to_markdown(report)
  assert "| 8 | 2 | fwd | 2.000 | 1.500 | 75.0 | 100.0 | 75% |" in text
  assert "| 8 | 2 | dropless_pallas | skipped: budget | " in text


@pytest.mark.slow  # benchmark plumbing (two reference compiles); suite budget
def test_correctness_check_flags_a_wrong_kernel(monkeypatch):
  monkeypatch.setattr(bench, "gmm", lambda a, b, s, **_: bench.gmm_reference(a, b, s) * 1.1)
  check = bench.correctness(3, d_model=16, hidden=16, dtype=bench.jnp.float32, interpret=True, rows=40)
  assert not check["ok"] and check["relative_errors"]["out"] > bench.CHECK_TOL


def test_uniform_group_sizes_sum_to_rows():
  sizes = bench.group_sizes_uniform(1000, 8)
  assert sizes.sum() == 1000 and sizes.shape == (8,) and sizes.min() > 0


@pytest.mark.slow  # interpret-mode gmm and MoE-layer compiles (~30 s CPU); run with `pytest -m slow`
def test_smoke_run_writes_the_report(tmp_path):
  out = tmp_path / "gmm.json"
  assert bench.main(["--smoke", "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  assert {r["mode"] for r in report["matmul"]} == {"fwd", "fwd_bwd"}
  assert {r["dispatch"] for r in report["layer"]} == {"dense", "dropless_pallas", "dropless_gather"}
  assert all(r["gmm_tflops"] > 0 for r in report["matmul"])
  assert all(c["ok"] for c in report["correctness"])
