"""Corpora as token streams: the Python standard library, text files, pre-tokenized memmaps.

`load_corpus(config)` returns a `Corpus`: two 1-D token arrays (train, validation) and a
JSON-ready metadata dict saying exactly what was read (source, Python version, files,
tokens and bytes per split, a SHA-256 of the token stream).

Documents (stdlib, text): each file's bytes followed by EOS, files in sorted order of their
path relative to the root. A document is held out for validation when a stable hash of its
relative path (SHA-256, not Python's salted `hash`) falls below `val_fraction`, so adding a
file never moves another file between splits. When that leaves either split without a
document (e.g. a single file), the last `val_fraction` of the tokens is validation instead;
`metadata["split_rule"]` says which rule applied. Memmap files always use the token tail.

The standard-library corpus is: every `*.py`, `*.txt` and `*.rst` under
`sysconfig.get_paths()["stdlib"]`, skipping site-packages / dist-packages, byte-code
caches, build configuration (`config-*`) and the test suites (`test`, `tests`,
`idle_test` directories: they are mostly fixtures); plus the documentation of the
language reference that ships as `pydoc_data/topics.py`, one document per topic text
(instead of that file's Python-literal form). About 12 MB on CPython 3.11.

Tokenized document streams are cached under the cache dir as a uint16 `.npy` plus a JSON
manifest, keyed by the Python version and a fingerprint of the file list (relative path,
size, modification time), so a warm start reads one file instead of hundreds. Cache files
are written to a temporary name and moved into place with `os.replace`, so concurrent
processes and interrupted writes never leave a partial file under the final name.
"""

import ast
import dataclasses
import hashlib
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from typing import Any

import numpy as np

from sparseformer.train import tokenizer
from sparseformer.train.data_config import DataConfig

CACHE_FORMAT = 1  # bump when the cached stream layout changes
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests",
                  "idle_test"}
_STDLIB_SUFFIXES = (".py", ".txt", ".rst")
_TOPICS_FILE = "pydoc_data/topics.py"
_BINARY_PROBE_BYTES = 8000  # like git: a NUL byte in the head marks a binary file
_SCAN_CHUNK = 1 << 26  # elements per chunk when validating a memmap


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train and validation token streams of one source.

  train_tokens, val_tokens: 1-D integer arrays (uint16, or a read-only memmap of the file's
    dtype) of ids in [0, tokenizer.VOCAB_SIZE); documents end with EOS.
  metadata: JSON-serialisable description of what was read (see `load_corpus`).
  """

  train_tokens: np.ndarray
  val_tokens: np.ndarray
  metadata: dict[str, Any]


def stable_fraction(name: str) -> float:
  """A number in [0, 1) fixed by `name` alone (first 8 bytes of its SHA-256)."""
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def default_cache_dir() -> str:
  return os.environ.get("SPARSEFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "sparseformer")


# ----------------------------------------------------------------------------- file lists


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _walk_sorted(root: str, keep_dir, keep_file) -> list[str]:
  """Relative posix paths of the files under `root` accepted by the filters, sorted."""
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if keep_dir(d)]
    for name in files:
      if keep_file(name):
        full = os.path.join(directory, name)
        if os.path.isfile(full):
          found.append(os.path.relpath(full, root).replace(os.sep, "/"))
  return sorted(found)


def stdlib_files(root: str) -> list[str]:
  """The standard library files of the corpus, relative to `root`, sorted."""
  return _walk_sorted(
      root, keep_dir=lambda d: d not in _EXCLUDED_DIRS and not d.startswith("config-"),
      keep_file=lambda f: f.endswith(_STDLIB_SUFFIXES))


def text_files(path: str) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of a text file or of a directory's non-hidden files."""
  if os.path.isfile(path):
    return os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
  hidden = lambda name: name.startswith(".")
  return os.path.abspath(path), _walk_sorted(path, keep_dir=lambda d: not hidden(d),
                                             keep_file=lambda f: not hidden(f))


def _fingerprint(root: str, files: list[str], extra: dict) -> str:
  """SHA-256 over the file list with sizes and modification times (no file is read)."""
  entries = []
  for rel in files:
    stat = os.stat(os.path.join(root, rel))
    entries.append((rel, stat.st_size, stat.st_mtime_ns))
  payload = json.dumps({"format": CACHE_FORMAT, "root": root, "files": entries, **extra})
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- reading


