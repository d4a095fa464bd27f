"""dsa_block's layer fwd+bwd (benchmarks/routed_attention.py's function) with its parts switched off, timed
interleaved in one process; --with-dense adds the dense entries the benchmark times beside it.

    python docs/benchmarks/dsa_block_layer_probe.py 8192 [--with-dense]
"""
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
import routed_attention as ra  # noqa: E402

from sparseformer.benchmarks.attention import _Timed, time_interleaved  # noqa: E402
from sparseformer.layers.attention.routed import dsa_tile_kl, kv_major  # noqa: E402

seq = int(sys.argv[1])
x, q, k, v, ct = ra.layer_inputs(seq)
orig_kl, orig_attend = dsa_tile_kl.block_indexer_kl, kv_major.attend_kv_major
no_kl = lambda q, k, f, *a, **kw: 0.0 * jnp.sum(f.k[0, 0, 0])  # noqa: E731
entries = []
if "--with-dense" in sys.argv:
  _, dense_fwd, dense_fwd_bwd = ra._dense_functions()
  entries += [_Timed("dense fwd", dense_fwd, ({}, x, q, k, v, ct)),
              _Timed("dense fwd+bwd", dense_fwd_bwd, ({}, x, q, k, v, ct))]
for name, kl, gradient in [("as committed (autodiff, tile KL)", None, None), ("KL -> 0", no_kl, None),
                           ("flash attention VJP", None, "flash"), ("flash, KL -> 0", no_kl, "flash")]:
  if kl:
    dsa_tile_kl.block_indexer_kl = kl
  if gradient:
    kv_major.attend_kv_major = lambda *a, gradient=gradient, **kw: orig_attend(*a, **{**kw, "gradient": gradient})
  params, _, fwd_bwd = ra._routed_functions("dsa_block", seq)
  entries.append(_Timed(name, fwd_bwd, (params, x, q, k, v, ct)))
  dsa_tile_kl.block_indexer_kl, kv_major.attend_kv_major = orig_kl, orig_attend
time_interleaved(entries, 3)
for entry in entries:
  print(f"T={seq} {entry.name:34s} {statistics.median(entry.times) * 1e3:9.1f} ms  "
        f"peak {(entry.peak_bytes or 0) / 2**20:7.0f} MB")
