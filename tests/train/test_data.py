"""Tests for train/data_config.py and train/data.py: config validation, batch order,
resume, process sharding and global arrays."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparseformer.train import data, tokenizer
from sparseformer.train.data_config import DataConfig


from data_helpers import make_config as _config  # noqa: E402
from data_helpers import random_tokens as _random_tokens  # noqa: E402
from data_helpers import write_tokens as _write_tokens  # noqa: E402


def _small_corpus(tmp_path, num_tokens=1000, seq_len=7, batch_size=4, seed=0, **overrides):
  """A memmap corpus of random ids: 900 training tokens (of 1000), no validation batches."""
  path = _write_tokens(tmp_path, _random_tokens(num_tokens, seed=123), f"small{num_tokens}.npy")
  config = _config(tmp_path, path=path, seq_len=seq_len, batch_size=batch_size, seed=seed,
                   val_fraction=0.1, num_val_batches=0, **overrides)
  return data.load_corpus(config), config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(left, right):
  assert len(left) == len(right)
  for a, b in zip(left, right):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------- config and bad inputs


@pytest.mark.parametrize("overrides,message", [
    (dict(source="web"), r"data.source='web' is not one of"),
    (dict(source="stdlib", path="x.txt"), r"data.source='stdlib' .* takes no path"),
    (dict(source="text"), r"data.source='text' needs a file: set data.path"),
    (dict(source="memmap", path="tokens.dat"), r"must be a `.bin`"),
    (dict(memmap_dtype="int64"), r"data.memmap_dtype='int64' is not supported"),
    (dict(seq_len=0), r"data.seq_len=0 must be a positive integer"),
    (dict(batch_size=-2), r"data.batch_size=-2 must be a positive integer"),
    (dict(seed=-1), r"data.seed=-1 must be a non-negative"),
    (dict(val_fraction=1.0), r"data.val_fraction=1.0 must be in \[0, 1\)"),
    (dict(num_val_batches=-1), r"data.num_val_batches=-1 must be"),
    (dict(val_fraction=0.0), r"data.val_fraction=0 .* set data.num_val_batches=0"),
])
def test_bad_config_is_rejected_at_construction(overrides, message):
  with pytest.raises(ValueError, match=message):
    DataConfig(**overrides)


def test_auto_source_resolution():
  assert DataConfig().resolved_source == "stdlib"
  assert DataConfig(path="a/b.bin").resolved_source == "memmap"
  assert DataConfig(path="a/b.npy").resolved_source == "memmap"
  assert DataConfig(path="a/notes").resolved_source == "text"


def test_batch_size_must_divide_over_processes(tmp_path):
  loaded, config = _small_corpus(tmp_path, batch_size=6)
  with pytest.raises(ValueError, match=r"data.batch_size=6 must be divisible by .* 4"):
    data.TrainBatches(loaded, config, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"data.batch_size=6 must be divisible"):
    data.validation_batches(loaded, config, process_index=1, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    data.TrainBatches(loaded, config, process_index=2, process_count=2)


# ----------------------------------------------------------------------------- iterator


def test_batches_are_shifted_windows_of_the_stream(tmp_path):
  loaded, config = _small_corpus(tmp_path, num_tokens=1000, seq_len=7, batch_size=5)
  iterator = data.TrainBatches(loaded, config, 0, 1)
  stream = np.asarray(loaded.train_tokens).astype(np.int64)
  for step in range(40):  # several epochs (111 windows each)
    starts = iterator.window_starts(np.arange(step * 5, step * 5 + 5))
    batch = next(iterator)
    for row, start in enumerate(starts):
      np.testing.assert_array_equal(batch["inputs"][row], stream[start:start + 7])
      np.testing.assert_array_equal(batch["targets"][row], stream[start + 1:start + 8])


def test_each_epoch_is_a_permutation_of_non_overlapping_windows(tmp_path):
  loaded, config = _small_corpus(tmp_path, num_tokens=1000, seq_len=7)
  iterator = data.TrainBatches(loaded, config, 0, 1)
  windows = iterator.windows_per_epoch
  assert windows == (900 - 8 + 1) // 8
  offsets = set()
  for epoch in range(12):
    starts = iterator.window_starts(np.arange(epoch * windows, (epoch + 1) * windows))
    offset = int(starts.min())
    offsets.add(offset)
    assert 0 <= offset <= 7 and starts.max() + 8 <= 900
    np.testing.assert_array_equal(np.sort(starts), offset + 8 * np.arange(windows))
    assert not np.array_equal(starts, np.sort(starts))  # shuffled
  assert len(offsets) > 3  # the offset moves between epochs


def test_order_is_a_function_of_the_seed(tmp_path):
  loaded, config = _small_corpus(tmp_path)
  first = _take(data.TrainBatches(loaded, config, 0, 1), 5)
  _assert_batches_equal(first, _take(data.TrainBatches(loaded, config, 0, 1), 5))
  other = _take(data.TrainBatches(loaded, dataclasses.replace(config, seed=1), 0, 1), 5)
  assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 60), st.integers(1, 20), st.sampled_from([1, 2, 4, 8]),
       st.integers(0, 2**31))
def test_resume_yields_the_uninterrupted_batches(tmp_path_factory, before, after, batch_size,
                                                 seed):
  tmp_path = tmp_path_factory.mktemp("resume")
  loaded, config = _small_corpus(tmp_path, num_tokens=600, seq_len=7, batch_size=batch_size,
                                 seed=seed)
  uninterrupted = _take(data.TrainBatches(loaded, config, 0, 1), before + after)
  interrupted = data.TrainBatches(loaded, config, 0, 1)
  _take(interrupted, before)
  state = json.loads(json.dumps(interrupted.get_state()))
  resumed = data.TrainBatches(loaded, config, 0, 1)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, after), uninterrupted[before:])


def test_resume_with_a_new_batch_size_continues_at_the_next_example(tmp_path):
  loaded, config = _small_corpus(tmp_path, batch_size=4)
  reference = np.concatenate([b["inputs"] for b in _take(data.TrainBatches(loaded, config), 12)])
  first = data.TrainBatches(loaded, config)
  _take(first, 3)
  resumed = data.TrainBatches(loaded, dataclasses.replace(config, batch_size=6))
  resumed.set_state(first.get_state())
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in _take(resumed, 6)]),
                                reference[12:48])


def test_set_state_rejects_another_data_order(tmp_path):
  loaded, config = _small_corpus(tmp_path)
  state = data.TrainBatches(loaded, config).get_state()
  other_seed = data.TrainBatches(loaded, dataclasses.replace(config, seed=5))
  with pytest.raises(ValueError, match=r"checkpoint has seed=0 but this run has 5; restore data.seed"):
    other_seed.set_state(state)
  other_corpus, other_config = _small_corpus(tmp_path, num_tokens=1200)
  with pytest.raises(ValueError, match=r"train_tokens=900 but this run has 1080"):
    data.TrainBatches(other_corpus, other_config).set_state(state)
  with pytest.raises(ValueError, match=r"not written by TrainBatches.get_state"):
    data.TrainBatches(loaded, config).set_state({"step": 3})


@pytest.mark.parametrize("num_tokens", [8, 9, 15])
def test_tiny_corpus_with_one_window(tmp_path, num_tokens):
  tokens = _random_tokens(num_tokens)
  config = _config(tmp_path, path=_write_tokens(tmp_path, tokens), seq_len=7, batch_size=3,
                   val_fraction=0.0, num_val_batches=0)
  loaded = data.load_corpus(config)
  iterator = data.TrainBatches(loaded, config, 0, 1)
  assert iterator.windows_per_epoch == 1
  for batch in _take(iterator, 4):  # each batch spans three epochs
    for row in batch["inputs"]:
      start = int(np.flatnonzero([np.array_equal(row, tokens[s:s + 7]) for s in range(
          num_tokens - 7)])[0])
      assert start <= num_tokens - 8


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_together_build_the_global_batch(tmp_path, process_count):
  loaded, config = _small_corpus(tmp_path, batch_size=8)
  single = _take(data.TrainBatches(loaded, config, 0, 1), 30)
  shards = [_take(data.TrainBatches(loaded, config, p, process_count), 30)
            for p in range(process_count)]
  for step, batch in enumerate(single):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(
          np.concatenate([shards[p][step][key] for p in range(process_count)]), batch[key])


def test_validation_batches_are_the_first_windows_and_split_over_processes(tmp_path):
  tokens = _random_tokens(4000)
  config = _config(tmp_path, path=_write_tokens(tmp_path, tokens), seq_len=9, batch_size=4,
                   val_fraction=0.25, num_val_batches=100)
  loaded = data.load_corpus(config)
  batches = data.validation_batches(loaded, config, 0, 1)
  assert len(batches) == 1000 // (10 * 4)  # fewer than asked: only full batches
  windows = tokens[3000:3000 + len(batches) * 40].reshape(-1, 10)
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches]), windows[:, :-1])
  np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches]), windows[:, 1:])
  halves = [data.validation_batches(loaded, config, p, 2) for p in range(2)]
  for step, batch in enumerate(batches):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step]["inputs"], halves[1][step]["inputs"]]), batch["inputs"])
  assert data.validation_batches(loaded, dataclasses.replace(config, num_val_batches=0)) == []


# ----------------------------------------------------------------------------- global arrays


def test_to_global_batch_single_device(tmp_path):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  loaded, config = _small_corpus(tmp_path, batch_size=4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data", None))
  assert data.local_batch_shard(sharding, config) == (0, 1)
  batch = next(data.TrainBatches(loaded, config))
  arrays = data.to_global_batch(batch, sharding)
  assert set(batch) == {"inputs", "targets", "loss_mask"}
  for key in batch:
    want_dtype = np.float32 if key == "loss_mask" else np.int32
    assert arrays[key].sharding == sharding and arrays[key].dtype == want_dtype
    np.testing.assert_array_equal(np.asarray(arrays[key]), batch[key])


_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sparseformer.train import data
    process_id, port, path, cache = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    config = data.DataConfig(path=path, seq_len=5, batch_size=8, val_fraction=0.2,
                             num_val_batches=2, cache_dir=cache)
    corpus = data.load_corpus(config)
    reference = data.TrainBatches(corpus, config, 0, 1)
    reference_batches = [next(reference) for _ in range(3)]
    reference_batches += data.validation_batches(corpus, config, 0, 1)
    devices = np.array(jax.devices())  # process-major: 0, 1 on process 0
    cases = {  # batch split over processes / replicated over processes
        "data=4": (NamedSharding(jax.sharding.Mesh(devices, ("data",)), P("data", None)),
                   (process_id, 2)),
        "hosts x data": (NamedSharding(jax.sharding.Mesh(devices.reshape(2, 2), ("tensor", "data")),
                                       P("data", None)), (0, 1)),
    }
    for name, (sharding, expected) in cases.items():
      shard = data.local_batch_shard(sharding, config)
      assert shard == expected, (name, shard, expected)
      iterator = data.TrainBatches(corpus, config, *shard)
      local = [next(iterator) for _ in range(3)] + data.validation_batches(corpus, config, *shard)
      for batch, want in zip(local, reference_batches):
        arrays = data.to_global_batch(batch, sharding)
        for key, array in arrays.items():
          assert array.shape == (8, 5), (name, array.shape)
          for piece in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(piece.data), want[key][piece.index])
    print("WORKER_OK", process_id, flush=True)
    jax.distributed.shutdown()
""")


def test_two_processes_assemble_global_arrays(tmp_path):
  """Two jax.distributed CPU processes: each builds its rows, the global arrays match."""
  path = _write_tokens(tmp_path, _random_tokens(3000))
  data.load_corpus(_config(tmp_path, path=path, seq_len=5, batch_size=8, val_fraction=0.2))
  (tmp_path / "worker.py").write_text(_WORKER)
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(p), str(port), path,
                               str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for p in range(2)]
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=120)[0])
    finally:
      worker.kill()
  for p, (worker, output) in enumerate(zip(workers, outputs)):
    assert worker.returncode == 0 and f"WORKER_OK {p}" in output, output[-3000:]
