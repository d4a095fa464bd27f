"""Per-op times of one routed layer's fwd+bwd (benchmarks/routed_attention.py's function) from a jax.profiler trace,
the largest first, with the compiled HLO written beside the trace to look the ops up. Needs `pip install xprof`
(not a sparseformer dependency). Caveat (docs/benchmarks.md, 2026-12-04): an op's time includes the page faults
of the buffers it touches first.

    python docs/benchmarks/profile_routed_layer.py 16384 dsa_block [--gradient flash] [--top 30]
"""
import argparse
import collections
import glob
import json
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import routed_attention as ra  # noqa: E402

from sparseformer.layers.attention.routed import kv_major  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("seq", type=int)
parser.add_argument("kind")
parser.add_argument("--gradient", choices=("autodiff", "flash"), help="force attend_kv_major's gradient")
parser.add_argument("--top", type=int, default=30)
parser.add_argument("--out", default="/tmp/sparseformer_profile")
args = parser.parse_args()
from xprof.convert import raw_to_tool_data  # noqa: E402  (fail early: before the slow compile)

if args.gradient:
  attend = kv_major.attend_kv_major
  kv_major.attend_kv_major = lambda *a, **kw: attend(*a, **{**kw, "gradient": args.gradient})
x, q, k, v, ct = ra.layer_inputs(args.seq)
params, _, fwd_bwd = ra._routed_functions(args.kind, args.seq)
fn, inputs = jax.jit(fwd_bwd), (params, x, q, k, v, ct)
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "hlo.txt"), "w") as handle:
  handle.write(fn.lower(*inputs).compile().as_text())
jax.block_until_ready(fn(*inputs))  # warm-up
with jax.profiler.trace(args.out):
  jax.block_until_ready(fn(*inputs))
path = max(glob.glob(os.path.join(args.out, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
events = json.loads(data.decode() if isinstance(data, bytes) else data)["traceEvents"]
total, count = collections.Counter(), collections.Counter()
for event in events:
  if event.get("ph") == "X" and "hlo_op" in event.get("args", {}):
    total[event["name"]] += event["dur"]
    count[event["name"]] += 1
for name, micros in total.most_common(args.top):
  print(f"{micros / 1e3:9.1f} ms  x{count[name]:<5d} {name}")
print(f"HLO: {os.path.join(args.out, 'hlo.txt')} (grep '%NAME = ' for an op's shapes and metadata)")