def _topic_documents(source_bytes: bytes) -> list[tuple[str, bytes]] | None:
  """pydoc's topic texts as (name, text) documents, or None if the file has another shape."""
  try:
    module = ast.parse(source_bytes)
    for node in module.body:
      if (isinstance(node, ast.Assign) and len(node.targets) == 1 and
          isinstance(node.targets[0], ast.Name) and node.targets[0].id == "topics"):
        topics = ast.literal_eval(node.value)
        return [(f"{_TOPICS_FILE}:{key}", topics[key].encode("utf-8")) for key in sorted(topics)]
  except (SyntaxError, ValueError, AttributeError):
    pass
  return None


def _read_documents(root: str, files: list[str], *, stdlib: bool) -> tuple[list, list[str]]:
  """([(name, bytes)], skipped binary files). Empty files are no document."""
  documents, skipped = [], []
  for rel in files:
    with open(os.path.join(root, rel), "rb") as handle:
      data = handle.read()
    if stdlib and rel == _TOPICS_FILE:
      topics = _topic_documents(data)
      if topics is not None:
        documents.extend(topics)
        continue
    if not stdlib and b"\0" in data[:_BINARY_PROBE_BYTES]:
      skipped.append(rel)
      continue
    if data:
      documents.append((rel, data))
  return documents, skipped


def _token_stream(documents: list[tuple[str, bytes]]) -> tuple[np.ndarray, np.ndarray]:
  """(uint16 tokens: each document's bytes + EOS, int64 [num_docs + 1] document bounds)."""
  lengths = np.array([len(data) + 1 for _, data in documents], dtype=np.int64)
  bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.empty(int(bounds[-1]), dtype=np.uint16)
  for (_, data), start, stop in zip(documents, bounds[:-1], bounds[1:]):
    tokens[start:stop - 1] = np.frombuffer(data, dtype=np.uint8)
    tokens[stop - 1] = tokenizer.EOS_ID
  return tokens, bounds


# ----------------------------------------------------------------------------- cache


def _atomic_write(path: str, write) -> None:
  """Calls write(file object) on a temporary file beside `path`, then renames it to `path`."""
  directory = os.path.dirname(path)
  handle = tempfile.NamedTemporaryFile(dir=directory, prefix=os.path.basename(path) + ".",
                                       suffix=".tmp", delete=False)
  try:
    with handle:
      write(handle)
      handle.flush()
      os.fsync(handle.fileno())
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; the cache may be shared
    os.replace(handle.name, path)
  except BaseException:
    if os.path.exists(handle.name):
      os.remove(handle.name)
    raise


def _cache_paths(cache_dir: str, key: str) -> tuple[str, str]:
  return os.path.join(cache_dir, key + ".npy"), os.path.join(cache_dir, key + ".json")


def _load_cached(cache_dir: str, key: str):
  """(tokens, manifest) from the cache, or None when absent or unreadable."""
  tokens_path, manifest_path = _cache_paths(cache_dir, key)
  try:
    with open(manifest_path, encoding="utf-8") as handle:
      manifest = json.load(handle)
    tokens = np.load(tokens_path, allow_pickle=False)
    complete = (manifest["format"] == CACHE_FORMAT and tokens.dtype == np.uint16 and
                tokens.ndim == 1 and tokens.size == manifest["bounds"][-1] and
                len(manifest["bounds"]) == len(manifest["names"]) + 1)
  except (OSError, ValueError, EOFError, KeyError, IndexError, TypeError):
    return None
  return (tokens, manifest) if complete else None


def _save_cached(cache_dir: str, key: str, tokens: np.ndarray, manifest: dict) -> str | None:
  """Writes tokens then manifest (the manifest marks a complete entry); None if not writable."""
  tokens_path, manifest_path = _cache_paths(cache_dir, key)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_write(tokens_path, lambda handle: np.save(handle, tokens, allow_pickle=False))
    _atomic_write(manifest_path, lambda handle: handle.write(json.dumps(manifest).encode("utf-8")))
  except OSError as error:
    print(f"sparseformer.data: cannot write the corpus cache in {cache_dir} ({error}); "
          f"continuing without it (set data.cache_dir or $SPARSEFORMER_CACHE).", file=sys.stderr)
    return None
  return tokens_path


