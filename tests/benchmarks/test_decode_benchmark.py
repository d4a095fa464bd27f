"""benchmarks/decode.py plumbing: KV bytes per token from the kinds' definitions, and a tiny end-to-end run whose
rows are complete and whose ratios are the medians' (slow: run with `pytest -m slow tests/benchmarks`)."""

import numpy as np
import pytest

from sparseformer.benchmarks import decode as bench
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models import presets

TINY = dict(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1)


def test_kv_bytes_read_per_token():
  config = presets.get("quickstart", max_seq_len=4096)  # 4 layers, 2 KV heads of 64, f32
  assert bench.kv_bytes_per_token(config, 4096) == 4 * 2 * 2 * 64 * 4 * 4096
  local = presets.get("quickstart", max_seq_len=4096, attention_pattern=("local",),
                      attention=SparseAttentionConfig(window=256))
  assert bench.kv_bytes_per_token(config, 4096) / bench.kv_bytes_per_token(local, 4096) == 16
  assert bench.kv_bytes_per_token(local, 100) == bench.kv_bytes_per_token(config, 100)  # window > context
  mixed = presets.get("quickstart", max_seq_len=4096, attention_pattern=("local", "global"),
                      attention=SparseAttentionConfig(window=256))
  assert bench.kv_bytes_per_token(mixed, 4096) == (bench.kv_bytes_per_token(config, 4096)
                                                   + bench.kv_bytes_per_token(local, 4096)) / 2
  with pytest.raises(ValueError, match="bigbird"):
    bench.kv_bytes_per_token(presets.get("quickstart", attention_pattern=("bigbird",)), 256)


@pytest.mark.slow
def test_tiny_run_fills_every_row_and_table():
  record = {"cached_vs_recompute": bench.cached_vs_recompute([48], repeats=3, base="quickstart", log=lambda *_: None,
                                                             **TINY),
            "sparse_vs_global": bench.sparse_vs_global(64, ("local",), window=16, repeats=3, base="quickstart",
                                                       log=lambda *_: None, **TINY)}
  [row] = record["cached_vs_recompute"]
  assert row["runs"] == 3 and row["speedup"] == pytest.approx(row["recompute_seconds"] / row["cached_seconds"])
  assert np.isfinite(row["cached_tokens_per_s"]) and row["cache_mb"] > 0
  local, = [row for row in record["sparse_vs_global"] if row["kind"] == "local"]
  assert local["bound"] == 4.0 and local["of_bound"] == pytest.approx(local["speedup"] / 4.0)
  table = bench.tables(record)
  assert "| 48 |" in table and "| local | 64 |" in table
