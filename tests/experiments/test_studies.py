"""The five reproduction studies (issue 15): every SWEEP plans, docstrings name their commands, the matched
budgets the docstrings promise hold; behind `slow`, each SWEEP end to end at a tiny size through the CLI."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from sparseformer import experiments
from sparseformer.experiments import sparse_lm
from sparseformer.models import flops
from sparseformer.train import overrides
from sparseformer.train.sweeps import spec

STUDIES = ("mqar", "switch_scaling", "aux_free_balancing", "sparse_lm", "listops")
PLANNED_RUNS = {"mqar": 10 * 3 * 3 * 4 * 3, "switch_scaling": 5 * 2, "aux_free_balancing": 3 * 2, "sparse_lm": 24,
                "listops": 4}


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_plans_and_its_docstring_names_run_and_report(study):
  """spec.plan builds every run's RunConfig (a bad point raises) at every variant x grid point (one learning rate
  and seed: they cannot make a point invalid, and MQAR's 756 runs would take seconds); both commands named."""
  sweep = experiments.sweep(study)
  assert len(sweep["learning_rates"]) * len(sweep["seeds"]) * len(sweep["variants"]) * int(np.prod(
      [len(values) for values in sweep.get("grid", {}).values()])) == PLANNED_RUNS[study]
  plan = spec.plan(study, seeds=sweep["seeds"][:1], learning_rates=sweep["learning_rates"][:1])
  assert len(plan.runs) == PLANNED_RUNS[study] // (len(sweep["learning_rates"]) * len(sweep["seeds"]))
  assert {run.variant for run in plan.runs} == set(experiments.variants(study))
  doc = experiments.describe(study)
  assert f"sparseformer sweep run --experiment {study} --out " in doc and "--parallel 2" in doc
  assert "sparseformer sweep report " in doc
  assert "Expect" in doc and ("Published" in doc or study == "mqar")


def test_mqar_cpu_command_plans_one_point_of_every_kind():
  plan = spec.plan("mqar", ["model.d_model=64", "data.seq_len=64"], seeds=[0], learning_rates=[2.2e-3])
  assert len(plan.runs) == 10
  assert {(run.grid["model.d_model"], run.grid["data.seq_len"], run.grid["data.mqar.num_kv_pairs"])
          for run in plan.runs} == {(64, 64, 4)}


def test_switch_scaling_variants_have_the_dense_active_flops():
  """Top-1 over experts of the dense hidden size: matmul weights per token equal dense's up to the router."""
  dense = experiments.get("switch_scaling", "dense").model
  for experts in (2, 4, 8, 16):
    model = experiments.get("switch_scaling", f"switch_e{experts}").model
    assert model.moe.routed_experts == experts and model.moe.routed_top_k == 1
    moe_layers = sum(model.ffn_kind(layer) == "moe" for layer in range(model.num_layers))
    assert moe_layers == 2
    router = moe_layers * model.d_model * experts
    assert flops.matmul_params_per_token(model) - router == flops.matmul_params_per_token(dense)


def test_aux_free_variants_differ_only_in_balancing():
  models = {name: experiments.get("aux_free_balancing", name).model.moe for name in ("none", "aux_loss", "bias")}
  assert [(m.aux_loss_alpha, m.selection_bias) for m in models.values()] == [(0.0, False), (0.01, False), (0.0, True)]
  assert models["bias"].bias_update_rate == 1e-3
  strip = lambda m: (m.num_experts, m.top_k, m.expert_hidden, m.score_function, m.gate_norm, m.dispatch)
  assert len({strip(m) for m in models.values()}) == 1


def _keys_per_query(variant: str, seq_len: int) -> float:
  """Mean keys attended per query (models/flops.py density x T), DSA's indexer cost left out."""
  run = overrides.apply_overrides(experiments.get("mqar", variant), [f"data.seq_len={seq_len}",
                                                                     f"model.max_seq_len={seq_len}"])
  model = run.model
  keys = flops.attention_density(model, 0, seq_len) * seq_len
  if variant.startswith("dsa"):
    dsa = model.attention.dsa
    indexer = dsa.index_heads * dsa.index_head_dim / (2 * model.num_heads * model.resolved_head_dim)
    keys -= indexer * (seq_len + 1) / 2
  return keys


@pytest.mark.parametrize("seq_len", [64, 256])
def test_mqar_routed_kinds_match_local_w48_key_budget(seq_len):
  """The docstring's matching: moba and dsa visit about local_w48's keys per query at every length; nsa's
  compressed branch adds T / 8 - 8 keys on top of a 48-key budget at the last position."""
  budget = _keys_per_query("local_w48", seq_len)
  for variant in ("moba", "dsa"):
    assert abs(_keys_per_query(variant, seq_len) - budget) <= 0.1 * budget, variant
  nsa = experiments.get("mqar", "nsa").model.attention.nsa
  last = seq_len // nsa.compress_stride + nsa.num_selected * nsa.select_block + nsa.window
  assert last == 48 + seq_len // 8 - 8


