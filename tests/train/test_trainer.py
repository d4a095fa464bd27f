"""End-to-end training: learning, resume equivalence, failure handling, eval and sample."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sparseformer.layers.moe import config as moe_config
from sparseformer.models import decode
from sparseformer.train import checkpoint, trainer
from sparseformer.train import metrics as metrics_lib
from sparseformer.train.data import load_corpus



def _unigram_entropy(tokens: np.ndarray) -> float:
  counts = np.bincount(np.asarray(tokens, np.int64))
  probs = counts[counts > 0] / counts.sum()
  return float(-(probs * np.log(probs)).sum())


def test_loss_falls_well_below_the_unigram_baseline(text_corpus, tmp_path, tiny_config):
  config = tiny_config(steps=300, learning_rate=1e-2, warmup_steps=20, log_every=50,
                       checkpoint_every=1000)
  summary = trainer.train(config, str(tmp_path / "run"))
  unigram = _unigram_entropy(load_corpus(config.data).val_tokens)
  assert np.isfinite(summary["loss"])
  assert summary["loss"] < unigram - 0.5, (summary, unigram)
  assert summary["bits_per_byte"] > 0


def test_resume_equals_uninterrupted_run(tmp_path, tiny_config, read_losses):
  straight = tiny_config(steps=8)
  trainer.train(straight, str(tmp_path / "straight"))
  resumed_dir = str(tmp_path / "resumed")
  first = trainer.train(dataclasses.replace(straight, train=dataclasses.replace(straight.train, stop_at_step=4)),
                        resumed_dir)
  assert first["interrupted"] and first["step"] == 4
  trainer.train(straight, resumed_dir)
  want, got = read_losses(str(tmp_path / "straight")), read_losses(resumed_dir)
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=1e-5)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, tiny_config):
  workdir = str(tmp_path / "run")
  # lr 0 at step 1 (warmup), then Adam steps of ~5e29 make the step-3 forward pass overflow to inf/NaN.
  config = tiny_config(steps=8, learning_rate=1e30, warmup_steps=2, checkpoint_every=1)
  with pytest.raises(trainer.NonFiniteError, match="at step 3 .* last good checkpoint is step 2"):
    trainer.train(config, workdir)
  saved = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
  assert saved == [1, 2]
  run = trainer.open_run(config, workdir, require_checkpoint=True)
  assert int(run.state.step) == 2
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(run.state.params))
  run.checkpointer.close()


def test_eval_and_sample_from_a_workdir(text_corpus, tmp_path, tiny_config):
  config = tiny_config(steps=4)
  workdir = str(tmp_path / "run")
  summary = trainer.train(config, workdir)
  result = trainer.evaluate_workdir(trainer.load_run_config(workdir), workdir)
  assert result["step"] == 4
  assert result["loss"] == pytest.approx(summary["loss"], rel=1e-5)
  run = trainer.open_run(trainer.load_run_config(workdir), workdir, require_checkpoint=True)
  text = trainer.sample_text(run, "import ", 12, temperature=0.0)
  misses = decode._decode_fn.cache_info().misses  # pylint: disable=protected-access
  again = trainer.sample_text(run, "import ", 12, temperature=0.0)
  run.checkpointer.close()
  assert text.startswith("import ") and len(text.encode()) >= len("import ")
  assert again == text  # greedy: same text, from the cached decode step (no new jit)
  assert decode._decode_fn.cache_info().misses == misses  # pylint: disable=protected-access


def test_bad_inputs_fail_before_work_and_overwrite_nothing(text_corpus, tmp_path, tiny_config):
  config = tiny_config()
  # Impossible mesh.
  with pytest.raises(ValueError, match="mesh"):
    trainer.train(dataclasses.replace(config, mesh=dataclasses.replace(config.mesh, data=3, fsdp=1)),
                  str(tmp_path / "mesh"))
  # Empty corpus.
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="data.path"):
    trainer.train(dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(empty))),
                  str(tmp_path / "empty_run"))
  # A workdir that is a file.
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("keep me")
  with pytest.raises(checkpoint.CheckpointError, match="not a directory"):
    trainer.train(config, str(not_a_dir))
  assert not_a_dir.read_text() == "keep me"
  # A workdir holding a different run.
  workdir = str(tmp_path / "run")
  trainer.train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=2)), workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  other = dataclasses.replace(config, model=dataclasses.replace(config.model, d_model=32))
  with pytest.raises(ValueError, match="model.d_model"):
    trainer.train(other, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before
  # An unreadable checkpoint.
  corrupt = str(tmp_path / "corrupt")
  trainer.train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=2)), corrupt)
  state_dir = os.path.join(corrupt, "checkpoints", "2", "state")
  for name in os.listdir(state_dir):
    path = os.path.join(state_dir, name)
    if os.path.isfile(path):
      with open(path, "wb") as file:
        file.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="Cannot restore checkpoint 2"):
    trainer.train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=4)), corrupt)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(text_corpus, tmp_path, tiny_config):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "sparseformer.train.cli", "train", "--workdir", str(workdir),
             "--set", f"data.path={text_corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
             "--set", "data.seq_len=32", "--set", "data.batch_size=4", "--set", "model.num_layers=1",
             "--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.num_kv_heads=2",
             "--set", "train.steps=100000", "--set", "train.peak_flops=1e11", "--set", "train.log_every=1",
             "--set", "train.progress_bar=False", "--set", "train.checkpoint_every=100000"]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  import time
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None and not (
      metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.5)
  process.terminate()
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert "Received SIGTERM" in output
  steps = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
  assert steps and steps[-1] >= 3, output


def test_moe_bias_balancing_runs_outside_the_optimizer_and_is_logged(tmp_path, tiny_config):
  config = tiny_config(steps=3, log_every=1)  # odd: +-u steps cannot cancel to an all-zero bias
  moe = moe_config.deepseek_v3(num_experts=4, top_k=2, expert_hidden=32, n_groups=2, topk_groups=1,
                               num_shared_experts=1, block_size=16, bias_update_rate=1e-2, jitter=0.01)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, ffn_pattern=("moe",), moe=moe))
  workdir = str(tmp_path / "run")
  summary = trainer.train(config, workdir)
  assert np.isfinite(summary["loss"])
  records = [r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]
  assert len(records[-1]["train/layer0/moe/expert_load"]) == 4
  # Step 1 runs with zero bias; the update after it moves every expert's bias by +-u.
  assert records[0]["train/layer0/moe/bias_range"] == 0 and records[1]["train/layer0/moe/bias_range"] > 0
  run = trainer.open_run(config, workdir, require_checkpoint=True)
  bias_leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(run.state.extra)
                 if "bias" in jax.tree_util.keystr(path)]
  run.checkpointer.close()
  assert bias_leaves and all(np.abs(np.asarray(leaf)).max() > 0 for leaf in bias_leaves)
  assert not any("bias" in jax.tree_util.keystr(path) for path, _ in
                 jax.tree_util.tree_leaves_with_path(run.state.params))