# ----------------------------------------------------------------------------- sources


def _document_corpus(config: DataConfig) -> tuple[np.ndarray, dict, dict]:
  """(token stream, manifest, load info) of a stdlib or text source, through the cache."""
  stdlib = config.resolved_source == "stdlib"
  if stdlib:
    root = stdlib_root()
    files = stdlib_files(root)
    extra = {"python": sys.version, "implementation": platform.python_implementation()}
    key_prefix = f"stdlib-py{platform.python_version()}"
  else:
    root, files = text_files(os.path.expanduser(config.path))
    extra = {}
    key_prefix = "text"
  if not files:
    raise ValueError(f"data.path={config.path!r} holds no files (hidden ones are skipped); "
                     f"point data.path at a text file or a directory of text files.")
  fingerprint = _fingerprint(root, files, extra)
  key = f"{key_prefix}-{fingerprint[:20]}"
  cache_dir = config.cache_dir or default_cache_dir()
  cached = _load_cached(cache_dir, key)
  if cached is not None:
    tokens, manifest = cached
    return tokens, manifest, {"cache": "hit", "cache_path": _cache_paths(cache_dir, key)[0]}

  documents, skipped = _read_documents(root, files, stdlib=stdlib)
  if not documents:
    raise ValueError(f"data.path={config.path!r}: no text in {len(files)} file(s) "
                     f"({len(skipped)} binary, the rest empty); point data.path at text files.")
  tokens, bounds = _token_stream(documents)
  manifest = {
      "format": CACHE_FORMAT,
      "root": root,
      "fingerprint": fingerprint,
      "num_files": len(files),
      "skipped_binary_files": skipped,
      "names": [name for name, _ in documents],
      "bounds": bounds.tolist(),
      "content_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
  }
  cache_path = _save_cached(cache_dir, key, tokens, manifest)
  return tokens, manifest, {"cache": "miss" if cache_path else "unwritable", "cache_path": cache_path}


def _split_documents(tokens: np.ndarray, manifest: dict, val_fraction: float):
  """(train, val, rule, train_docs, val_docs) by the stable path-hash rule (module docstring)."""
  bounds = np.asarray(manifest["bounds"], dtype=np.int64)
  num_docs = len(manifest["names"])
  held_out = np.array([stable_fraction(name) < val_fraction for name in manifest["names"]], bool)
  if 0 < held_out.sum() < num_docs:
    token_held_out = np.repeat(held_out, np.diff(bounds))
    return (tokens[~token_held_out], tokens[token_held_out], "document_hash",
            int(num_docs - held_out.sum()), int(held_out.sum()))
  train, val = _split_tail(tokens, val_fraction)
  return train, val, "token_tail", None, None


def _split_tail(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  num_val = int(round(tokens.size * val_fraction))
  if val_fraction > 0:
    num_val = max(num_val, 1)
  return tokens[:tokens.size - num_val], tokens[tokens.size - num_val:]


def _open_memmap(config: DataConfig) -> tuple[np.ndarray, dict]:
  """The token file as a read-only memmap, validated (ids in range, 1-D, integer)."""
  path = os.path.expanduser(config.path)  # `--set data.path=~/x` reaches us unexpanded
  if path.endswith(".npy"):
    try:
      tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
      raise ValueError(f"data.path={path!r} is not a readable .npy token array ({error}); "
                       f"write it with np.save(path, tokens.astype(np.uint16)).") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"data.path={path!r} holds a {tokens.dtype} array of shape {tokens.shape}; "
                       f"a token file must be 1-D integers: save tokens.reshape(-1).astype(np.uint16).")
  else:
    dtype = np.dtype(config.memmap_dtype)
    size = os.path.getsize(path)
    if size % dtype.itemsize:
      raise ValueError(f"data.path={path!r} has {size} bytes, not a whole number of "
                       f"data.memmap_dtype={config.memmap_dtype!r} elements; set data.memmap_dtype "
                       f"to the dtype the file was written with.")
    if size == 0:
      raise ValueError(f"data.path={path!r} is empty; point data.path at a token file with data.")
    tokens = np.memmap(path, dtype=dtype, mode="r")
  if tokens.size == 0:
    raise ValueError(f"data.path={path!r} holds no tokens; point data.path at a token file with data.")
  return tokens, {"file_dtype": str(tokens.dtype), "num_tokens": int(tokens.size)}


