"""train/passkey_eval.py: the prompts are the task generator's, a tiny untrained model fills a 2 x 2 grid and its
files, and bad flags / outputs fail before any work with nothing overwritten (also through `sparseformer eval`)."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train import cli, generate, overrides, passkey_eval, tokenizer, trainer
from sparseformer.train.config import RunConfig, TrainConfig
from sparseformer.train.data_config import DataConfig
from sparseformer.train.tasks import passkey
from sparseformer.train.tasks.config import PasskeyConfig

# test_generate.py's model at a passkey length (its eager initialisers are compiled once per process)
MODEL = ModelConfig(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, max_seq_len=320,
                    attention_pattern=("local", "global"), attention=SparseAttentionConfig(block_size=16, window=16))


def test_cell_prompts_end_at_the_question_and_answers_are_the_passkeys():
  config = PasskeyConfig(num_digits=5)
  prompts, answers = passkey_eval.cell_examples(config, 288, 0.5, 3, seed=0)
  assert answers.shape == (3, 5)
  for prompt, answer in zip(prompts, answers):
    assert len(prompt) == 288 - 5 + 1  # the example's 288 inputs + its last target, less the answer
    text = tokenizer.decode(prompt)
    assert text.endswith(passkey.QUESTION.decode()) and text.startswith(passkey.PROMPT.decode())
    assert passkey.key_sentence(tokenizer.decode(answer)).decode() in text


def test_untrained_model_grid_writes_table_and_heatmap(tmp_path):
  model = DecoderLM(MODEL, rngs=nnx.Rngs(0))
  # lengths 314 and 320: every prompt prefills in one [3, 320] shape (one compile); at 320 the prompt (316) and
  # the 5 digits fill the cache exactly (the last digit is drawn, never stored)
  rows = passkey_eval.evaluate(model, PasskeyConfig(), [314, 320], [0.0, 1.0], samples=3, seed=0,
                               log=lambda *_: None)
  assert [(row["length"], row["depth"]) for row in rows] == [(314, 0.0), (314, 1.0), (320, 0.0), (320, 1.0)]
  # accuracy is what greedy generation actually produced on the cell's examples
  prompts, answers = passkey_eval.cell_examples(PasskeyConfig(), 320, 1.0, 3, seed=0)
  produced = np.stack(generate.generate(model, prompts, max_new_tokens=5, eos_id=None))
  assert rows[3]["accuracy"] == (produced == answers).all(axis=1).mean()
  assert rows[3]["digit_accuracy"] == (produced == answers).mean()
  paths = passkey_eval.write_outputs(rows, str(tmp_path / "out"), dict(step=0, samples=3))
  assert [os.path.basename(path) for path in paths] == list(passkey_eval.FILES)
  with open(paths[2], encoding="utf-8") as file:
    assert "| depth \\ length | 314 | 320 |" in file.read()
  with open(paths[3], "rb") as file:
    assert file.read(8) == b"\x89PNG\r\n\x1a\n"
  assert len(json.load(open(paths[1], encoding="utf-8"))["rows"]) == 4
  with pytest.raises(ValueError, match="already holds passkey.csv"):
    passkey_eval.check_out(str(tmp_path / "out"), new_dir=False)


def test_accuracy_counts_whole_passkeys_and_digits(monkeypatch):
  """Scoring against an oracle that gets row 0 right, one digit of row 1 wrong and row 2 all wrong."""
  prompts, answers = passkey_eval.cell_examples(PasskeyConfig(), 256, 0.5, 3, seed=0)

  def oracle(model, batch_prompts, **settings):
    assert settings["max_new_tokens"] == 5 and settings["temperature"] == 0.0 and settings["eos_id"] is None
    assert all(np.array_equal(a, b) for a, b in zip(batch_prompts, prompts))
    return [answers[0], np.where(np.arange(5) == 2, answers[1] + 1, answers[1]), answers[2] + 1]

  monkeypatch.setattr(passkey_eval.generate, "generate", oracle)
  model = type("Model", (), {"config": MODEL})()
  [row] = passkey_eval.evaluate(model, PasskeyConfig(), [256], [0.5], samples=3, seed=0, log=lambda *_: None)
  assert row["accuracy"] == pytest.approx(1 / 3) and row["digit_accuracy"] == pytest.approx(9 / 15)


def test_bad_grids_are_errors_naming_the_flag():
  config = PasskeyConfig()
  with pytest.raises(ValueError, match=r"--lengths value 512 exceeds the model's max_seq_len=320"):
    passkey_eval.check_grid(config, [256, 512], [0.0], 1, 320)
  with pytest.raises(ValueError, match=r"--lengths value.*250"):
    passkey_eval.check_grid(config, [128], [0.0], 1, 320)
  with pytest.raises(ValueError, match=r"--depths value 1.5"):
    passkey_eval.check_grid(config, [256], [1.5], 1, 320)
  with pytest.raises(ValueError, match=r"--samples=0"):
    passkey_eval.check_grid(config, [256], [0.5], 0, 320)
  with pytest.raises(ValueError, match=r"--lengths='2x6'"):
    passkey_eval.parse_list("2x6", int, "--lengths")


def _write_run(workdir: str) -> RunConfig:
  """config.json of a tiny byte-level passkey run in `workdir` (no checkpoint)."""
  config = RunConfig(name="passkey", model=MODEL, data=DataConfig(source="task", task="passkey", seq_len=320,
                                                                  batch_size=2),
                     train=TrainConfig(steps=1, progress_bar=False, sample_tokens=0))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as file:
    json.dump(overrides.to_dict(config), file)
  return config


def test_eval_command_rejects_bad_flags_and_outputs_before_loading(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  _write_run(workdir)  # no checkpoint: every error below must come first
  passkey_args = ["eval", "--workdir", workdir, "--task", "passkey", "--lengths", "256"]
  assert cli.main(passkey_args + ["--lengths", "256,1024"]) == 2  # the last --lengths counts
  assert "--lengths value 1024 exceeds the model's max_seq_len=320" in capsys.readouterr().err
  assert cli.main(passkey_args + ["--depths", "0,2"]) == 2
  assert "--depths value 2.0 must lie in [0, 1]" in capsys.readouterr().err
  (tmp_path / "taken").mkdir()
  assert cli.main(passkey_args + ["--out", str(tmp_path / "taken")]) == 2
  assert "already exists" in capsys.readouterr().err
  with open(os.path.join(workdir, "passkey.md"), "w", encoding="utf-8") as file:
    file.write("an earlier result")
  assert cli.main(passkey_args) == 2
  assert "already holds passkey.md" in capsys.readouterr().err
  assert open(os.path.join(workdir, "passkey.md"), encoding="utf-8").read() == "an earlier result"


@pytest.mark.slow
def test_eval_command_on_a_checkpoint_writes_the_grid(tmp_path):
  """`sparseformer eval --task passkey` end to end on a step-0 checkpoint (slow: restore + compiles under the
  mesh; run with `pytest -m slow tests/train/test_passkey_eval.py`)."""
  workdir = str(tmp_path / "run")
  config = _write_run(workdir)
  run = trainer.open_run(config, workdir)
  run.checkpointer.save(0, run.state, {}, wait=True)
  run.checkpointer.close()
  assert cli.main(["eval", "--workdir", workdir, "--task", "passkey", "--lengths", "250,256", "--depths", "0,1",
                   "--samples", "2"]) == 0
  assert set(passkey_eval.FILES) <= set(os.listdir(workdir))
  record = json.load(open(os.path.join(workdir, "passkey.json"), encoding="utf-8"))
  assert record["step"] == 0 and len(record["rows"]) == 4 and record["split"] == "test"