@pytest.mark.parametrize("seq_len", [64, 256])
def test_mqar_b16_routed_kinds_match_local_w16_key_budget(seq_len):
  """The low-budget slice: dsa_b16 visits local_w16's mean keys within 10 %, moba_b16 at most as many (own block
  + one chosen block of 8); nsa_b16 is one free selection block + window 8 + the T / 8 compressed keys."""
  budget = _keys_per_query("local_w16", seq_len)
  assert abs(_keys_per_query("dsa_b16", seq_len) - budget) <= 0.1 * budget
  assert 0.7 * budget <= _keys_per_query("moba_b16", seq_len) <= budget
  nsa = experiments.get("mqar", "nsa_b16").model.attention.nsa
  assert (nsa.num_selected, nsa.init_blocks, nsa.local_blocks) == (1, 0, 0)
  assert seq_len // nsa.compress_stride + nsa.num_selected * nsa.select_block + nsa.window == 16 + seq_len // 8


def test_sparse_lm_covers_every_kind_and_flops_order():
  kinds = {experiments.get("sparse_lm", variant).model.attention_pattern[0] for variant in sparse_lm.VARIANTS}
  assert kinds == {"global", "local", "strided", "fixed", "bigbird", "longformer", "chunked", "sinks", "moba", "nsa",
                   "dsa"}
  costs = {variant: sparse_lm.attention_flops_per_token(variant) for variant in sparse_lm.VARIANTS}
  assert max(costs, key=costs.get) == "global"
  assert all(np.isfinite(value) and value > 0 for value in costs.values())


def test_sparse_lm_frontier_reads_done_runs_of_results_csv(tmp_path):
  path = tmp_path / "results.csv"
  rows = [("global", "done", "2.0"), ("global", "done", "2.2"), ("local", "done", "2.3"), ("strided", "failed", "1.0"),
          ("fixed", "done", "")]
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(["variant", "status", "final/eval/bits_per_byte"])
    writer.writerows(rows)
  table = sparse_lm.frontier(str(path))
  assert [row[0] for row in table] == ["local", "global"]  # by attention FLOPs; failed / empty rows left out
  assert table[1][2] == pytest.approx(2.1) and table[0][2] == pytest.approx(2.3)
  assert table[1][1] == pytest.approx(sparse_lm.attention_flops_per_token("global"))


# Tiny sizes per study for the end-to-end run: 2 steps, one seed, one learning rate, small models.
_TINY_COMMON = ["train.steps=2", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2",
                "train.warmup_steps=1", "data.num_val_batches=1", "data.batch_size=2", "train.progress_bar=False"]
TINY = {
    "mqar": ["model.d_model=64", "data.seq_len=64"],
    "switch_scaling": ["model.d_model=32", "model.num_layers=2", "data.seq_len=64", "model.max_seq_len=64",
                       "model.mlp_hidden=64", "model.moe.expert_hidden=64"],
    "aux_free_balancing": ["model.d_model=32", "model.num_layers=2", "data.seq_len=64", "model.max_seq_len=64",
                           "model.moe.expert_hidden=32"],
    "sparse_lm": ["model.d_model=32", "model.num_layers=2", "data.seq_len=256", "model.max_seq_len=256"],
    "listops": ["model.d_model=32", "model.num_layers=2", "data.seq_len=128", "model.max_seq_len=128",
                "data.listops.min_length=32", "data.listops.max_length=128"],
}


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_study_sweep_runs_end_to_end_at_a_tiny_size(study, tmp_path):
  """`sweep run` + `sweep report` of the study's own SWEEP (every variant), 2 steps of a tiny model.

  Run with: python -m pytest -q -m slow -p no:cacheprovider tests/experiments/test_studies.py"""
  out = tmp_path / study
  sets = [item for assignment in _TINY_COMMON + TINY[study] for item in ("--set", assignment)]
  first_rate = experiments.sweep(study)["learning_rates"][0]
  plan = spec.plan(study, _TINY_COMMON + TINY[study], seeds=[0], learning_rates=[first_rate])
  command = [sys.executable, "-m", "sparseformer.train.cli", "sweep", "run", "--experiment", study, "--out", str(out),
             "--parallel", "2", "--seeds", "0", "--learning-rates", repr(plan.runs[0].learning_rate), *sets]
  result = subprocess.run(command, capture_output=True, text=True, timeout=3000, env=dict(os.environ))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = subprocess.run([sys.executable, "-m", "sparseformer.train.cli", "sweep", "report", str(out)],
                          capture_output=True, text=True, timeout=600)
  assert report.returncode == 0, report.stderr[-3000:]
  with open(out / "results.csv", encoding="utf-8") as file:
    rows = list(csv.DictReader(file))
  assert len(rows) == len(plan.runs) == len(experiments.variants(study))
  assert {row["status"] for row in rows} == {"done"}
  assert {row["steps"] for row in rows} == {"2"}
  select = spec.plan(study).select
  assert all(row[f"final/{select}"] for row in rows), select
  assert (out / "summary.md").exists()


def test_listops_root_operator_baseline_beats_the_majority_class_in_sample():
  """The in-sample per-operator majority rule can never do worse than the global majority class."""
  from sparseformer.experiments import listops  # pylint: disable=import-outside-toplevel
  result = listops.root_operator_baseline(num_val_batches=2)
  assert result["examples"] == 32
  assert 0.1 <= result["majority_class"] <= result["fit_on_eval_set"] <= 1.0
  assert 0.0 <= result["fit_on_other_set"] <= 1.0
