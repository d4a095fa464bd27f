#!/usr/bin/env python
"""Per-kernel tile tuning of the GPU block-sparse attention kernels (forward, dQ, dK/dV).

    python benchmarks/attention_gpu_tune.py --out DIR --budget-s 170   # one GPU, ~3.5 min -> DIR/attention_gpu_tune.json
    # then, in the same device call: the benchmark with the winning tiles
    python benchmarks/attention_gpu.py --out DIR --no-sweep --block-sizes DIR/best_block_sizes.json

Times each kernel on its own (forward, the dQ kernel, the split dK/dV kernel, and the fused
dK/dV kernel that also accumulates dQ with atomic adds) for every candidate of `FWD`, `DQ`, `DKV`
and `FUSED` at T = 16K, dense causal layout (batch = 32K / T, H = 16, D = 128, bf16), picks the
fastest of each, then times whole forward+backward programs at T = 32K (dense causal and local
2K) for the old defaults, the best split backward and the best fused backward, beside
cuDNN dense causal in the same process, and checks the winners against `reference` at T = 4K
(causal, and local 1K with GQA). The first two candidates of each kernel are the A/B of the
FULL-first split loops (`BlockSizes.separate_partial` for the forward, `separate_partial_bwd`
for dQ and dK/dV, one flag for both: False in the combo if either winner had it False).
The CPU tests lower every candidate here for ("cuda",) (tests/kernels/test_cross_lowering.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script from a bare checkout
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import attention_gpu as bench  # noqa: E402  (makes `import sparseformer` work)
else:
  from sparseformer.benchmarks import attention_gpu as bench

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sparseformer.kernels.block_sparse_attention import BlockSizes, common, gpu, tiles as tiles_lib  # noqa: E402

CFG = bench.FULL
TUNE_SEQ = 16384
FINAL_CASES = ((32768, ("causal", "local_2k")),)  # (T, layouts) of totals
TUNE_SHARE = 0.6  # of --budget-s for the per-kernel candidates; the totals get the rest
# (tq, tk, warps, stages[, split loops]) per kernel; the 5th element sets `separate_partial` of
# the forward or `separate_partial_bwd` of dQ / dK/dV (omitted: the default, forward one
# branching loop, backward FULL-first split loops). The first two entries of each kernel are the
# A/B of the split loops at the default tiles.
FWD = [(128, 128, 8, 3), (128, 128, 8, 3, True), (128, 128, 8, 2), (128, 128, 8, 2, True),
       (128, 128, 8, 4)]
DQ = [(64, 64, 4, 2), (64, 64, 4, 2, False), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
      (128, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 4, 5)]
DKV = [(64, 64, 4, 2), (64, 64, 4, 2, False), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 2),
       (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 5)]
# (128, 32, 4, 5) / (32, 128, 4, 5): the Triton tutorial's Hopper backward (BLOCK_M2/N2, M1/N1).
FUSED = [(64, 64, 4, 2), (64, 128, 8, 2)]
# The defaults before the split loops (one branching loop everywhere, forward 2 stages).
OLD_DEFAULTS = BlockSizes(num_stages=2, block_q_dq=64, block_kv_dq=64, block_q_dkv=64,
                          block_kv_dkv=64, num_warps_bwd=4, num_stages_bwd=2, fused_dq=False,
                          separate_partial=False, separate_partial_bwd=False)


def _split(c) -> bool | None:
  """The candidate's loop structure: its 5th element, None (the default) when absent."""
  return c[4] if len(c) > 4 else None


def fwd_sizes(c) -> BlockSizes:
  return BlockSizes(block_q=c[0], block_kv=c[1], num_warps=c[2], num_stages=c[3],
                    separate_partial=_split(c))


def dq_sizes(c) -> BlockSizes:
  return BlockSizes(block_q_dq=c[0], block_kv_dq=c[1], num_warps_dq=c[2], num_stages_dq=c[3],
                    separate_partial_bwd=_split(c))


def dkv_sizes(c, fused: bool) -> BlockSizes:
  return BlockSizes(block_q_dkv=c[0], block_kv_dkv=c[1], num_warps_bwd=c[2], num_stages_bwd=c[3],
                    fused_dq=fused, separate_partial_bwd=_split(c))


