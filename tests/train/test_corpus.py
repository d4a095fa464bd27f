"""Tests for train/corpus.py: the stdlib, text and memmap sources, the split rule, the cache."""

import hashlib
import json
import os
import platform

import numpy as np
import pytest

from sparseformer.train import corpus as corpus_lib
from sparseformer.train import data, tokenizer
from sparseformer.train.data_config import DataConfig

EOS = tokenizer.EOS_ID


from data_helpers import make_config as _config  # noqa: E402
from data_helpers import random_tokens as _random_tokens  # noqa: E402
from data_helpers import write_tokens as _write_tokens  # noqa: E402


# ----------------------------------------------------------------------------- stdlib corpus


@pytest.fixture(scope="module")
def stdlib_corpora(tmp_path_factory):
  """(cold load, warm load) of the stdlib corpus into a fresh cache."""
  cache = tmp_path_factory.mktemp("stdlib_cache")
  config = DataConfig(cache_dir=str(cache))
  return data.load_corpus(config), data.load_corpus(config), cache


def test_stdlib_corpus_is_deterministic_and_cached(stdlib_corpora):
  cold, warm, cache = stdlib_corpora
  assert cold.metadata["cache"] == "miss" and warm.metadata["cache"] == "hit"
  np.testing.assert_array_equal(cold.train_tokens, warm.train_tokens)
  np.testing.assert_array_equal(cold.val_tokens, warm.val_tokens)
  for key in ("python_version", "num_files", "num_documents", "train", "val", "content_sha256"):
    assert cold.metadata[key] == warm.metadata[key]
  assert cold.metadata["python_version"] == platform.python_version()
  json.dumps(cold.metadata)  # JSON-ready
  assert sorted(os.listdir(cache)) == sorted(
      [os.path.basename(cold.metadata["cache_path"]),
       os.path.basename(cold.metadata["cache_path"])[:-4] + ".json"])  # no temp files left
  meta = cold.metadata
  assert meta["split_rule"] == "document_hash"
  assert meta["train"]["documents"] + meta["val"]["documents"] == meta["num_documents"]
  assert meta["train"]["tokens"] == cold.train_tokens.size > 5_000_000
  assert 0.005 < meta["val"]["tokens"] / (meta["train"]["tokens"] + meta["val"]["tokens"]) < 0.05
  # One EOS per document: bytes = tokens - documents.
  assert meta["train"]["bytes"] == meta["train"]["tokens"] - meta["train"]["documents"]
  for part in (cold.train_tokens, cold.val_tokens):
    assert part.dtype == np.uint16 and part[-1] == EOS and part.max() <= EOS


def test_stdlib_files_are_library_and_docs_only():
  root = corpus_lib.stdlib_root()
  files = corpus_lib.stdlib_files(root)
  assert files == sorted(files)
  assert {"os.py", "json/__init__.py", "pydoc_data/topics.py"} <= set(files)
  for rel in files:
    parts = rel.split("/")
    assert not {"site-packages", "dist-packages", "test", "tests", "__pycache__"} & set(parts), rel
    assert rel.endswith((".py", ".txt", ".rst")), rel


def test_stdlib_stream_holds_files_and_topic_texts(stdlib_corpora):
  cold, _, _ = stdlib_corpora
  stream = np.concatenate([cold.train_tokens, cold.val_tokens]).astype(np.uint8).tobytes()
  with open(os.path.join(corpus_lib.stdlib_root(), "json", "decoder.py"), "rb") as handle:
    assert handle.read() in stream
  from pydoc_data.topics import topics
  assert topics["assert"].encode("utf-8") in stream
  assert b"topics = {'assert'" not in stream  # topics.py enters as text, not as its literal source


# ----------------------------------------------------------------------------- text sources


def _reference_is_val(name, val_fraction):
  """Independent statement of the split rule: SHA-256 of the relative path."""
  return int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64 < val_fraction


def _make_text_dir(root, names):
  contents = {}
  for i, name in enumerate(names):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    contents[name] = f"document {i} {name}\n".encode() * (5 + i % 7)
    path.write_bytes(contents[name])
  return contents


def _split_bytes(contents, val_fraction):
  train, val = b"", b""
  for name in sorted(contents):
    doc = contents[name] + b"\xff"  # stands for EOS below
    if _reference_is_val(name, val_fraction):
      val += doc
    else:
      train += doc
  return train, val


def _as_bytes_with_eos_marker(tokens):
  tokens = np.asarray(tokens).astype(np.int64)
  assert ((tokens < 256) | (tokens == EOS)).all() and not (tokens == 0xFF).any()
  return np.where(tokens == EOS, 0xFF, tokens).astype(np.uint8).tobytes()


