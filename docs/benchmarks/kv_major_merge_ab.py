"""kv_major's merge of the tile outputs into their rows: a scatter-add of the weighted tile slots (kv_major.py at
commit 1bdd3cb, an experiment not kept) against the committed gather of every slot's output to [B, T, Hl', S, R, D]
(the same code as commit 56bc25c), both loaded from git, inside one routed layer's fwd+bwd
(benchmarks/routed_attention.py's function), timed interleaved in one process (warm-up discarded, median of
REPEATS).

    python docs/benchmarks/kv_major_merge_ab.py 16384 dsa_block 3
"""
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import routed_attention as ra  # noqa: E402

from sparseformer.benchmarks.attention import _Timed, time_interleaved  # noqa: E402
from sparseformer.layers.attention.routed import kv_major  # noqa: E402


def load(commit: str):
  source = subprocess.run(["git", "show", f"{commit}:layers/attention/routed/kv_major.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
    handle.write(source)
  spec = importlib.util.spec_from_file_location(f"kv_major_{commit}", handle.name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  os.unlink(handle.name)
  return module


seq, kind, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
x, q, k, v, ct = ra.layer_inputs(seq)
committed = kv_major._forward
entries = []
for name, commit in (("scatter merge (1bdd3cb)", "1bdd3cb"), ("gather merge (56bc25c)", "56bc25c")):
  forward = load(commit)._forward
  kv_major._forward = forward
  params, _, fwd_bwd = ra._routed_functions(kind, seq)
  entries.append(_Timed(name, fwd_bwd, (params, x, q, k, v, ct)))
  kv_major._forward = committed
time_interleaved(entries, repeats)
for entry in entries:
  print(f"T={seq} {kind} {entry.name:26s} {statistics.median(entry.times) * 1e3:9.1f} ms "
        f"{[round(t * 1e3) for t in entry.times]} peak {(entry.peak_bytes or 0) / 2**20:7.0f} MB", flush=True)