def merge(*sizes: BlockSizes) -> BlockSizes:
  """Later BlockSizes override the non-default fields of earlier ones."""
  out, default = {}, dataclasses.asdict(BlockSizes())
  for s in sizes:
    out.update({k: v for k, v in dataclasses.asdict(s).items() if v != default[k]})
  return BlockSizes(**out)


def all_candidates() -> list[BlockSizes]:
  """Every BlockSizes this script runs (the cross-lowering test lowers each for cuda)."""
  return ([fwd_sizes(c) for c in FWD] + [dq_sizes(c) for c in DQ]
          + [dkv_sizes(c, False) for c in DKV] + [dkv_sizes(c, True) for c in FUSED])


def kernel_programs(layout, sizes: BlockSizes, seq: int):
  """jitted (forward, dq, dkv) kernel programs on the padded arrays of this layout."""
  arrays, meta = common.layout_to_arrays(layout, CFG.heads)
  tiles = tiles_lib.resolve_tiles(sizes, layout_block_q=meta.block_q, layout_block_kv=meta.block_kv,
                               head_dim=CFG.head_dim, platform="gpu", interpret=CFG.interpret)
  scale = CFG.head_dim ** -0.5
  fwd = jax.jit(lambda q, k, v: gpu.forward(q, k, v, arrays, meta, tiles, scale, CFG.interpret))
  bwd = lambda call: jax.jit(lambda q, k, v, do, lse2, delta: call(
      q, k, v, do, lse2, delta, arrays, meta, tiles, scale, CFG.interpret))
  return fwd, bwd(gpu.dq_call), bwd(gpu.dkv_call)


def tune(budget: bench.Budget, report: dict) -> dict:
  seq = TUNE_SEQ
  layout = bench.make_layout(CFG, "causal", seq)
  batch = bench.batch_for(CFG, seq)
  q, k, v, do = bench.inputs(seq, batch, CFG.heads, CFG.heads, CFG.head_dim, CFG.dtype)
  fwd, _, _ = kernel_programs(layout, BlockSizes(), seq)
  out, lse = fwd(q, k, v)
  lse2 = common.lse_to_base2(lse)
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), out.astype(jnp.float32))
  flops_fwd = 4.0 * batch * bench.visited_pairs(layout, CFG.heads) * CFG.head_dim
  best = {}
  bwd_args = (q, k, v, do, lse2, delta)
  fwd_plan = [("fwd", c, fwd_sizes(c), 0, (q, k, v), 2) for c in FWD]
  dq_plan = [("dq", c, dq_sizes(c), 1, bwd_args, 3) for c in DQ]
  dkv_plan = [("dkv", c, dkv_sizes(c, False), 2, bwd_args, 4) for c in DKV]
  fused_plan = [("fused", c, dkv_sizes(c, True), 2, bwd_args, 5) for c in FUSED]
  # Most informative first, in case the budget runs out: baselines and the split-loop A/B, the
  # fused kernel, the rest.
  plan = (fwd_plan[:3] + dq_plan[:2] + dkv_plan[:2] + fused_plan + dkv_plan[2:] + dq_plan[2:]
          + fwd_plan[3:])
  for kind, c, sizes, which, args, matmuls in plan:
    split = _split(c) if _split(c) is not None else kind != "fwd"  # the defaults
    record = dict(kind=kind, seq=seq, tq=c[0], tk=c[1], warps=c[2], stages=c[3],
                  separate_partial=split)
    if not budget.left():
      record["skipped"] = "time budget"
      report["kernels"].append(record)
      continue
    try:
      fn = kernel_programs(layout, sizes, seq)[which]
      record["ms"], record["compile_s"] = bench.time_ms(fn, args, min_window_s=0.1)
      record["tflops_hw"] = matmuls / 2 * flops_fwd / (record["ms"] * 1e-3) / 1e12
      if kind not in best or record["ms"] < best[kind][0]:
        best[kind] = (record["ms"], c)
      bench.log(f"  [{kind:5s}] tq={c[0]:3d} tk={c[1]:3d} warps={c[2]} stages={c[3]} "
                f"full_first_loops={record['separate_partial']}: "
                f"{record['ms']:.3f} ms ({record['tflops_hw']:.0f} TF/s hw)  "
                f"[{budget.elapsed():.0f}s]")
    except Exception as exc:  # noqa: BLE001
      record["error"] = bench._error(exc)
      bench.log(f"  [{kind}] {c} FAILED: {record['error']}")
    report["kernels"].append(record)
  return {kind: c for kind, (_, c) in best.items()}


