"""NSA layer fwd+bwd with its selected branch on autodiff (committed) vs the flash VJP, dense beside it.

    python docs/benchmarks/nsa_flash_probe.py 16384
"""
import statistics, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "benchmarks")
import routed_attention as ra
from sparseformer.benchmarks.attention import _Timed, time_interleaved
from sparseformer.layers.attention.routed import kv_major
seq = int(sys.argv[1])
x, q, k, v, ct = ra.layer_inputs(seq)
orig = kv_major.attend_kv_major
entries = []
_, dfwd, dfb = ra._dense_functions()
entries.append(_Timed("dense fwd+bwd", dfb, ({}, x, q, k, v, ct)))
for name, gradient in (("nsa autodiff (committed)", None), ("nsa flash", "flash")):
  if gradient: kv_major.attend_kv_major = lambda *a, **kw: orig(*a, **{**kw, "gradient": gradient})
  params, _, fb = ra._routed_functions("nsa", seq)
  entries.append(_Timed(name, fb, (params, x, q, k, v, ct)))
  kv_major.attend_kv_major = orig
time_interleaved(entries, 3)
for e in entries: print(f"T={seq} {e.name:26s} {statistics.median(e.times)*1e3:9.1f} ms peak {(e.peak_bytes or 0)/2**20:.0f} MB")
