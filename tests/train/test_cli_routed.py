"""`sparseformer train` (in-process) with every content-routed attention kind in one model: MoBA (Lu et al., 2025),
NSA (Yuan et al., 2025), DSA and DSA-block (DeepSeek-V3.2-Exp), trained through DSA's two stages (§2.1): a dense
warm-up, then a resume that switches `model.attention.dsa.stage` to sparse and keeps training."""

import contextlib
import io
import json
import os

import numpy as np
import pytest

# ~80 s of compiles (two stages of a 4-kind model): slow-marked for the suite budget; each kind's training stays in
# the default suite through tests/models/test_model_routed.py. Run with `pytest -m slow tests/train/test_cli_routed.py`.
pytestmark = pytest.mark.slow

from sparseformer.train import cli, trainer
from sparseformer.train import metrics as metrics_lib

PATTERN = ("moba", "nsa", "dsa", "dsa_block")
WARMUP_STEPS, TOTAL_STEPS = 2, 10
# A 4-layer model, one layer per routed kind, block sizes 16 on sequences of 64 (4 key blocks).
SETTINGS = [
    "data.seq_len=64", "data.batch_size=4", "data.num_val_batches=1", "data.val_fraction=0.1",
    "model.num_layers=4", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1", "model.max_seq_len=64",
    f"model.attention_pattern={PATTERN!r}", "model.attention.block_size=16",
    "model.attention.moba.block_size=16", "model.attention.moba.topk=2", "model.attention.moba.kv_major_tile=16",
    "model.attention.nsa.compress_block=16", "model.attention.nsa.compress_stride=8",
    "model.attention.nsa.select_block=16", "model.attention.nsa.num_selected=3", "model.attention.nsa.window=16",
    "model.attention.nsa.gate_hidden=8",
    "model.attention.dsa.index_heads=2", "model.attention.dsa.index_head_dim=8", "model.attention.dsa.topk=16",
    "model.attention.dsa.block_size=16", "model.attention.dsa.key_chunk=32", "model.attention.dsa.query_chunk=32",
    "model.attention.dsa.rope_dim=4",
    "train.learning_rate=1e-2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
    "train.checkpoint_every=2", "train.sample_tokens=0", "train.progress_bar=False", "train.peak_flops=1e11"]


def _train(workdir: str, settings: list[str]) -> tuple[int, str]:
  stdout = io.StringIO()
  flags = [flag for setting in settings for flag in ("--set", setting)]
  with contextlib.redirect_stdout(stdout):
    code = cli.main(["train", "--experiment", "quickstart", "--workdir", workdir] + flags)
  return code, stdout.getvalue()


@pytest.fixture(scope="module")
def staged_run(text_corpus, tmp_path_factory):
  """A run trained WARMUP_STEPS steps with dsa.stage=warmup, then resumed to TOTAL_STEPS with stage=sparse."""
  root = tmp_path_factory.mktemp("cli_routed")
  workdir = str(root / "run")
  base = SETTINGS + [f"data.path={text_corpus}", f"data.cache_dir={root / 'cache'}"]
  warmup = _train(workdir, base + ["model.attention.dsa.stage=warmup", f"train.steps={WARMUP_STEPS}"])
  sparse = _train(workdir, base + ["model.attention.dsa.stage=sparse", f"train.steps={TOTAL_STEPS}"])
  records = [record for record in metrics_lib.read_metrics(workdir) if "train/loss" in record]
  return workdir, warmup, sparse, records, base


def test_every_routed_kind_trains_and_logs_its_attention_metrics(staged_run):
  workdir, warmup, sparse, records, _ = staged_run
  assert warmup[0] == 0, warmup[1][-3000:]
  assert sparse[0] == 0, sparse[1][-3000:]
  losses = trainer.read_train_losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
  values = np.array([losses[step] for step in sorted(losses)])
  assert np.isfinite(values).all(), values
  # Sparse stage: every layer learns; the loss falls well below its value at the first sparse step.
  assert values[-1] < values[WARMUP_STEPS] - 0.5, values
  last = records[-1]
  for layer, kind in enumerate(PATTERN):
    names = [name for name in last if name.startswith(f"train/layer{layer}/attention/")]
    assert names, (kind, sorted(last))
    assert all(np.isfinite(last[name]) for name in names), {name: last[name] for name in names}
  assert 0 < last["train/layer0/attention/density"] < 1  # moba: 2 of 4 key blocks
  assert 0 < last["train/layer1/attention/selected_density"] <= 1  # nsa
  for name in ("gate_compressed", "gate_selected", "gate_window"):
    assert 0 < last[f"train/layer1/attention/{name}"] < 1  # sigmoid gates
  for layer in (2, 3):  # dsa, dsa_block
    assert last[f"train/layer{layer}/attention/indexer_kl"] >= 0


def test_dsa_stage_switches_from_warmup_to_sparse_on_resume(staged_run):
  workdir, warmup, sparse, records, _ = staged_run
  assert warmup[0] == 0 and sparse[0] == 0, sparse[1][-3000:]
  assert f"Resumed from step {WARMUP_STEPS}" in sparse[1]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as file:
    config = json.load(file)
  assert config["model"]["attention"]["dsa"]["stage"] == "sparse"
  assert config["train"]["steps"] == TOTAL_STEPS
  by_step = {record["step"]: record for record in records}
  causal = (64 + 1) / (2 * 64)  # warm-up attends densely: every causal pair of T^2
  for layer in (2, 3):
    density = f"train/layer{layer}/attention/density"
    for step in range(1, WARMUP_STEPS + 1):
      assert by_step[step][density] == pytest.approx(causal, abs=1e-6)
    for step in range(WARMUP_STEPS + 1, TOTAL_STEPS + 1):  # sparse: at most topk = 16 keys per query
      assert 0 < by_step[step][density] <= 16 / 64 + 1e-6, (step, by_step[step][density])
  checkpoints = sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
  assert checkpoints[-1] == TOTAL_STEPS


def test_other_model_changes_are_still_refused_on_resume(staged_run, capsys):
  workdir, _, sparse, _, base = staged_run
  assert sparse[0] == 0
  before = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
  settings = base + ["model.attention.dsa.stage=sparse", "model.attention.dsa.topk=8",
                         f"train.steps={TOTAL_STEPS}"]
  assert _train(workdir, settings)[0] == 2
  assert "holds a run with a different config (model.attention.dsa.topk)" in capsys.readouterr().err
  assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == before