def finals(budget: bench.Budget, best: dict, report: dict) -> dict[str, BlockSizes]:
  fwd_best = fwd_sizes(best.get("fwd", FWD[0]))
  combos = {"old_defaults": OLD_DEFAULTS}
  if "dq" in best and "dkv" in best:
    combos["best_split"] = merge(fwd_best, dq_sizes(best["dq"]), dkv_sizes(best["dkv"], False))
    if False in (_split(best["dq"]), _split(best["dkv"])):  # one flag for both backward kernels
      combos["best_split"] = dataclasses.replace(combos["best_split"], separate_partial_bwd=False)
  if "fused" in best:
    combos["best_fused"] = merge(fwd_best, dkv_sizes(best["fused"], True))
  report["combos"] = {name: {k: v for k, v in dataclasses.asdict(s).items() if v is not None}
                      for name, s in combos.items()}
  for seq, names in FINAL_CASES:
    batch = bench.batch_for(CFG, seq)
    q, k, v, do = bench.inputs(seq, batch, CFG.heads, CFG.heads, CFG.head_dim, CFG.dtype)
    cases = [("cudnn", "dense_causal", None)] + [
        (combo, name, sizes) for name in names for combo, sizes in combos.items()]
    for impl, name, sizes in cases:
      if not budget.left():
        report["totals"].append(dict(impl=impl, layout=name, seq=seq, skipped="time budget"))
        continue
      record = dict(impl=impl, layout=name, seq=seq)
      try:
        fn = (bench.cudnn_fn() if sizes is None
              else bench.kernel_fn(CFG, bench.make_layout(CFG, name, seq), sizes))
        record["fwd_bwd_ms"], _ = bench.time_ms(jax.jit(bench.fwd_bwd_fn(fn)), (q, k, v, do))
        bench.log(f"  [total] T={seq} {impl:13s} {name:12s} fwd+bwd {record['fwd_bwd_ms']:.3f} ms"
                  f"  [{budget.elapsed():.0f}s]")
      except Exception as exc:  # noqa: BLE001
        record["error"] = bench._error(exc)
        bench.log(f"  [total] {impl} {name} T={seq} FAILED: {record['error']}")
      report["totals"].append(record)
  return combos


def write_winner(out_dir: str, combos: dict[str, BlockSizes], report: dict) -> None:
  """best_block_sizes.json: the combo with the fastest dense-causal fwd+bwd at the longest T
  (input to `attention_gpu.py --block-sizes`); nothing is written when no total was timed."""
  seq = max(s for s, _ in FINAL_CASES)
  timed = [r for r in report["totals"] if r.get("layout") == "causal" and r.get("seq") == seq
           and "fwd_bwd_ms" in r and r["impl"] in combos]
  if not timed:
    bench.log("no combo timed; best_block_sizes.json not written")
    return
  winner = min(timed, key=lambda r: r["fwd_bwd_ms"])["impl"]
  report["winner"] = winner
  fields = {k: v for k, v in dataclasses.asdict(combos[winner]).items()
            if v != getattr(BlockSizes(), k)}
  with open(os.path.join(out_dir, "best_block_sizes.json"), "w") as f:
    json.dump(fields, f, indent=1)
  bench.log(f"winner at T={seq} causal: {winner} {fields} -> best_block_sizes.json")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--budget-s", type=float, default=170.0)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  bench.log(f"device: {device.device_kind}, jax {jax.__version__}")
  budget = bench.Budget(args.budget_s)
  tune_budget = bench.Budget(TUNE_SHARE * args.budget_s)  # the rest is left for the totals
  report = dict(device=device.device_kind, jax=jax.__version__, kernels=[], totals=[],
                correctness=[])
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "attention_gpu_tune.json")
  try:
    best = tune(tune_budget, report)
    report["best"] = best
    bench.log(f"best per kernel: {best}")
    combos = finals(budget, best, report)
    write_winner(args.out, combos, report)
    for name in ("best_split", "best_fused"):
      if name in combos:
        records = []
        bench.check_correctness(dataclasses.replace(CFG, layout_names=("causal",)),
                                records, block_sizes=combos[name])
        report["correctness"] += [dict(r, combo=name) for r in records]
  except Exception:  # noqa: BLE001
    traceback.print_exc()
  report["wall_s"] = budget.elapsed()
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=str)
  bench.log(f"done in {budget.elapsed():.0f}s; wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
