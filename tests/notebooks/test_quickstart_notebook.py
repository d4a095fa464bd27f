"""notebooks/quickstart.ipynb stays valid and runs top to bottom, in its QUICK mode (tiny sizes, a few steps).

The notebook is parsed as plain JSON (no nbformat / nbclient dependency). Its code cells run in order in one
namespace, as in a kernel, in a fresh Python process: a clean JAX start (so XLA flags apply), nothing leaks
into or out of the pytest process. Shell and magic lines (`!pip ...`, `%matplotlib ...`) are skipped.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"

# Runs in the child process: argv = notebook, results JSON. Executes every code cell (a cell that raises
# ends the process with its traceback, naming the cell), then records what the test checks.
_RUNNER = r"""
import json, sys
import numpy as np

def without_shell_lines(source):
  lines = []
  for line in source.splitlines():
    stripped = line.lstrip()
    lines.append(line[:len(line) - len(stripped)] + "pass" if stripped.startswith(("!", "%")) else line)
  return "\n".join(lines)

notebook_path, results_path = sys.argv[1:3]
with open(notebook_path, encoding="utf-8") as file:
  cells = [cell for cell in json.load(file)["cells"] if cell["cell_type"] == "code"]
namespace = {"__name__": "__main__"}
for index, cell in enumerate(cells):
  source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
  exec(compile(without_shell_lines(source), f"quickstart.ipynb code cell {index}", "exec"), namespace)

summaries = [namespace["summary"], namespace["variant_summary"]]
results = {
    "QUICK": namespace["QUICK"],
    "STEPS": namespace["STEPS"],
    "attention_error": namespace["attention_error"],
    "logits_finite": bool(np.isfinite(np.asarray(namespace["logits"])).all()),
    "summaries": [{key: float(value) for key, value in summary.items() if not isinstance(value, str)}
                  for summary in summaries],  # strings: e.g. the energy method label
    "sweep_status": namespace["sweep_status"],
    "variant_patterns": [list(namespace["variant"].model.attention_pattern),
                         list(namespace["variant"].model.ffn_pattern)],
}
with open(results_path, "w", encoding="utf-8") as file:
  json.dump(results, file)
"""


def _load() -> dict:
  with open(NOTEBOOK, encoding="utf-8") as file:
    return json.load(file)


def test_notebook_is_valid_nbformat4_with_no_outputs():
  notebook = _load()
  assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5, "nbformat 4.5 (cells carry ids)"
  assert isinstance(notebook["metadata"], dict)
  assert NOTEBOOK.stat().st_size < 40_000, "keep the notebook small: no outputs, no embedded images"
  ids = [cell.get("id") for cell in notebook["cells"]]
  assert all(ids) and len(set(ids)) == len(ids), "every cell needs a unique id"
  kinds = [cell["cell_type"] for cell in notebook["cells"]]
  assert set(kinds) <= {"code", "markdown"} and "code" in kinds and "markdown" in kinds
  for index, cell in enumerate(notebook["cells"]):
    assert isinstance(cell["metadata"], dict) and isinstance(cell["source"], (str, list)), index
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {index} stores outputs"
    else:
      assert "outputs" not in cell and "execution_count" not in cell, index


@pytest.mark.slow  # 65-85 s of the default suite's budget; run before touching the notebook or the APIs it calls
def test_notebook_runs_top_to_bottom(tmp_path):
  env = dict(os.environ)
  env.update(
      SPARSEFORMER_NOTEBOOK_QUICK="1",
      SPARSEFORMER_NOTEBOOK_WORKDIR=str(tmp_path / "runs"),
      SPARSEFORMER_CACHE=str(tmp_path / "cache"),  # tokenized-corpus cache
      MPLBACKEND="Agg",
      # Compilation is most of the run time on CPU; LLVM -O0 cuts it by about a third.
      XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
  )
  results_path = tmp_path / "results.json"
  process = subprocess.run([sys.executable, "-c", _RUNNER, str(NOTEBOOK), str(results_path)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=900, check=False)
  assert process.returncode == 0, f"a notebook cell failed:\n{process.stdout[-3000:]}\n{process.stderr[-6000:]}"

  results = json.loads(results_path.read_text(encoding="utf-8"))
  assert results["QUICK"] is True
  assert os.path.getsize(tmp_path / "runs" / "layouts.png") > 0
  assert results["attention_error"] < 1e-4  # float32 on CPU
  assert results["logits_finite"]
  for summary in results["summaries"]:
    assert summary["step"] == results["STEPS"], summary
    assert 0 < summary["loss"] < 10 and 0 < summary["train_loss"] < 10, summary
  assert results["variant_patterns"] == [["local", "global"], ["dense", "moe"]]
  assert results["sweep_status"] == 0, "the notebook's 4-run sweep failed"
  summary_md = (tmp_path / "runs" / "mqar-sweep" / "summary.md").read_text(encoding="utf-8")
  assert "Report covers all 4 runs." in summary_md, summary_md[:2000]
  assert "global" in summary_md and "local_w16" in summary_md
  assert (tmp_path / "runs" / "mqar-sweep" / "plots" / "curve_train_loss.png").stat().st_size > 0
  for run in ("quickstart", "local-global-moe"):
    assert (tmp_path / "runs" / run / "metrics.jsonl").stat().st_size > 0
