"""Sharded training on 8 simulated CPU devices, and 2 real processes through jax.distributed (gloo)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _sharded_report(corpus: str, workdir, mode: str, env: dict | None = None) -> dict:
  result = subprocess.run([sys.executable, os.path.join(HERE, "sharded_run.py"), corpus, str(workdir), mode],
                          capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])


def test_mesh_2x2x2_shards_parameters_by_the_rules_and_matches_one_device(text_corpus, tmp_path):
  report = _sharded_report(text_corpus, tmp_path, "dense")
  # Rules: embed -> fsdp, heads/kv_heads/mlp -> tensor, vocab -> tensor unless it does not divide (259 does not).
  assert report["specs"]["wq"] == ["fsdp", "tensor", "None"]
  assert report["specs"]["wk"] == ["fsdp", "tensor", "None"]
  assert report["specs"]["w_down"] == ["tensor", "fsdp"]
  assert report["specs"]["embedding"] == ["None", "fsdp"]
  assert report["specs"]["norm"] == ["fsdp"]
  assert report["adam_mu_spec"] == ["fsdp", "tensor", "None"]
  assert report["shard_shapes"]["wq"] == [32, 2, 16] and report["global_shapes"]["wq"] == [64, 4, 16]
  sharded = [report["sharded_losses"][str(step)] for step in (1, 2, 3)]
  single = [report["single_losses"][str(step)] for step in (1, 2, 3)]
  assert np.isfinite(sharded).all()
  np.testing.assert_allclose(sharded, single, rtol=2e-5)
  assert report["sharded"]["loss"] == report["sharded"]["loss"]  # not NaN
  np.testing.assert_allclose(report["sharded"]["loss"], report["single"]["loss"], rtol=2e-5)
  assert report["restored_on_other_mesh_equal"] and report["restored_on_other_mesh_devices"] == 1


@pytest.mark.slow  # ~55 s; expert parallelism is held to one device at the layer level (tests/layers/moe/test_parallel.py)
def test_moe_expert_parallel_training_matches_one_device(text_corpus, tmp_path):
  """expert=2 x data=2 x fsdp=2 (all-to-all dispatch) equals one device, and logs per-layer MoE metrics."""
  report = _sharded_report(text_corpus, tmp_path, "moe")
  moe_sharded = [report["moe_sharded_losses"][str(step)] for step in (1, 2, 3)]
  moe_single = [report["moe_single_losses"][str(step)] for step in (1, 2, 3)]
  assert np.isfinite(moe_sharded).all()
  np.testing.assert_allclose(moe_sharded, moe_single, rtol=2e-5)
  record = report["moe_sharded_last_record"]
  assert len(record["train/layer1/moe/expert_load"]) == 4
  np.testing.assert_allclose(record["train/layer1/moe/expert_load"],
                             report["moe_single_last_record"]["train/layer1/moe/expert_load"], atol=1e-6)
  assert record["train/aux_loss"] > 0


@pytest.mark.slow  # ~110 s on 2 cores (two compiles of a 4-kind model); the CLI test covers them in the default run
def test_routed_attention_training_matches_one_device(text_corpus, tmp_path):
  """moba, nsa, dsa and dsa_block layers on data=2 x fsdp=2 x tensor=2 train as on one device, metrics included."""
  # Both runs share one process and these flags; -O0 only shortens the XLA compiles.
  env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()}
  report = _sharded_report(text_corpus, tmp_path, "routed", env)
  sharded = [report["routed_sharded_losses"][str(step)] for step in (1, 2)]
  single = [report["routed_single_losses"][str(step)] for step in (1, 2)]
  assert np.isfinite(sharded).all() and np.isfinite(single).all(), (sharded, single)
  np.testing.assert_allclose(sharded, single, rtol=2e-5)
  record, single_record = report["routed_sharded_last_record"], report["routed_single_last_record"]
  for layer in range(4):
    names = sorted(name for name in record if name.startswith(f"train/layer{layer}/attention/"))
    assert names and names == sorted(name for name in single_record if name.startswith(f"train/layer{layer}/"
                                                                                        "attention/")), names
    np.testing.assert_allclose([record[name] for name in names], [single_record[name] for name in names],
                               rtol=1e-4, atol=1e-6)
  assert 0 < record["train/layer0/attention/density"] < 1  # moba: 2 of 4 key blocks
  assert record["train/aux_loss"] > 0  # the DSA indexers' KL


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_two_processes_train_checkpoint_and_agree(text_corpus, tmp_path):
  workdir = tmp_path / "run"
  port = _free_port()
  settings = [f"data.path={text_corpus}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
              "data.batch_size=8", "data.num_val_batches=1", "data.val_fraction=0.1", "model.num_layers=1",
              "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2", "train.steps=4",
              "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0",
              "train.progress_bar=False", "train.peak_flops=1e11"]
  command = [sys.executable, "-m", "sparseformer.train.cli", "train", "--workdir", str(workdir),
             "--coordinator", f"localhost:{port}", "--num-processes", "2"]
  for setting in settings:
    command += ["--set", setting]
  env = {**os.environ, "XLA_FLAGS": ""}
  processes = [subprocess.Popen(command + ["--process-id", str(i)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
  outputs = [process.communicate(timeout=600)[0] for process in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]
  summaries = [json.loads(next(line for line in output.splitlines() if " summary " in line).split(" summary ", 1)[1])
               for output in outputs]
  assert summaries[0]["step"] == summaries[1]["step"] == 4
  assert summaries[0]["train_loss"] == summaries[1]["train_loss"]
  assert summaries[0]["loss"] == summaries[1]["loss"] and np.isfinite(summaries[0]["loss"])
  assert "2 device(s)" in outputs[0]
  assert sorted(name for name in os.listdir(workdir / "checkpoints") if name.isdigit()) == ["2", "4"]
