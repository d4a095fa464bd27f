"""kv_major's tile attention fwd+bwd alone, three gradients, timed interleaved in one process (warm-up discarded,
medians), with their gradients held equal first:

  checkpoint  autodiff of the tile forward under jax.checkpoint (the code before 2026-12-04)
  vjp         `kv_major._tile_attention`'s custom VJP (flash backward inside each tile, dk / dv as dot_general
              over the flattened rows)
  vjp_einsum  the same VJP with dk / dv written as the einsum "ntrk,ntrd->nkd" (what XLA CPU transposes)

    python docs/benchmarks/kv_major_tile_vjp_probe.py [--tiles 4352] [--repeats 3]

Shapes default to dsa_block's at T = 8192 (benchmarks/routed_attention.py settings: 4,352 tiles of 128 rows x
R = 4 query heads, 64-key blocks, D = 64, f32).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.layers.attention.routed import kv_major

parser = argparse.ArgumentParser()
parser.add_argument("--tiles", type=int, default=4352)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
n, tile, reps, dim, block = args.tiles, 128, 4, 64, 64
keys = jax.random.split(jax.random.key(0), 5)
q = jax.random.normal(keys[0], (n, tile, reps, dim)) / 8
k, v = (jax.random.normal(key, (n, block, dim)) for key in keys[1:3])
d_out, d_lse = jax.random.normal(keys[3], (n, tile, reps, dim)), jax.random.normal(keys[4], (n, tile, reps)) / 10


def einsum_backward(residuals, cotangents):
  q, k, v, mask, lse = residuals
  d_out, d_lse = cotangents
  scores = jnp.einsum("ntrd,nkd->ntrk", q, k)
  probs = jnp.exp(scores - lse[..., None])
  d_probs = jnp.einsum("ntrd,nkd->ntrk", d_out, v)
  d_scores = probs * (d_probs - (jnp.sum(probs * d_probs, axis=-1) - d_lse)[..., None])
  return (jnp.einsum("ntrk,nkd->ntrd", d_scores, k), jnp.einsum("ntrk,ntrd->nkd", d_scores, q),
          jnp.einsum("ntrk,ntrd->nkd", probs, d_out), None)


vjp_einsum = jax.custom_vjp(kv_major._tile_forward)
vjp_einsum.defvjp(kv_major._tile_attention_fwd, einsum_backward)
variants = {"checkpoint": jax.checkpoint(kv_major._tile_forward), "vjp": kv_major._tile_attention,
            "vjp_einsum": vjp_einsum}


def grads(attention):
  def loss(q, k, v):
    out, lse = attention(q, k, v, None)
    return jnp.sum(out * d_out) + jnp.sum(lse * d_lse)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


functions = {name: grads(attention) for name, attention in variants.items()}
results = {name: [np.asarray(g) for g in jax.block_until_ready(fn(q, k, v))] for name, fn in functions.items()}
for name in ("vjp", "vjp_einsum"):
  errors = [float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(results[name], results["checkpoint"])]
  assert all(np.isfinite(e) and e < 1e-4 for e in errors), (name, errors)
  print(f"{name}: max relative error of dq, dk, dv against checkpoint {max(errors):.1e}")
times = {name: [] for name in functions}
for _ in range(args.repeats):
  for name, fn in functions.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(q, k, v))
    times[name].append(time.perf_counter() - start)
base = statistics.median(times["checkpoint"])
for name, ts in times.items():
  print(f"{name:11s} fwd+bwd {statistics.median(ts) * 1e3:8.1f} ms  {statistics.median(ts) / base:5.2f}x checkpoint  "
        f"runs {[round(t * 1e3) for t in ts]}")
