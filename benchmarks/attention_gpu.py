#!/usr/bin/env python
"""GPU check and benchmark of the Pallas block-sparse flash attention kernels (issue 4).

Run from the repository root on a machine with one GPU (no install needed: the script makes
`import sparseformer` work by itself when the package is not installed):

    python benchmarks/attention_gpu.py                   # full run, < 5 min on one H100
    python benchmarks/attention_gpu.py --quick           # T in {4K, 16K}, two layouts, no sweep
    python benchmarks/attention_gpu.py --out /tmp/bench  # where attention_gpu.{json,md} go

What it does, each step in its own try/except (one failure never kills the run):
  1. correctness of the compiled kernels at T = 4K, bf16, against the dense `reference` backend
     (values and dq/dk/dv, max error relative to the largest reference value);
  2. timings of forward and forward+backward at T = 4K, 16K, 32K (batch = 32K / T), H = 16,
     D = 128, bf16, layout blocks of 128, for dense causal, local windows of 1K and 2K tokens and
     BigBird, beside cuDNN dense causal (`jax.nn.dot_product_attention(implementation="cudnn")`)
     and JAX's dense Pallas GPU flash attention (`pallas.ops.gpu.attention.mha`); effective
     TFLOP/s count only visited blocks; speedup vs cuDNN causal beside the 1/density bound;
  3. (full run, if time is left) a small sweep of kernel tile sizes at T = 16K, dense causal.
Targets (issue 4, H100): dense-causal layout within 1.5x of cuDNN; at 32K with a 2K window,
fwd+bwd speedup >= 50 % of the 1/density bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any


def _ensure_importable() -> None:
  """Makes `import sparseformer` work from a bare checkout (the repo root is the package)."""
  try:
    import sparseformer  # noqa: F401
    return
  except ImportError:
    pass
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  link_dir = tempfile.mkdtemp(prefix="sparseformer_path_")
  os.symlink(root, os.path.join(link_dir, "sparseformer"))
  sys.path.insert(0, link_dir)


_ensure_importable()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparseformer.kernels.block_sparse_attention import BlockSizes  # noqa: E402
from sparseformer.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from sparseformer.layers.attention import builders as lb  # noqa: E402
from sparseformer.layers.attention.backends import reference_attention  # noqa: E402

# ------------------------------------------------------------------------------ configuration
@dataclasses.dataclass(frozen=True)
class Settings:
  """What the benchmark runs. tests/kernels/test_cross_lowering.py lowers every kernel call of
  `FULL` for ("cuda",) on the CPU machine, so shapes, dtypes and tiles here are lowering-tested."""

  layout_block: int = 128
  heads: int = 16
  head_dim: int = 128
  dtype: Any = jnp.bfloat16
  seq_lens: tuple[int, ...] = (32768, 16384, 4096)  # the issue's targets first (time budget)
  tokens_per_step: int = 32768  # batch = tokens_per_step // T
  layout_names: tuple[str, ...] = ("causal", "local_1k", "local_2k", "bigbird")
  windows: tuple[int, int] = (1024, 2048)  # local_1k / local_2k: keys q - window + 1 .. q
  check_seq: int = 4096
  check_gqa_kv_heads: int = 4  # extra correctness case: local_1k with 4 query heads per kv head
  sweep_seq: int = 16384
  interpret: bool = False  # True only for the CPU smoke run


FULL = Settings()
QUICK = dataclasses.replace(FULL, seq_lens=(16384, 4096), layout_names=("causal", "local_2k"))
# CPU smoke run of the script's plumbing (interpret mode, tiny shapes); not a benchmark.
SMOKE = dataclasses.replace(FULL, layout_block=32, heads=2, head_dim=32, dtype=jnp.float32,
                            seq_lens=(256,), tokens_per_step=256, windows=(48, 96), check_seq=256,
                            check_gqa_kv_heads=1, sweep_seq=256, interpret=True)

# Tile sweep: forward candidates (timed forward only) and backward candidates (timed fwd+bwd).
SWEEP_FWD = (
    BlockSizes(block_q=128, block_kv=128, num_warps=8, num_stages=3),  # the default (16-bit)
    BlockSizes(block_q=128, block_kv=128, num_warps=8, num_stages=2),
    BlockSizes(block_q=128, block_kv=128, num_warps=8, num_stages=3,
               separate_partial=True),  # FULL-first split loops
    BlockSizes(block_q=128, block_kv=128, num_warps=8, num_stages=4),
    BlockSizes(block_q=64, block_kv=128, num_warps=4, num_stages=3),
)
# Backward: the default (split loops), the same tiles with one branching loop, the fused
# dK/dV+dQ kernel (atomic dQ), then split variants with tall dQ / wide dK/dV tiles.
SWEEP_BWD = (
    BlockSizes(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
               num_warps_bwd=4),  # default
    BlockSizes(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
               num_warps_bwd=4, separate_partial_bwd=False),  # default tiles, one branching loop
    BlockSizes(block_q_dkv=64, block_kv_dkv=128, num_warps_bwd=8, fused_dq=True),
    BlockSizes(block_q_dq=128, block_kv_dq=32, num_warps_dq=8, num_stages_dq=3),
    BlockSizes(block_q_dkv=64, block_kv_dkv=128, num_warps_bwd=8),
)
MHA_BLOCKS = dict(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                  block_kv_dq=64)


def batch_for(cfg: Settings, seq: int) -> int:
  return max(1, cfg.tokens_per_step // seq)


def make_layout(cfg: Settings, name: str, seq: int):
  """The benchmark layouts (shared by all heads), layout blocks of cfg.layout_block tokens."""
  block = cfg.layout_block
  if name == "causal":
    return lb.dense(seq, block_q=block, causal=True)
  if name == "local_1k":
    return lb.sliding_window(seq, block_q=block, left=cfg.windows[0] - 1)
  if name == "local_2k":
    return lb.sliding_window(seq, block_q=block, left=cfg.windows[1] - 1)
  if name == "bigbird":  # window of 3 blocks, 1 global block, 3 random blocks (Zaheer et al.)
    return lb.bigbird(seq, block_q=block, left=3 * block - 1, num_global=block,
                      num_random_blocks=3, seed=0)
  raise ValueError(f"unknown layout {name!r}; choose from {FULL.layout_names}")


def kernel_fn(cfg: Settings, layout, block_sizes: BlockSizes | None = None):
  """q, k, v -> out with the block-sparse kernel (compiled unless cfg.interpret)."""
  return lambda q, k, v: block_sparse_attention(q, k, v, layout, interpret=cfg.interpret,
                                                block_sizes=block_sizes)


def fwd_bwd_fn(attention):
  """(q, k, v, d_out) -> (out, dq, dk, dv): one forward and one backward pass."""
  def run(q, k, v, d_out):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(d_out))
  return run


def cudnn_fn(window: int | None = None):
  """Dense causal cuDNN attention (optionally a causal sliding window of `window` keys)."""
  local = None if window is None else (window - 1, 0)
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                      local_window_size=local,
                                                      implementation="cudnn")


def pallas_mha_fn(cfg: Settings):
  """JAX's dense Pallas GPU flash attention (causal), or None if this JAX does not ship it."""
  try:
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention
  except ImportError:
    return None
  blocks = {k: min(v, cfg.layout_block) for k, v in MHA_BLOCKS.items()}
  blocks = pallas_attention.BlockSizes(**blocks)
  return lambda q, k, v: pallas_attention.mha(q, k, v, None, sm_scale=cfg.head_dim**-0.5,
                                              causal=True, block_sizes=blocks,
                                              interpret=cfg.interpret)


