"""Does glibc malloc on transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) speed up a CPU step?

XLA CPU allocates each call's multi-GB temporaries afresh (glibc serves them by mmap), so every call first-touches
its memory and pays a page fault per 4 KiB page. The setting must be in the environment before the process starts,
so this runs child processes, alternating the two settings ROUNDS times; each child compiles one layer's fwd+bwd
(benchmarks/routed_attention.py's function, or the dense path), discards a warm-up call and times CALLS calls.

    python docs/benchmarks/malloc_hugepages_probe.py 8192 dsa_block dense [--rounds 2] [--calls 3]
"""
import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import sys, time, jax
sys.path.insert(0, {bench!r})
import routed_attention as ra
seq, kind, calls = {seq}, {kind!r}, {calls}
x, q, k, v, ct = ra.layer_inputs(seq)
params, _, fwd_bwd = ra._dense_functions() if kind == "dense" else ra._routed_functions(kind, seq)
fn, args = jax.jit(fwd_bwd), (params, x, q, k, v, ct)
jax.block_until_ready(fn(*args))
for _ in range(calls):
  start = time.perf_counter(); jax.block_until_ready(fn(*args)); print(time.perf_counter() - start)
"""

parser = argparse.ArgumentParser()
parser.add_argument("seq", type=int)
parser.add_argument("kinds", nargs="+")
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--calls", type=int, default=3)
args = parser.parse_args()
bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
settings = {"default": None, "hugetlb=1": "glibc.malloc.hugetlb=1"}
times = {(kind, name): [] for kind in args.kinds for name in settings}
for _ in range(args.rounds):
  for kind in args.kinds:
    for name, tunable in settings.items():
      env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
      if tunable:
        env["GLIBC_TUNABLES"] = tunable
      code = CHILD.format(bench=bench, seq=args.seq, kind=kind, calls=args.calls)
      out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
      times[(kind, name)] += [float(line) for line in out.split()]
for kind in args.kinds:
  base = statistics.median(times[(kind, "default")])
  for name in settings:
    ts = times[(kind, name)]
    print(f"T={args.seq} {kind:10s} {name:10s} fwd+bwd median {statistics.median(ts) * 1e3:8.1f} ms "
          f"({statistics.median(ts) / base:4.2f}x default) calls {[round(t * 1e3) for t in ts]}")