def _checked_special_count(tokens: np.ndarray, config: DataConfig) -> int:
  """Number of special ids in a memmap part; ValueError on an id outside the vocabulary."""
  if tokens.dtype == np.uint8:
    return 0  # every uint8 value is a byte id
  num_special = 0
  for start in range(0, tokens.size, _SCAN_CHUNK):
    chunk = np.asarray(tokens[start:start + _SCAN_CHUNK])
    low, high = int(chunk.min()), int(chunk.max())
    if low < 0 or high >= tokenizer.VOCAB_SIZE:
      raise ValueError(
          f"data.path={config.path!r} holds token id {low if low < 0 else high} outside the "
          f"vocabulary [0, {tokenizer.VOCAB_SIZE}) (file dtype {tokens.dtype}, "
          f"data.memmap_dtype={config.memmap_dtype!r}); set data.memmap_dtype to the dtype the "
          f"file was written with, and tokenize with sparseformer.train.tokenizer.")
    num_special += int(np.count_nonzero(chunk >= tokenizer.NUM_BYTES))
  return num_special


# ----------------------------------------------------------------------------- entry point


def load_corpus(config: DataConfig) -> Corpus:
  """Reads, tokenizes (through the cache) and splits the corpus that `config` names.

  Raises ValueError, before training starts, naming the data field to change, when the
  path is missing, holds no text, holds ids outside the vocabulary, when the training
  split is shorter than one example (`seq_len + 1` tokens) or when validation is asked for
  but its split is shorter than one validation batch.
  """
  started = time.perf_counter()
  source = config.resolved_source
  if source != "stdlib" and not os.path.exists(os.path.expanduser(config.path)):
    raise ValueError(f"data.path={config.path!r} does not exist; set data.path to an existing "
                     f"{'text file or directory' if source == 'text' else 'token file'}.")
  metadata: dict[str, Any] = {
      "source": source,
      "path": config.path if source != "stdlib" else stdlib_root(),
      "python_version": platform.python_version(),
      "python_implementation": platform.python_implementation(),
      "val_fraction": config.val_fraction,
  }
  if source == "memmap":
    tokens, info = _open_memmap(config)
    train, val = _split_tail(tokens, config.val_fraction)
    split_rule, train_docs, val_docs = "token_tail", None, None
    metadata.update(info)
    special_in = lambda part: _checked_special_count(part, config)
  else:
    tokens, manifest, info = _document_corpus(config)
    train, val, split_rule, train_docs, val_docs = _split_documents(tokens, manifest,
                                                                    config.val_fraction)
    metadata.update(info)
    metadata.update(
        num_files=manifest["num_files"], num_documents=len(manifest["names"]),
        skipped_binary_files=manifest["skipped_binary_files"], root=manifest["root"],
        fingerprint=manifest["fingerprint"], content_sha256=manifest["content_sha256"])
    special_in = lambda part: int(np.count_nonzero(part >= tokenizer.NUM_BYTES))
  for name, part, docs in (("train", train, train_docs), ("val", val, val_docs)):
    num_special = special_in(part)
    metadata[name] = {
        "tokens": int(part.size),
        "bytes": int(part.size) - num_special,
        "documents": docs,
    }
  metadata["split_rule"] = split_rule

  window = config.window_len
  if train.size < window:
    raise ValueError(f"The training split of {source} data holds {train.size} tokens, fewer than one "
                     f"example of data.seq_len + 1 = {window}; lower data.seq_len or use a larger "
                     f"corpus (data.path).")
  needed = config.batch_size * window
  if config.num_val_batches > 0 and val.size < needed:
    raise ValueError(f"The validation split holds {val.size} tokens; one validation batch needs "
                     f"data.batch_size * (data.seq_len + 1) = {needed}. Raise data.val_fraction, "
                     f"lower data.batch_size or data.seq_len, or set data.num_val_batches=0.")
  metadata["load_seconds"] = round(time.perf_counter() - started, 4)
  return Corpus(train_tokens=train, val_tokens=val, metadata=metadata)