def visited_pairs(layout, heads: int) -> int:
  """(query, key) token pairs inside the visited blocks, summed over heads (padding included)."""
  per_layout_head = int(layout.kv_count.sum()) * layout.block_q * layout.block_kv
  return per_layout_head * (heads // layout.kv_count.shape[0])


# ---------------------------------------------------------------------------------- helpers
def log(*args) -> None:
  print(*args, flush=True)


def inputs(seq: int, batch: int, heads: int, kv_heads: int, dim: int, dtype, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, seq, heads, dim), dtype)
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, dim), dtype)
  d_out = jax.random.normal(keys[3], (batch, seq, heads, dim), dtype)
  return q, k, v, d_out


def time_ms(fn, args, *, min_window_s: float = 0.15, repeats: int = 5) -> tuple[float, float]:
  """(median ms per call, first-call seconds incl. compile) of a jitted fn on device arrays."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - t0
  calls = int(min(50, max(1, min_window_s / max(once, 1e-6))))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / calls)
  return statistics.median(samples) * 1e3, compile_s


class Budget:
  def __init__(self, seconds: float):
    self.start, self.seconds = time.perf_counter(), seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> bool:
    return self.elapsed() < self.seconds


def _error(exc: BaseException) -> str:
  text = f"{type(exc).__name__}: {exc}"
  return text if len(text) < 400 else text[:400] + "..."


# ------------------------------------------------------------------------------ 1. correctness
def check_correctness(cfg: Settings, results: list, block_sizes: BlockSizes | None = None) -> None:
  cases = [(name, cfg.heads) for name in cfg.layout_names]
  cases.append(("local_1k", cfg.check_gqa_kv_heads))
  for name, kv_heads in cases:
    record = dict(layout=name, seq=cfg.check_seq, heads=cfg.heads, kv_heads=kv_heads,
                  dtype=jnp.dtype(cfg.dtype).name)
    try:
      layout = make_layout(cfg, name, cfg.check_seq)
      q, k, v, d_out = inputs(cfg.check_seq, 1, cfg.heads, kv_heads, cfg.head_dim, cfg.dtype,
                              seed=1)
      got = jax.jit(fwd_bwd_fn(kernel_fn(cfg, layout, block_sizes)))(q, k, v, d_out)
      f32 = lambda x: x.astype(jnp.float32)
      with jax.default_matmul_precision("highest"):  # no TF32 in the f32 reference
        ref = jax.jit(fwd_bwd_fn(lambda q, k, v: reference_attention(q, k, v, layout)))(
            f32(q), f32(k), f32(v), f32(d_out))
      worst = 0.0
      for part, g, w in zip(("out", "dq", "dk", "dv"), got, ref):
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w)
        finite = bool(np.isfinite(g).all())
        rel = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-6)) if finite else float("inf")
        record[f"{part}_rel_err"] = rel
        worst = max(worst, rel)
      record["ok"] = bool(worst <= 2.5e-2)
      log(f"[check] {name:9s} kv_heads={kv_heads:2d}  " + "  ".join(
          f"{p}={record[p + '_rel_err']:.2e}" for p in ("out", "dq", "dk", "dv"))
          + ("  OK" if record["ok"] else "  FAIL"))
    except Exception as exc:  # noqa: BLE001 -- keep the run going, report the failure
      record["error"] = _error(exc)
      log(f"[check] {name} FAILED: {record['error']}")
      traceback.print_exc()
    results.append(record)


# -------------------------------------------------------------------------------- 2. timings
def _time_case(record: dict, attention, q, k, v, d_out, flops_fwd: float) -> None:
  for mode in ("fwd", "fwd_bwd"):
    try:
      if mode == "fwd":
        ms, compile_s = time_ms(jax.jit(attention), (q, k, v))
        flops = flops_fwd
      else:
        ms, compile_s = time_ms(jax.jit(fwd_bwd_fn(attention)), (q, k, v, d_out))
        flops = 3.5 * flops_fwd  # backward = 2.5x forward (5 vs 2 matmuls), FlashAttention rule
      record[f"{mode}_ms"] = ms
      record[f"{mode}_tflops"] = flops / (ms * 1e-3) / 1e12
      record[f"{mode}_compile_s"] = compile_s
    except Exception as exc:  # noqa: BLE001
      record[f"{mode}_error"] = _error(exc)
      log(f"    {record['impl']} {record['layout']} {mode} FAILED: {record[f'{mode}_error']}")


def timing_cases(cfg: Settings, seq: int) -> list[tuple[str, str]]:
  """(impl, layout) pairs timed at length seq: baselines first, then the block-sparse layouts."""
  cases = [("cudnn", "dense_causal"), ("pallas_mha", "dense_causal")]
  if seq == max(cfg.seq_lens) and "local_2k" in cfg.layout_names:
    cases.append(("cudnn_window", "local_2k"))  # cuDNN's own sliding window, same mask
  return cases + [("block_sparse", name) for name in cfg.layout_names]


def run_timings(cfg: Settings, budget: Budget, results: list,
                block_sizes: BlockSizes | None = None) -> None:
  for seq in cfg.seq_lens:
    batch = batch_for(cfg, seq)
    q, k, v, d_out = inputs(seq, batch, cfg.heads, cfg.heads, cfg.head_dim, cfg.dtype)
    causal_pairs = batch * cfg.heads * seq * (seq + 1) / 2
    for impl, name in timing_cases(cfg, seq):
      if not budget.left():
        log(f"  [skip] {impl} {name} T={seq}: time budget spent")
        results.append(dict(impl=impl, layout=name, seq=seq, skipped="time budget"))
        continue
      record = dict(impl=impl, layout=name, seq=seq, batch=batch, heads=cfg.heads,
                    head_dim=cfg.head_dim)
      try:
        pairs = causal_pairs
        if impl == "cudnn":
          fn = cudnn_fn()
        elif impl == "pallas_mha":
          fn = pallas_mha_fn(cfg)
        else:
          layout = make_layout(cfg, name, seq)
          pairs = batch * visited_pairs(layout, cfg.heads)
          if impl == "cudnn_window":
            fn = cudnn_fn(cfg.windows[1])
          else:
            fn = kernel_fn(cfg, layout, block_sizes)
            record["density_vs_causal"] = pairs / causal_pairs
        if fn is None:
          raise RuntimeError("not available in this JAX version")
        _time_case(record, fn, q, k, v, d_out, 4.0 * pairs * cfg.head_dim)
      except Exception as exc:  # noqa: BLE001
        record["error"] = _error(exc)
        log(f"  {impl} {name} T={seq} FAILED: {record['error']}")
      results.append(record)
      log(f"  T={seq:6d} B={batch} {impl:12s} {name:12s} " + "  ".join(
          f"{m}={record[m + '_ms']:8.3f}ms ({record[m + '_tflops']:6.1f} TF/s)"
          for m in ("fwd", "fwd_bwd") if m + "_ms" in record) + f"   [{budget.elapsed():.0f}s]")


def add_ratios(results: list) -> None:
  """speedup vs cuDNN dense causal at the same T, and the fraction of the 1/density bound."""
  cudnn = {r["seq"]: r for r in results if r.get("impl") == "cudnn"}
  for r in results:
    base = cudnn.get(r.get("seq"))
    if base is None or r is base:
      continue
    for mode in ("fwd", "fwd_bwd"):
      if f"{mode}_ms" in r and f"{mode}_ms" in base:
        r[f"{mode}_speedup_vs_cudnn"] = base[f"{mode}_ms"] / r[f"{mode}_ms"]
        if "density_vs_causal" in r:
          r[f"{mode}_fraction_of_bound"] = r[f"{mode}_speedup_vs_cudnn"] * r["density_vs_causal"]


# ---------------------------------------------------------------------------------- 3. sweep
def run_sweep(cfg: Settings, budget: Budget, results: list) -> None:
  layout = make_layout(cfg, "causal", cfg.sweep_seq)
  batch = batch_for(cfg, cfg.sweep_seq)
  q, k, v, d_out = inputs(cfg.sweep_seq, batch, cfg.heads, cfg.heads, cfg.head_dim, cfg.dtype)
  flops_fwd = 4.0 * batch * visited_pairs(layout, cfg.heads) * cfg.head_dim
  for mode, candidates in (("fwd", SWEEP_FWD), ("fwd_bwd", SWEEP_BWD)):
    for sizes in candidates:
      if not budget.left():
        log("  [sweep] time budget spent")
        return
      record = dict(mode=mode, seq=cfg.sweep_seq, layout="causal",
                    block_sizes={k: v for k, v in dataclasses.asdict(sizes).items()
                                 if v is not None})
      try:
        fn = kernel_fn(cfg, layout, sizes)
        fn = jax.jit(fn) if mode == "fwd" else jax.jit(fwd_bwd_fn(fn))
        args = (q, k, v) if mode == "fwd" else (q, k, v, d_out)
        record["ms"], _ = time_ms(fn, args)
        record["tflops"] = (flops_fwd if mode == "fwd" else 3.5 * flops_fwd) / record["ms"] / 1e9
        log(f"  [sweep] {mode:7s} {record['block_sizes']}: {record['ms']:.3f} ms "
            f"({record['tflops']:.1f} TF/s)")
      except Exception as exc:  # noqa: BLE001
        record["error"] = _error(exc)
        log(f"  [sweep] {mode} {record['block_sizes']} FAILED: {record['error']}")
      results.append(record)


# ---------------------------------------------------------------------------------- report
def _fmt(value, spec: str) -> str:
  return format(value, spec) if isinstance(value, (int, float)) else "-"


def write_report(out_dir: str, report: dict) -> None:
  cfg = report["settings"]
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "attention_gpu.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  lines = [
      "# Block-sparse attention on GPU (Pallas Triton kernels)", "",
      f"Device: **{report['device']}**; jax {report['jax']}; {report['date']}; "
      f"command: `{report['command']}`; total {report.get('wall_s', 0):.0f} s.", "",
      f"Inputs {cfg['dtype']}, H = {cfg['heads']} (MHA), D = {cfg['head_dim']}, batch = "
      f"{cfg['tokens_per_step']} / T, layout blocks {cfg['layout_block']}; kernel tiles: "
      + (f"`{report['block_sizes']}` (from `{report['block_sizes_from']}`)"
         if report.get("block_sizes") else "the defaults of `tiles.resolve_tiles`")
      + ". Times are medians over 5 windows of back-to-back calls. "
      "Effective TFLOP/s count only the visited (query, key) blocks (4·pairs·D forward, 3.5x "
      "that for forward+backward); cuDNN and Pallas `mha` count the causal half. `bound` = "
      "1 / density relative to dense causal; `of bound` = (speedup vs cuDNN dense causal) / bound. "
      "`cudnn_window` is cuDNN's own causal sliding window (same mask as local_2k).", "",
      f"## Correctness (T = {cfg['check_seq']}, compiled kernel vs `reference` in f32)", "",
      "| layout | kv heads | out | dq | dk | dv | ok |", "|---|---|---|---|---|---|---|"]
  for r in report["correctness"]:
    if "error" in r:
      lines.append(f"| {r['layout']} | {r['kv_heads']} | error: {r['error'][:80]} | | | | no |")
    else:
      lines.append(f"| {r['layout']} | {r['kv_heads']} | " + " | ".join(
          _fmt(r[f"{p}_rel_err"], ".1e") for p in ("out", "dq", "dk", "dv"))
          + f" | {'yes' if r['ok'] else 'NO'} |")
  lines += ["", "Errors: max |kernel - reference| / max |reference| "
            f"(kernel in {cfg['dtype']}).", "",
            "## Timings", "",
            "| T | impl | layout | bound | fwd ms | fwd TF/s | fwd speedup | fwd of bound "
            "| fwd+bwd ms | fwd+bwd TF/s | fwd+bwd speedup | fwd+bwd of bound |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["timings"]:
    if "skipped" in r or "error" in r:
      note = r.get("skipped") or "error: " + r["error"][:60].replace("|", "/")
      lines.append(f"| {r['seq']} | {r['impl']} | {r['layout']} | {note} |||||||||")
      continue
    bound = 1 / r["density_vs_causal"] if "density_vs_causal" in r else None
    cells = []
    for m in ("fwd", "fwd_bwd"):
      cells += [_fmt(r.get(f"{m}_ms"), ".3f"), _fmt(r.get(f"{m}_tflops"), ".0f"),
                _fmt(r.get(f"{m}_speedup_vs_cudnn"), ".2f"),
                _fmt(r.get(f"{m}_fraction_of_bound"), ".0%")]
    lines.append(f"| {r['seq']} | {r['impl']} | {r['layout']} | {_fmt(bound, '.1f')} | "
                 + " | ".join(cells) + " |")
  if report["sweep"]:
    lines += ["", f"## Tile sweep (T = {cfg['sweep_seq']}, dense causal layout)", "",
              "| mode | block sizes | ms | TF/s |", "|---|---|---|---|"]
    for r in report["sweep"]:
      tail = (f"{_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('tflops'), '.0f')}" if "error" not in r
              else "error | " + r["error"][:60].replace("|", "/"))
      lines.append(f"| {r['mode']} | `{r['block_sizes']}` | {tail} |")
  with open(os.path.join(out_dir, "attention_gpu.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _non_default(sizes: BlockSizes) -> dict:
  return {k: v for k, v in dataclasses.asdict(sizes).items() if v != getattr(BlockSizes(), k)}


def load_block_sizes(path: str) -> BlockSizes:
  """BlockSizes from a JSON object of its fields (unknown fields are an error naming them)."""
  with open(path) as f:
    fields = json.load(f)
  known = {f.name for f in dataclasses.fields(BlockSizes)}
  unknown = sorted(set(fields) - known)
  if not isinstance(fields, dict) or unknown:
    raise SystemExit(f"--block-sizes {path}: expected a JSON object of BlockSizes fields "
                     f"{sorted(known)}; unknown: {unknown}.")
  return BlockSizes(**fields)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  default_out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                             "benchmarks")
  parser.add_argument("--out", default=default_out, help="directory for attention_gpu.{json,md}")
  parser.add_argument("--quick", action="store_true", help="T in {16K, 4K}, 2 layouts, no sweep")
  parser.add_argument("--smoke", action="store_true",
                      help="CPU plumbing check: tiny shapes in interpret mode (not a benchmark)")
  parser.add_argument("--budget-s", type=float, default=270.0,
                      help="wall-clock budget; later timing cases and the sweep are skipped")
  parser.add_argument("--no-sweep", action="store_true")
  parser.add_argument("--block-sizes", metavar="JSON",
                      help="BlockSizes fields for every block-sparse check and timing, e.g. the "
                           "best_block_sizes.json written by attention_gpu_tune.py")
  args = parser.parse_args(argv)
  block_sizes = load_block_sizes(args.block_sizes) if args.block_sizes else None

  cfg = SMOKE if args.smoke else QUICK if args.quick else FULL
  device = jax.devices()[0]
  log(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
      f"python {platform.python_version()}")
  if device.platform != "gpu" and not cfg.interpret:
    log("WARNING: not a GPU; the compiled Triton kernels will not run here.")
  budget = Budget(args.budget_s)
  settings = {k: (jnp.dtype(v).name if k == "dtype" else v)
              for k, v in dataclasses.asdict(cfg).items()}
  report = dict(device=device.device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"), command=" ".join(["python"] + sys.argv),
                settings=settings, correctness=[], timings=[], sweep=[],
                block_sizes=None if block_sizes is None else _non_default(block_sizes),
                block_sizes_from=args.block_sizes)
  log(f"== 1. correctness (T={cfg.check_seq}) ==")
  check_correctness(cfg, report["correctness"], block_sizes)
  write_report(args.out, report)
  log("== 2. timings ==")
  run_timings(cfg, budget, report["timings"], block_sizes)
  add_ratios(report["timings"])
  report["wall_s"] = budget.elapsed()
  write_report(args.out, report)
  if not args.quick and not args.no_sweep:
    log(f"== 3. tile sweep (T={cfg.sweep_seq}) ==")
    run_sweep(cfg, budget, report["sweep"])
    report["wall_s"] = budget.elapsed()
    write_report(args.out, report)
  log(f"done in {budget.elapsed():.0f}s; wrote {args.out}/attention_gpu.md and .json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