def test_text_directory_split_by_path_hash_and_stable(tmp_path):
  names = [f"d{i % 3}/sub/file{i}.txt" for i in range(60)]
  contents = _make_text_dir(tmp_path / "docs", names)
  (tmp_path / "docs" / ".git").mkdir()
  (tmp_path / "docs" / ".git" / "HEAD").write_bytes(b"ref: hidden\n")
  (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG\0\0binary")
  (tmp_path / "docs" / "empty.txt").write_bytes(b"")
  config = _config(tmp_path, path=str(tmp_path / "docs"), val_fraction=0.2, seq_len=8,
                   batch_size=2, num_val_batches=1)
  loaded = data.load_corpus(config)
  assert loaded.metadata["source"] == "text" and loaded.metadata["split_rule"] == "document_hash"
  assert loaded.metadata["skipped_binary_files"] == ["image.png"]
  train, val = _split_bytes(contents, 0.2)
  assert val and train
  assert _as_bytes_with_eos_marker(loaded.train_tokens) == train
  assert _as_bytes_with_eos_marker(loaded.val_tokens) == val
  # Adding files never moves an existing file between splits.
  contents.update(_make_text_dir(tmp_path / "docs", [f"new/extra{i}.txt" for i in range(20)]))
  reloaded = data.load_corpus(config)
  assert reloaded.metadata["cache"] == "miss"
  train, val = _split_bytes(contents, 0.2)
  assert _as_bytes_with_eos_marker(reloaded.train_tokens) == train
  assert _as_bytes_with_eos_marker(reloaded.val_tokens) == val


def test_single_text_file_splits_by_token_tail(tmp_path):
  text = "".join(f"line {i}: ünïcode ok\n" for i in range(400)).encode()
  (tmp_path / "book.txt").write_bytes(text)
  config = _config(tmp_path, path=str(tmp_path / "book.txt"), val_fraction=0.1, seq_len=16,
                   batch_size=2, num_val_batches=2)
  loaded = data.load_corpus(config)
  assert loaded.metadata["split_rule"] == "token_tail"
  stream = np.concatenate([loaded.train_tokens, loaded.val_tokens])
  np.testing.assert_array_equal(stream, np.append(np.frombuffer(text, np.uint8), EOS))
  assert loaded.val_tokens.size == round(stream.size * 0.1)


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_without_reading_files(tmp_path, monkeypatch):
  _make_text_dir(tmp_path / "docs", [f"f{i}.txt" for i in range(30)])
  config = _config(tmp_path, path=str(tmp_path / "docs"), seq_len=8, batch_size=1)
  first = data.load_corpus(config)
  def fail(*args, **kwargs):
    raise AssertionError("files were read despite a warm cache")
  monkeypatch.setattr(corpus_lib, "_read_documents", fail)
  second = data.load_corpus(config)
  assert second.metadata["cache"] == "hit"
  np.testing.assert_array_equal(first.train_tokens, second.train_tokens)
  # A changed file changes the key: the stale entry is not used.
  (tmp_path / "docs" / "f3.txt").write_bytes(b"changed contents, longer than before\n")
  with pytest.raises(AssertionError, match="files were read"):
    data.load_corpus(config)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
  _make_text_dir(tmp_path / "docs", [f"f{i}.txt" for i in range(30)])
  config = _config(tmp_path, path=str(tmp_path / "docs"), seq_len=8, batch_size=1)
  real_save = np.save
  def interrupted_save(handle, array, **kwargs):
    # Mid-write, the final name must not exist: readers see a whole entry or none.
    assert handle.name.endswith(".tmp") and os.listdir(tmp_path / "cache") == [
        os.path.basename(handle.name)]
    handle.write(b"\x93NUMPY partial")
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "save", interrupted_save)
  with pytest.raises(KeyboardInterrupt):
    data.load_corpus(config)
  assert os.listdir(tmp_path / "cache") == []  # neither a partial file nor a temp file
  monkeypatch.setattr(np, "save", real_save)
  assert data.load_corpus(config).metadata["cache"] == "miss"
  assert data.load_corpus(config).metadata["cache"] == "hit"


def test_corrupt_cache_is_rebuilt_and_unwritable_cache_is_skipped(tmp_path):
  _make_text_dir(tmp_path / "docs", [f"f{i}.txt" for i in range(30)])
  config = _config(tmp_path, path=str(tmp_path / "docs"), seq_len=8, batch_size=1)
  first = data.load_corpus(config)
  with open(first.metadata["cache_path"], "r+b") as handle:
    handle.truncate(200)
  again = data.load_corpus(config)
  assert again.metadata["cache"] == "miss"
  np.testing.assert_array_equal(first.train_tokens, again.train_tokens)
  for garbage in ('{"format": 1', '{"format": 1, "bounds": [0, 5], "names": []}'):
    with open(first.metadata["cache_path"][:-4] + ".json", "w") as handle:
      handle.write(garbage)
    again = data.load_corpus(config)
    assert again.metadata["cache"] == "miss"
    np.testing.assert_array_equal(first.train_tokens, again.train_tokens)
  (tmp_path / "a_file").write_bytes(b"x")
  blocked = _config(tmp_path, path=str(tmp_path / "docs"), seq_len=8, batch_size=1,
                    cache_dir=str(tmp_path / "a_file" / "cache"))
  loaded = data.load_corpus(blocked)
  assert loaded.metadata["cache"] == "unwritable"
  np.testing.assert_array_equal(first.train_tokens, loaded.train_tokens)


# ----------------------------------------------------------------------------- memmap


