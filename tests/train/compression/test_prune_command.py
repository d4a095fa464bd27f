"""`sparseformer prune` end to end, masks through a fine-tune and a resume, and bad input rejected up front."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from sparseformer.layers.moe.config import MoEConfig
from sparseformer.train import cli, overrides, trainer
from sparseformer.train import state as state_lib
from sparseformer.train.compression import prune_masks




def _params(workdir: str):
  config = trainer.load_run_config(workdir)
  run = trainer.open_run(config, workdir, require_checkpoint=True)
  run.checkpointer.close()
  return {name: np.asarray(leaf[...]) for name, leaf in prune_masks.named_params(run.state.params).items()}


@pytest.fixture
def fake_run(tmp_path, tiny_config):
  """A workdir with a config.json and a checkpoint directory (enough for the argument checks)."""
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints" / "8")
  (workdir / "config.json").write_text(json.dumps(overrides.to_dict(tiny_config())))
  return str(workdir)


@pytest.mark.parametrize("flags, message", [
    (["--method", "lottery", "--sparsity", "0.5"], "--method 'lottery' is unknown"),
    (["--method", "wanda", "--sparsity", "1.0"], "--sparsity 1.0 must lie strictly between 0 and 1"),
    (["--method", "magnitude"], "--method magnitude needs --sparsity"),
    (["--method", "nm", "--nm", "2:5"], "--nm 2:5: the input dimension of blocks/0/attention/wk .*M=5"),
    (["--method", "heads", "--heads", "1"], "--heads 1: under GQA"),
    (["--method", "nm", "--nm", "2:4", "--group", "per_output"], "--group applies to --method magnitude or wanda"),
    (["--method", "wanda", "--sparsity", "0.5", "--group", "per_row"], "--group 'per_row': choose one of"),
])
def test_bad_flags_are_rejected_before_any_work(fake_run, tmp_path, capsys, flags, message, tree_digest):
  before = tree_digest(fake_run)
  out = str(tmp_path / "out")
  assert cli.main(["prune", "--workdir", fake_run, "--out", out, *flags]) == 2
  assert re.search(message, capsys.readouterr().err)
  assert not os.path.exists(out) and tree_digest(fake_run) == before


def test_missing_checkpoint_and_existing_out_are_rejected(fake_run, tmp_path, capsys):
  existing = tmp_path / "exists"
  existing.mkdir()
  flags = ["--method", "magnitude", "--sparsity", "0.5"]
  assert cli.main(["prune", "--workdir", fake_run, "--out", str(existing), *flags]) == 2
  assert "--out" in capsys.readouterr().err and os.listdir(existing) == []
  os.rmdir(os.path.join(fake_run, "checkpoints", "8"))
  assert cli.main(["prune", "--workdir", fake_run, "--out", str(tmp_path / "new"), *flags]) == 2
  assert "has no checkpoint" in capsys.readouterr().err


def test_masks_survive_a_fine_tune_and_a_resume(tmp_path, tiny_config):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  base = tiny_config(steps=4, checkpoint_every=2)
  config = dataclasses.replace(  # smaller than tiny_config's model: two short compiles of a 1-layer model
      base, model=dataclasses.replace(base.model, num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                                      max_seq_len=32, mlp_hidden=64),
      data=dataclasses.replace(base.data, seq_len=32, batch_size=4))
  shapes = {name: leaf.shape for name, leaf in prune_masks.named_params(
      state_lib.abstract_model(config.model)[1]).items()}
  rng = np.random.default_rng(0)
  masks = {name: rng.random(shapes[name]) < 0.5 for name in ("blocks/0/attention/wq", "blocks/0/ffn/w_down")}
  prune_masks.save_masks(workdir, masks)
  masked = dataclasses.replace(config, train=dataclasses.replace(config.train, prune_masks=workdir))
  interrupted = dataclasses.replace(masked, train=dataclasses.replace(masked.train, stop_at_step=2))
  assert trainer.train(interrupted, workdir)["interrupted"]
  for resume in (False, True):
    if resume:
      trainer.train(masked, workdir)  # resumes at step 2 and re-reads the masks
    params = _params(workdir)
    for name, mask in masks.items():
      assert np.all(params[name][~mask] == 0), name
      assert np.count_nonzero(params[name][mask]) == mask.sum(), name  # the kept weights still train
  assert trainer.load_run_config(workdir).train.prune_masks == workdir


@pytest.mark.slow
def test_prune_command_end_to_end(tmp_path, tiny_config, tree_digest):
  """Train a tiny MoE model, prune it (Wanda 50 %, 2:4, 2 of 4 experts): the source stays byte-identical, the
  outputs hold the exact patterns / the smaller model and a report. Run: pytest -m slow -k end_to_end."""
  base = tiny_config(steps=4)
  config = dataclasses.replace(base, model=dataclasses.replace(
      base.model, ffn_pattern=("dense", "moe"), moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=64)))
  source = str(tmp_path / "run")
  trainer.train(config, source)
  before = tree_digest(source)
  for method, flags in (("wanda", ["--sparsity", "0.5"]), ("nm", ["--nm", "2:4"]), ("experts", ["--experts", "2"])):
    out = str(tmp_path / method)
    assert cli.main(["prune", "--workdir", source, "--out", out, "--method", method, "--calibration-batches", "2",
                     *flags]) == 0
    with open(os.path.join(out, "prune_report.json"), encoding="utf-8") as file:
      report = json.load(file)
    assert np.isfinite(report["delta_bits_per_byte"]) and report["step"] == 4
    params = _params(out)
    if method == "experts":
      assert params["blocks/1/ffn/w_gate"].shape[0] == 2 and report["pruned"]["parameters"] < report[
          "original"]["parameters"]
    else:
      masks = prune_masks.load_masks(out)
      assert report["zero_share_of_pruned_weights"] == pytest.approx(0.5)
      for name, mask in masks.items():
        assert np.all(params[name][~mask] == 0)
  assert tree_digest(source) == before
