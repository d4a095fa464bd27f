"""train/generate_command.py (`sparseformer sample`): prompts from --prompt / --prompts-file as bytes, and bad
settings or a too-long prompt fail before the checkpoint loads (the full command runs in test_cli.py)."""

import argparse
import json
import os

import pytest

from sparseformer.models.config import ModelConfig
from sparseformer.train import cli, generate_command, overrides
from sparseformer.train.config import RunConfig
from sparseformer.train.data_config import DataConfig


def _args(**values) -> argparse.Namespace:
  return argparse.Namespace(**(dict(prompt=None, prompts_file=None) | values))


def test_prompts_are_read_as_bytes(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_bytes(b"def \r\n\n\xff\xfe bad\n")  # CRLF, an empty prompt, bytes that are not UTF-8
  assert generate_command.read_prompts(_args(prompts_file=str(path))) == [b"def ", b"", b"\xff\xfe bad"]
  assert generate_command.read_prompts(_args(prompt="caf\udcc3")) == [b"caf\xc3"]  # argv's undecodable byte
  assert generate_command.read_prompts(_args()) == [b""]
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="holds no prompt"):
    generate_command.read_prompts(_args(prompts_file=str(path)))
  with pytest.raises(FileNotFoundError, match="--prompts-file"):
    generate_command.read_prompts(_args(prompts_file=str(tmp_path / "missing.txt")))


def test_bad_settings_and_long_prompts_fail_before_loading(tmp_path, capsys):
  workdir = str(tmp_path / "run")  # config.json only, no checkpoint: the errors must come first
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as file:
    json.dump(overrides.to_dict(RunConfig(model=ModelConfig(max_seq_len=64), data=DataConfig(seq_len=64))), file)
  for flags, message in ((["--top-p", "1.5"], "--top-p = 1.5 must lie in (0, 1]"),
                         (["--tokens", "0"], "--tokens (max_new_tokens) = 0"),
                         (["--prompt", "x" * 60, "--tokens", "8"],
                          "Prompt 0 has 60 tokens; with --tokens (max_new_tokens) = 8 it needs 67 positions")):
    assert cli.main(["sample", "--workdir", workdir] + flags) == 2
    assert message in capsys.readouterr().err