@pytest.mark.parametrize("name,dtype", [("t.npy", np.uint16), ("t.bin", np.uint16),
                                        ("t.bin", np.uint8), ("t.npy", np.int32)])
def test_memmap_source(tmp_path, name, dtype):
  tokens = (_random_tokens(5000, dtype=np.int64) % (256 if dtype == np.uint8 else 259)).astype(dtype)
  path = _write_tokens(tmp_path, tokens, name)
  config = _config(tmp_path, path=path, memmap_dtype=np.dtype(dtype).name if name.endswith(
      ".bin") else "uint16", seq_len=16, batch_size=4, val_fraction=0.1, num_val_batches=3)
  loaded = data.load_corpus(config)
  assert isinstance(loaded.train_tokens, np.memmap)  # not read into memory
  np.testing.assert_array_equal(loaded.train_tokens, tokens[:4500])
  np.testing.assert_array_equal(loaded.val_tokens, tokens[4500:])
  assert loaded.metadata["val"]["bytes"] == int((tokens[4500:] < 256).sum())
  batch = next(data.TrainBatches(loaded, config, 0, 1))
  assert batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == np.int32
  assert len(data.validation_batches(loaded, config, 0, 1)) == 3


# ----------------------------------------------------------------------------- bad inputs


def _bad_corpus_cases(tmp_path):
  (tmp_path / "empty_dir").mkdir()
  (tmp_path / "hidden_only").mkdir()
  (tmp_path / "hidden_only" / ".secret").write_bytes(b"text")
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_bytes(b"")
  (tmp_path / "binary").mkdir()
  (tmp_path / "binary" / "a.dat").write_bytes(b"\0\1\2" * 100)
  (tmp_path / "short.txt").write_bytes(b"too short")
  (tmp_path / "odd.bin").write_bytes(b"\1\0\2")
  (tmp_path / "zero.bin").write_bytes(b"")
  np.save(tmp_path / "zero.npy", np.zeros((0,), np.uint16))
  np.save(tmp_path / "big_id.npy", np.array([1, 2, 300, 4], np.uint16))
  np.save(tmp_path / "negative.npy", np.array([1, -2, 3], np.int32))
  np.save(tmp_path / "matrix.npy", np.zeros((4, 4), np.uint16))
  np.save(tmp_path / "floats.npy", np.zeros((40,), np.float32))
  np.array([5, 600], np.uint16).tofile(tmp_path / "big_id.bin")
  (tmp_path / "pickle.npy").write_bytes(b"not a numpy file at all")
  (tmp_path / "long.txt").write_bytes(b"x" * 2000)
  p = lambda name: str(tmp_path / name)
  return [
      (dict(path=p("missing.txt")), r"data.path=.*missing.txt' does not exist"),
      (dict(path=p("missing.bin")), r"missing.bin' does not exist; .* token file"),
      (dict(path=p("empty_dir")), r"holds no files"),
      (dict(path=p("hidden_only")), r"holds no files \(hidden ones are skipped\)"),
      (dict(path=p("blank")), r"no text in 1 file\(s\)"),
      (dict(path=p("binary")), r"no text in 1 file\(s\) \(1 binary"),
      (dict(path=p("short.txt"), seq_len=64), r"fewer than one example of data.seq_len \+ 1 = 65"),
      (dict(path=p("odd.bin")), r"3 bytes, not a whole number of data.memmap_dtype='uint16'"),
      (dict(path=p("zero.bin")), r"zero.bin' is empty"),
      (dict(path=p("zero.npy")), r"zero.npy' holds no tokens"),
      (dict(path=p("big_id.npy")), r"token id 300 outside the vocabulary \[0, 259\)"),
      (dict(path=p("big_id.bin")), r"token id 600 outside the vocabulary .* data.memmap_dtype"),
      (dict(path=p("negative.npy")), r"token id -2 outside the vocabulary"),
      (dict(path=p("matrix.npy")), r"shape \(4, 4\); a token file must be 1-D integers"),
      (dict(path=p("floats.npy")), r"float32 array .* must be 1-D integers"),
      (dict(path=p("pickle.npy")), r"not a readable .npy token array"),
      (dict(path=p("long.txt"), seq_len=16, batch_size=8, val_fraction=0.05, num_val_batches=1),
       r"validation split holds 100 tokens; one validation batch needs data.batch_size \* "
       r"\(data.seq_len \+ 1\) = 136"),
  ]


def test_bad_corpora_raise_before_any_work(tmp_path):
  for overrides, message in _bad_corpus_cases(tmp_path):
    overrides.setdefault("num_val_batches", 0)
    overrides.setdefault("seq_len", 4)
    overrides.setdefault("batch_size", 1)
    with pytest.raises(ValueError, match=message):
      data.load_corpus(_config(tmp_path, **overrides))


def test_path_with_home_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "notes.txt").write_bytes(b"some text " * 50)
  loaded = data.load_corpus(_config(tmp_path, path="~/notes.txt", seq_len=8, batch_size=1,
                                    num_val_batches=0))
  assert loaded.train_tokens.size + loaded.val_tokens.size == 501
