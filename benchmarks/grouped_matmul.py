"""Pallas grouped matmul (kernels/grouped_matmul) against a dense matmul of the same FLOPs, and one MoE layer
on dispatch="dropless_pallas" against the dense SwiGLU of equal active FLOPs (issue 16's GPU goals).

    python -m sparseformer.benchmarks.grouped_matmul --out docs/benchmarks/grouped_matmul.json   # GPU, defaults
    python -m sparseformer.benchmarks.grouped_matmul --smoke --out /tmp/gmm.json                  # CPU plumbing

Part 1, per E in --experts (top-k --top-k, --dtype): M = tokens * k rows in E groups drawn from a uniform
router (multinomial), lhs [M, D] x rhs [E, D, F]. gmm is timed beside `lhs @ w` with w [D, F] (the same
2 M D F FLOPs), forward and forward + backward (d lhs by gmm, d rhs by tgmm: 3x the FLOPs; dense: the same
three matmuls), in one process, their repetitions interleaved in alternating order after a discarded warm-up;
reported: TFLOP/s of each and the ratio of medians (goal: gmm >= 70 % of dense). First, per E, gmm's values
and gradients are checked against the per-group loop on the device (exit status 1 when out of tolerance).
Part 2: `benchmarks.moe.run_grid` (dense SwiGLU of hidden k * F vs the MoE layer, fwd + bwd, interleaved) for
dispatch dropless_pallas beside dropless_gather; goal: MoE <= 1.3 x dense.
With --smoke: tiny shapes in interpret mode (CPU plumbing check; its times mean nothing). --out must not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.benchmarks import moe as moe_bench
from sparseformer.kernels.grouped_matmul import gmm, gmm_reference

CHECK_TOL = 3e-2  # max error / max |reference| of the correctness check (bf16 inputs; f32 may run as TF32)

FULL = dict(experts=(8, 64), top_k=2, tokens=8192, d_model=2048, hidden=1408, repeats=10)
SMOKE = dict(experts=(4,), top_k=2, tokens=32, d_model=32, hidden=32, repeats=3)


def _interleaved_medians(fns: dict, args: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call of each jitted fn on its args: one discarded call each, then `repeats` rounds
  in alternating order."""
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for repeat in range(repeats):
    for name in (list(fns)[::-1] if repeat % 2 else list(fns)):
      start = time.perf_counter()
      jax.block_until_ready(fns[name](*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def group_sizes_uniform(rows: int, num_experts: int, seed: int = 0) -> np.ndarray:
  """Rows per expert under a uniform router: multinomial(rows, 1/E)."""
  return np.random.default_rng(seed).multinomial(rows, np.full(num_experts, 1.0 / num_experts)).astype(np.int32)


def matmul_rows(num_experts: int, *, top_k: int, tokens: int, d_model: int, hidden: int, repeats: int,
                dtype, interpret: bool | None) -> list[dict]:
  """Part 1 for one E: gmm vs dense matmul, forward and forward + backward."""
  rows = tokens * top_k
  keys = jax.random.split(jax.random.key(num_experts), 4)
  lhs = jax.random.normal(keys[0], (rows, d_model), dtype)
  rhs = (jax.random.normal(keys[1], (num_experts, d_model, hidden), jnp.float32) * d_model**-0.5).astype(dtype)
  dense_w = rhs[0]
  d_out = jax.random.normal(keys[2], (rows, hidden), dtype)
  sizes = jnp.asarray(group_sizes_uniform(rows, num_experts))
  grouped = lambda a, b, s: gmm(a, b, s, interpret=interpret)
  dense = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)

  def fwd_bwd(fn):
    def run(*args):
      out, vjp = jax.vjp(lambda a, b: fn(a, b, *args[2:]), args[0], args[1])
      return out, vjp(d_out)
    return jax.jit(run)

  fns = {"gmm_fwd": jax.jit(grouped), "dense_fwd": jax.jit(dense),
         "gmm_fwd_bwd": fwd_bwd(grouped), "dense_fwd_bwd": fwd_bwd(lambda a, b: dense(a, b))}
  args = {"gmm_fwd": (lhs, rhs, sizes), "dense_fwd": (lhs, dense_w),
          "gmm_fwd_bwd": (lhs, rhs, sizes), "dense_fwd_bwd": (lhs, dense_w)}
  medians = _interleaved_medians(fns, args, repeats)
  flops = 2 * rows * d_model * hidden
  out = []
  for mode, factor in (("fwd", 1), ("fwd_bwd", 3)):
    gmm_s, dense_s = medians[f"gmm_{mode}"], medians[f"dense_{mode}"]
    out.append(dict(experts=num_experts, top_k=top_k, mode=mode, rows=rows, d_model=d_model, hidden=hidden,
                    group_sizes_max_over_mean=float(np.max(sizes) / np.mean(sizes)),
                    gmm_ms=gmm_s * 1e3, dense_ms=dense_s * 1e3,
                    gmm_tflops=factor * flops / gmm_s / 1e12, dense_tflops=factor * flops / dense_s / 1e12,
                    gmm_fraction_of_dense=dense_s / gmm_s))
  return out


def correctness(num_experts: int, *, d_model: int, hidden: int, dtype, interpret: bool | None,
                rows: int = 1000) -> dict:
  """gmm's values and gradients against the per-group loop on `rows` rows (uneven groups, one empty, rows past
  the sum), compiled on the device the benchmark runs on."""
  keys = jax.random.split(jax.random.key(7), 3)
  lhs = jax.random.normal(keys[0], (rows, d_model), dtype)
  rhs = (jax.random.normal(keys[1], (num_experts, d_model, hidden), jnp.float32) * d_model**-0.5).astype(dtype)
  d_out = jax.random.normal(keys[2], (rows, hidden), dtype)
  sizes = group_sizes_uniform(rows - rows // 10, num_experts, seed=1)
  sizes[1] = 0
  sizes = jnp.asarray(sizes)

  def values_and_grads(fn):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
    return (out, *vjp(d_out))

  got = jax.jit(lambda: values_and_grads(lambda a, b, s: gmm(a, b, s, interpret=interpret)))()
  want = jax.jit(lambda: values_and_grads(gmm_reference))()
  errors = {}
  for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    errors[name] = float("nan") if np.isnan(g).any() else float(np.abs(g - w).max() / max(1.0, np.abs(w).max()))
  ok = all(e <= CHECK_TOL for e in errors.values())  # NaN compares False
  return dict(experts=num_experts, rows=rows, relative_errors=errors, ok=ok)


def to_markdown(report: dict) -> str:
  lines = [report["header"], "", "| E | k | pass | gmm ms | dense ms | gmm TFLOP/s | dense TFLOP/s | gmm / dense |",
           "|---|---|---|---|---|---|---|---|"]
  for r in report["matmul"]:
    lines.append(f"| {r['experts']} | {r['top_k']} | {r['mode']} | {r['gmm_ms']:.3f} | {r['dense_ms']:.3f} | "
                 f"{r['gmm_tflops']:.1f} | {r['dense_tflops']:.1f} | {r['gmm_fraction_of_dense']:.0%} |")
  lines += ["", "| E | k | dispatch | ms / step | x dense |", "|---|---|---|---|---|"]
  for r in report["layer"]:
    cells = f"{r['skipped']} | " if "skipped" in r else f"{r['seconds'] * 1e3:.2f} | {r['ratio_to_dense']:.2f} |"
    lines.append(f"| {r['experts']} | {r['top_k']} | {r['dispatch']} | {cells}")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="JSON report path (must not exist)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU plumbing)")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--experts", type=int, nargs="+", help="default: 8 64 (smoke: 4)")
  args = parser.parse_args(argv)
  if os.path.exists(args.out):
    parser.error(f"--out {args.out} exists; choose a new path (reports are never overwritten)")
  if not args.smoke and jax.default_backend() == "cpu":
    parser.error("the full benchmark needs a GPU or TPU (interpret mode on CPU times nothing); use --smoke")
  settings = dict(SMOKE if args.smoke else FULL)
  if args.experts:
    settings["experts"] = tuple(args.experts)
  dtype = jnp.dtype(args.dtype)
  interpret = True if args.smoke else None
  start = time.time()
  device = jax.devices()[0]
  header = (f"Grouped matmul vs dense, {args.dtype}, tokens {settings['tokens']} x top-{settings['top_k']}, "
            f"D={settings['d_model']}, F={settings['hidden']}, median of {settings['repeats']} interleaved repeats "
            f"after a discarded warm-up; {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
            f"{platform.node()}{' (smoke: interpret mode, times meaningless)' if args.smoke else ''}")
  print(header, flush=True)
  checks = [correctness(e, d_model=settings["d_model"], hidden=settings["hidden"], dtype=dtype,
                        interpret=interpret, rows=min(1000, settings["tokens"] * settings["top_k"]))
            for e in settings["experts"]]
  print(json.dumps(checks), flush=True)
  matmul = []
  for num_experts in settings["experts"]:
    matmul += matmul_rows(num_experts, top_k=settings["top_k"], tokens=settings["tokens"],
                          d_model=settings["d_model"], hidden=settings["hidden"], repeats=settings["repeats"],
                          dtype=dtype, interpret=interpret)
    print(json.dumps(matmul[-2:]), flush=True)
  layer = moe_bench.run_grid(list(settings["experts"]), [settings["top_k"]], ["dropless_pallas", "dropless_gather"],
                             tokens=settings["tokens"], d_model=settings["d_model"], hidden=settings["hidden"],
                             repeats=max(3, settings["repeats"] // 2), dtype=dtype, max_step_seconds=600.0)
  report = dict(header=header, command=" ".join(["python -m sparseformer.benchmarks.grouped_matmul", *(argv or
                sys.argv[1:])]), settings=settings, wall_s=time.time() - start, correctness=checks, matmul=matmul,
                layer=layer)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  print(to_markdown(report))
  if not all(c["ok"] for c in checks):
    print(f"FAILED: gmm differs from the reference by more than {CHECK_TOL} (relative): {checks}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
