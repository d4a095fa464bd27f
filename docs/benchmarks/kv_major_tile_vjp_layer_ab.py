"""One routed layer's fwd+bwd (benchmarks/routed_attention.py's function) with kv_major's tile gradient swapped,
timed interleaved in one process (warm-up discarded, median of REPEATS):

  tile        the committed code: `kv_major._tile_attention`'s custom VJP (no saved tile output)
  old         autodiff of the tile forward under jax.checkpoint (the code before 2026-12-04)
  flash       attend_kv_major(gradient="flash"): the whole call's VJP from the rows' final lse
  saved_out   the tile VJP saving the tile output, its row sum dO . O in a 2-step lax.map (keeps XLA CPU from
              fusing the reduction into the dP dot)

    python docs/benchmarks/kv_major_tile_vjp_layer_ab.py 16384 dsa_block 4 tile old flash saved_out
"""
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import routed_attention as ra  # noqa: E402

from sparseformer.benchmarks.attention import _Timed, time_interleaved  # noqa: E402
from sparseformer.layers.attention.routed import kv_major as km  # noqa: E402

seq, kind, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
x, q, k, v, ct = ra.layer_inputs(seq)


@jax.custom_vjp
def saved_out(q, k, v, mask):
  return km._tile_forward(q, k, v, mask)


def saved_out_fwd(q, k, v, mask):
  out, lse = km._tile_forward(q, k, v, mask)
  return (out, lse), (q, k, v, mask, out, lse)


def saved_out_bwd(residuals, cotangents):
  q, k, v, mask, out, lse = residuals
  d_out, d_lse = cotangents
  chunks = 2 if (d_out.size // d_out.shape[-1]) % 2 == 0 else 1
  flat = lambda x: x.reshape(chunks, -1, x.shape[-1])  # noqa: E731
  delta = jax.lax.map(lambda xs: jnp.sum(xs[0] * xs[1], -1), (flat(d_out), flat(out))).reshape(d_lse.shape) - d_lse
  visible = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask[:, :, None, :]
  dq, dk, dv = km._tile_grads(q, k, v, visible, lse, d_out, delta)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


saved_out.defvjp(saved_out_fwd, saved_out_bwd)
variants = {"tile": (km._tile_attention, "autodiff"), "old": (jax.checkpoint(km._tile_forward), "autodiff"),
            "flash": (km._tile_attention, "flash"), "saved_out": (saved_out, "autodiff")}
committed, attend = km._tile_attention, km.attend_kv_major
entries = []
for name in sys.argv[4:]:
  tile_fn, gradient = variants[name]
  km._tile_attention = tile_fn
  km.attend_kv_major = lambda *a, gradient=gradient, **kw: attend(*a, **{**kw, "gradient": gradient})
  params, _, fwd_bwd = ra._routed_functions(kind, seq)
  entries.append(_Timed(name, fwd_bwd, (params, x, q, k, v, ct)))
  km._tile_attention, km.attend_kv_major = committed, attend
time_interleaved(entries, repeats)
for entry in entries:
  print(f"T={seq} {kind} {entry.name:9s} {statistics.median(entry.times) * 1e3:9.1f} ms "
        f"{[round(t * 1e3) for t in entry.times]} peak {(entry.peak_bytes or 0) / 2**20:7.0f} MB", flush=True)
