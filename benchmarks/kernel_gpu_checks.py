#!/usr/bin/env python
"""The Pallas kernels compiled on a real GPU against `reference` on the edge cases of the CPU tests.

    python benchmarks/kernel_gpu_checks.py            # one GPU, ~1-2 min; exit code 1 on any failure
    python benchmarks/kernel_gpu_checks.py --interpret  # the same plumbing on CPU (interpret mode, ~1 min)

The CPU suite runs these cases in interpret mode only; `attention_gpu.py` checks the compiled
kernel on its four benchmark layouts at T = 4K. This script compiles what those miss: rows with
no visible key, per-head layout mixtures, MQA/GQA, sub-tiles smaller than the layout blocks,
padded rectangular shapes, both loop structures, the fused atomic-dQ backward, and a traced
(content-routed) layout through `attend(backend="pallas")`. Values and the three gradients,
errors relative to the largest reference value; NaN/inf is a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import types

if __package__ in (None, ""):  # run as a script from a bare checkout
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import attention_gpu  # noqa: E402,F401  (makes `import sparseformer` work)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparseformer.kernels.block_sparse_attention import BlockSizes, block_sparse_attention  # noqa: E402
from sparseformer.layers.attention import backends as sa, builders as lb, layouts  # noqa: E402

SUB_TILES = BlockSizes(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16, block_q_dkv=16,
                       block_kv_dkv=16)
SWAPPED_LOOPS = BlockSizes(separate_partial=True, separate_partial_bwd=False)
FUSED_DQ = BlockSizes(block_q_dkv=16, fused_dq=True)
TOL = {"float32": 5e-3, "bfloat16": 2.5e-2}  # f32: Triton dots run in TF32


def _masked_rows(seq: int = 160, block: int = 32):
  """Per-head mixture where query 0 (and whole query blocks of the far window) see no key."""
  far = lb.from_predicate(lb.Diagonal(40, 60), seq_q=seq, block_q=block, name="far(40,60)")
  near = lb.from_predicate(lb.Diagonal(1, 8), seq_q=seq, block_q=block, name="past(1,8)")
  return layouts.per_head([far, near, far, near])


# name: (layout, heads, kv_heads, head_dim, BlockSizes or None)
CASES = {
    "causal_gqa_subtiles": (lb.dense(256, block_q=32, causal=True), 4, 2, 64, SUB_TILES),
    "masked_rows_mixture": (_masked_rows(), 4, 2, 64, None),
    "masked_rows_swapped_loops": (_masked_rows(), 4, 2, 64, SWAPPED_LOOPS),
    "masked_rows_fused_dq": (_masked_rows(), 4, 1, 64, FUSED_DQ),
    "bigbird_per_head_mqa": (lb.bigbird(256, block_q=32, left=40, num_global=8,
                                        num_random_blocks=2, num_heads=4, seed=3), 4, 1, 128, None),
    "strided_noncausal_padded": (lb.strided(200, block_q=32, stride=24, causal=False, seq_kv=150),
                                 4, 2, 64, SUB_TILES),
    "local_d128_big_blocks": (lb.sliding_window(1024, block_q=128, left=300), 8, 2, 128, None),
}


def _inputs(layout, heads: int, kv_heads: int, dim: int, dtype, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (2, layout.seq_q, heads, dim)).astype(dtype)
  k = jax.random.normal(keys[1], (2, layout.seq_kv, kv_heads, dim)).astype(dtype)
  v = jax.random.normal(keys[2], (2, layout.seq_kv, kv_heads, dim)).astype(dtype)
  d_out = jax.random.normal(keys[3], q.shape, jnp.float32)
  return q, k, v, d_out


def _values_and_grads(attention, q, k, v, d_out, *extra):
  def run(q, k, v, d_out, *extra):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *extra), q, k, v)
    return (out, *vjp(d_out.astype(out.dtype)))
  return [np.asarray(x.astype(jnp.float32)) for x in jax.jit(run)(q, k, v, d_out, *extra)]


def _reference(layout, q, k, v, d_out):
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  with jax.default_matmul_precision("highest"):
    return _values_and_grads(lambda q, k, v: sa.reference_attention(q, k, v, layout),
                             f32(q), f32(k), f32(v), d_out)


def _worst(got, want) -> dict[str, float]:
  errors = {}
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    finite = np.isfinite(g).all() and not np.isnan(g).any()
    errors[name] = (float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-6)) if finite
                    else float("inf"))
  return errors


def kernel_case(layout, heads, kv_heads, dim, sizes, dtype, interpret):
  q, k, v, d_out = _inputs(layout, heads, kv_heads, dim, dtype)
  kernel = lambda q, k, v: block_sparse_attention(  # noqa: E731
      q, k, v, layout, block_sizes=sizes, platform="gpu", interpret=interpret)
  return _worst(_values_and_grads(kernel, q, k, v, d_out), _reference(layout, q, k, v, d_out))


def traced_case(dtype):
  """A layout whose lists are jit arguments (tracers), through `attend(backend="pallas")`."""
  layout = lb.bigbird(256, block_q=32, left=40, num_global=4, num_random_blocks=2, num_heads=4,
                      seed=5)
  q, k, v, d_out = _inputs(layout, 4, 2, 64, dtype)

  def attention(q, k, v, kv_index, kv_count, kv_mask_id, partial_masks):
    assert isinstance(kv_index, jax.core.Tracer)
    routed = types.SimpleNamespace(
        seq_q=layout.seq_q, seq_kv=layout.seq_kv, block_q=layout.block_q,
        block_kv=layout.block_kv, kv_index=kv_index, kv_count=kv_count, kv_mask_id=kv_mask_id,
        partial_masks=partial_masks)
    return sa.attend(q, k, v, routed, backend="pallas")  # interpret mode on CPU

  lists = [jnp.asarray(x) for x in (layout.kv_index, layout.kv_count, layout.kv_mask_id,
                                    layout.partial_masks)]
  got = _values_and_grads(attention, q, k, v, d_out, *lists)
  return _worst(got, _reference(layout, q, k, v, d_out))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--interpret", action="store_true", help="CPU plumbing run (not a check)")
  parser.add_argument("--only", default="", help="run the cases whose name contains this")
  args = parser.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  runs = [(name, dtype, lambda c=case, d=dtype: kernel_case(*c, d, args.interpret))
          for name, case in CASES.items() for dtype in (jnp.bfloat16, jnp.float32)]
  runs += [("traced_layout_attend", dtype, lambda d=dtype: traced_case(d))
           for dtype in (jnp.bfloat16, jnp.float32)]
  runs = [r for r in runs if args.only in r[0]]
  failures = 0
  for name, dtype, run in runs:
    dtype_name = jnp.dtype(dtype).name
    try:
      errors = run()
      ok = max(errors.values()) <= TOL[dtype_name]
      print(f"[{'ok' if ok else 'FAIL':4s}] {name:28s} {dtype_name:8s} "
            + "  ".join(f"{k}={v:.2e}" for k, v in errors.items()), flush=True)
    except Exception as exc:  # noqa: BLE001 -- report every case
      ok = False
      print(f"[FAIL] {name:28s} {dtype_name:8s} {type(exc).__name__}: {exc}"[:600], flush=True)
      traceback.print_exc()
    failures += not ok
  print(f"{len(runs) - failures}/{len(runs)} cases within tolerance "
        f"(relative to max |reference|: {TOL})")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
