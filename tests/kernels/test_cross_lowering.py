"""Cross-lowering of the block-sparse attention kernels on the CPU machine.

`jax.jit(f).trace(*shapes).lower(lowering_platforms=(platform,))` runs the Pallas -> Triton IR
(cuda) and Pallas -> Mosaic (tpu) lowerings without a device, so lowering errors (unsupported
ops, block-shape rules, index-map types) show up here rather than on the GPU/TPU machine. It does
not run the Triton/Mosaic compilers (register or shared-memory limits are only seen on device).

The cuda cases are exactly the kernel calls of benchmarks/attention_gpu.py (`FULL` settings:
every sequence length and layout, the GQA correctness case and the tile-sweep candidates) and the
tile candidates of benchmarks/attention_gpu_tune.py, so a GPU run does not fail on a lowering
error. Lowering the fwd+bwd program covers all three
kernels (forward, dQ, dK/dV). The last tests check the script's report plumbing (the whole
script in interpret mode on tiny shapes is `slow`).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import pytest

from sparseformer.benchmarks import attention_gpu as bench
from sparseformer.benchmarks import attention_gpu_tune as tune
from sparseformer.benchmarks import kernel_gpu_checks
from sparseformer.kernels.block_sparse_attention import BlockSizes, block_sparse_attention
from sparseformer.layers.attention import builders as lb
from sparseformer.layers.attention import layouts

CFG = bench.FULL


def lower(fn, shapes, platform: str) -> str:
  lowered = jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,))
  return lowered.as_text()


def shapes(seq, batch, heads, kv_heads, dim, dtype, with_cotangent=True):
  q = jax.ShapeDtypeStruct((batch, seq, heads, dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, dim), dtype)
  return (q, kv, kv, q) if with_cotangent else (q, kv, kv)


def _kernel_calls(text: str, platform: str) -> int:
  target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  return text.count(target)


BENCH_CASES = [(seq, name) for seq in CFG.seq_lens for name in CFG.layout_names]


@functools.lru_cache(maxsize=None)
def _layout(name, seq):
  return bench.make_layout(CFG, name, seq)


@pytest.mark.parametrize("seq, name", BENCH_CASES, ids=[f"{n}-{s}" for s, n in BENCH_CASES])
def test_benchmark_kernels_lower_for_cuda(seq, name):
  fn = bench.fwd_bwd_fn(bench.kernel_fn(CFG, _layout(name, seq)))
  text = lower(fn, shapes(seq, bench.batch_for(CFG, seq), CFG.heads, CFG.heads, CFG.head_dim,
                          CFG.dtype), "cuda")
  assert _kernel_calls(text, "cuda") == 3  # forward, dQ, dK/dV


def test_benchmark_correctness_case_lowers_for_cuda():
  layout = _layout("local_1k", CFG.check_seq)
  fn = bench.fwd_bwd_fn(bench.kernel_fn(CFG, layout))
  text = lower(fn, shapes(CFG.check_seq, 1, CFG.heads, CFG.check_gqa_kv_heads, CFG.head_dim,
                          CFG.dtype), "cuda")
  assert _kernel_calls(text, "cuda") == 3


# Every tile candidate of the sweep (attention_gpu.py) and the tuner (attention_gpu_tune.py), once.
CANDIDATES = list(dict.fromkeys(bench.SWEEP_FWD + bench.SWEEP_BWD + tuple(tune.all_candidates())))
assert CFG.sweep_seq == tune.TUNE_SEQ  # both time at the same length, lowered once here


@pytest.mark.parametrize("sizes", CANDIDATES, ids=lambda s: str(
    {k: v for k, v in s.__dict__.items() if v is not None}).replace(" ", ""))
def test_tile_candidates_lower_for_cuda(sizes):
  """fwd+bwd lowers with every kernel: forward, dQ (unless fused) and dK/dV."""
  seq = CFG.sweep_seq
  fn = bench.fwd_bwd_fn(bench.kernel_fn(CFG, _layout("causal", seq), sizes))
  text = lower(fn, shapes(seq, bench.batch_for(CFG, seq), CFG.heads, CFG.heads, CFG.head_dim,
                          CFG.dtype), "cuda")
  assert _kernel_calls(text, "cuda") == (2 if sizes.fused_dq else 3)  # fused: no dQ kernel


def test_pallas_mha_baseline_lowers_for_cuda():
  seq = CFG.seq_lens[0]
  fn = bench.pallas_mha_fn(CFG)
  assert fn is not None
  text = lower(bench.fwd_bwd_fn(fn), shapes(seq, bench.batch_for(CFG, seq), CFG.heads, CFG.heads,
                                            CFG.head_dim, CFG.dtype), "cuda")
  assert _kernel_calls(text, "cuda") >= 2


# Beyond the benchmark: dtypes, head dims, GQA, per-head layouts, padding, sub-tiles.
MIXTURE = layouts.per_head([lb.sliding_window(1000, block_q=128, left=300),
                            lb.dense(1000, block_q=128),
                            lb.strided(1000, block_q=128, stride=200),
                            lb.bigbird(1000, block_q=128, left=200, num_global=64,
                                       num_random_blocks=2)])
EXTRA_CASES = {
    "f32_d64_gqa_mixture_padded": (MIXTURE, 4, 2, 64, jnp.float32, None),
    "bf16_d128_mqa_subtiles": (lb.dense(1024, block_q=128, causal=False), 4, 1, 128,
                               jnp.bfloat16, BlockSizes(block_q=32, block_kv=32, block_q_dq=64,
                                                        block_kv_dq=32, block_q_dkv=32,
                                                        block_kv_dkv=64)),
    "f16_d64_local": (lb.sliding_window(1024, block_q=128, left=200), 2, 2, 64, jnp.float16,
                      BlockSizes(block_q=64, block_kv=64)),
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("case", sorted(EXTRA_CASES))
def test_kernels_lower(case, platform):
  layout, heads, kv_heads, dim, dtype, sizes = EXTRA_CASES[case]
  if platform == "tpu":
    sizes = None  # the TPU kernels tile by layout blocks
  kernel = functools.partial(block_sparse_attention, layout=layout, interpret=False,
                             block_sizes=sizes, platform="gpu" if platform == "cuda" else "tpu")
  text = lower(bench.fwd_bwd_fn(kernel), shapes(layout.seq_q, 2, heads, kv_heads, dim, dtype),
               platform)
  assert _kernel_calls(text, platform) == 3


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_traced_layout_lowers(platform):
  """kv lists as jit arguments (routed attention): the on-device transposition lowers too."""
  layout = lb.sliding_window(1024, block_q=128, left=300)

  def fn(q, k, v, d_out, kv_index, kv_count, kv_mask_id):
    routed = type("Routed", (), dict(seq_q=1024, seq_kv=1024, block_q=128, block_kv=128,
                                     kv_index=kv_index, kv_count=kv_count, kv_mask_id=kv_mask_id,
                                     partial_masks=layout.partial_masks))
    attention = lambda q, k, v: block_sparse_attention(
        q, k, v, routed, interpret=False, platform="gpu" if platform == "cuda" else "tpu")
    return bench.fwd_bwd_fn(attention)(q, k, v, d_out)

  ints = [jax.ShapeDtypeStruct(x.shape, jnp.int32)
          for x in (layout.kv_index, layout.kv_count, layout.kv_mask_id)]
  text = lower(fn, (*shapes(1024, 1, 4, 2, 128, jnp.bfloat16), *ints), platform)
  assert _kernel_calls(text, platform) == 3


# The benchmark script's plumbing (reports with failures and skips; the whole run on CPU).
def test_benchmark_report_handles_errors_and_skips(tmp_path):
  report = dict(device="cpu", jax=jax.__version__, date="now", command="test", wall_s=1.0,
                settings=dict(bench.dataclasses.asdict(CFG), dtype="bfloat16"),
                correctness=[dict(layout="causal", kv_heads=16, error="boom | bad")],
                timings=[dict(impl="cudnn", layout="dense_causal", seq=4096, fwd_ms=2.0,
                              fwd_bwd_ms=6.0, fwd_tflops=1.0, fwd_bwd_tflops=1.0),
                         dict(impl="block_sparse", layout="local_2k", seq=4096, fwd_ms=1.0,
                              fwd_tflops=1.0, density_vs_causal=0.25, fwd_bwd_error="x"),
                         dict(impl="block_sparse", layout="bigbird", seq=4096, skipped="budget")],
                sweep=[dict(mode="fwd", block_sizes={}, error="no")])
  bench.add_ratios(report["timings"])
  assert report["timings"][1]["fwd_speedup_vs_cudnn"] == 2.0
  assert report["timings"][1]["fwd_fraction_of_bound"] == 0.5
  bench.write_report(str(tmp_path), report)
  text = (tmp_path / "attention_gpu.md").read_text()
  assert "| 4096 | block_sparse | local_2k | 4.0 | 1.000 |" in text and "budget" in text


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path, request):
  if not request.config.getoption("markexpr"):  # pyproject does not deselect `slow` by default
    pytest.skip("slow (~1 min): run with `pytest -m slow`")
  (tmp_path / "tiles.json").write_text('{"block_q": 16, "separate_partial": false}')
  assert bench.main(["--smoke", "--no-sweep", "--out", str(tmp_path),
                     "--block-sizes", str(tmp_path / "tiles.json")]) == 0
  text = (tmp_path / "attention_gpu.md").read_text()
  assert text.count("| yes |") == len(bench.SMOKE.layout_names) + 1  # every check passed
  assert "`{'block_q': 16, 'separate_partial': False}`" in text


def test_tuner_winner_round_trips_into_the_benchmark(tmp_path):
  """The tuner's best_block_sizes.json (fastest causal total) loads back as the same BlockSizes."""
  combos = {"old_defaults": tune.OLD_DEFAULTS,
            "best_fused": BlockSizes(block_q_dkv=32, block_kv_dkv=128, fused_dq=True),
            "best_split": BlockSizes(block_q_dq=128, block_kv_dq=32, separate_partial_bwd=False)}
  seq = max(s for s, _ in tune.FINAL_CASES)
  report = {"totals": [
      dict(impl="cudnn", layout="dense_causal", seq=seq, fwd_bwd_ms=1.0),
      dict(impl="old_defaults", layout="causal", seq=seq, fwd_bwd_ms=9.0),
      dict(impl="best_fused", layout="local_2k", seq=seq, fwd_bwd_ms=2.0),  # not the causal case
      dict(impl="best_fused", layout="causal", seq=seq, fwd_bwd_ms=8.5),
      dict(impl="best_split", layout="causal", seq=seq, fwd_bwd_ms=7.0),
      dict(impl="best_split", layout="causal", seq=seq // 2, fwd_bwd_ms=1.0)]}
  tune.write_winner(str(tmp_path), combos, report)
  assert report["winner"] == "best_split"
  assert bench.load_block_sizes(str(tmp_path / "best_block_sizes.json")) == combos["best_split"]
  (tmp_path / "bad.json").write_text('{"block_q": 64, "blok_kv": 64}')
  with pytest.raises(SystemExit, match="blok_kv"):
    bench.load_block_sizes(str(tmp_path / "bad.json"))


@pytest.mark.slow  # benchmark-script plumbing (34 s); suite budget
def test_tuner_plumbing_runs_in_interpret_mode(tmp_path, monkeypatch):
  """tune -> totals -> winner -> correctness end to end on tiny interpret-mode shapes, so a Python
  slip cannot waste a scarce GPU run (the times here are fake; cuDNN is absent on CPU)."""
  monkeypatch.setattr(tune, "CFG", dataclasses.replace(bench.SMOKE, layout_names=("causal",)))
  monkeypatch.setattr(tune, "TUNE_SEQ", 64)
  monkeypatch.setattr(tune, "FINAL_CASES", ((64, ("causal",)),))
  for name in ("FWD", "DQ", "DKV", "FUSED"):
    monkeypatch.setattr(tune, name, [(32, 32, 4, 2, False), (16, 32, 4, 2)])
  fake_ms = iter(range(1000, 0, -1))  # every later program "faster": the last combo wins
  monkeypatch.setattr(bench, "time_ms", lambda fn, args, **_: (
      [jax.block_until_ready(fn(*args)), float(next(fake_ms))][1], 0.0))
  assert tune.main(["--out", str(tmp_path), "--budget-s", "900"]) == 0
  report = json.loads((tmp_path / "attention_gpu_tune.json").read_text())
  assert [r for r in report["kernels"] if "ms" not in r] == []
  # old_defaults' 64-row tiles do not divide these 32-token layout blocks: a recorded error.
  assert [r["impl"] for r in report["totals"] if "fwd_bwd_ms" not in r] == ["cudnn", "old_defaults"]
  assert report["best"]["fused"] == [16, 32, 4, 2]
  assert report["winner"] == "best_fused"
  assert all(r["ok"] for r in report["correctness"]) and len(report["correctness"]) == 4
  winner = bench.load_block_sizes(str(tmp_path / "best_block_sizes.json"))
  assert winner.fused_dq and winner.block_q_dkv == 16


@pytest.mark.slow  # benchmark-script plumbing (31 s); suite budget
def test_kernel_gpu_checks_plumbing_and_failure_exit(monkeypatch, capsys):
  """kernel_gpu_checks.py in interpret mode on two of its cases: passes, and exits 1 when a case is
  outside tolerance (so a GPU run cannot report a failure as success)."""
  assert kernel_gpu_checks.main(["--interpret", "--only", "masked_rows_mixture"]) == 0
  assert kernel_gpu_checks.main(["--interpret", "--only", "traced_layout"]) == 0
  assert "2/2 cases within tolerance" in capsys.readouterr().out
  monkeypatch.setattr(kernel_gpu_checks, "TOL", {"float32": 0.0, "bfloat16": 0.0})
  assert kernel_gpu_checks.main(["--interpret", "--only", "masked_rows_mixture"]) == 1


# Grouped matmul (kernels/grouped_matmul): gmm fwd+bwd = gmm, gmm (d lhs) and tgmm (d rhs).
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_grouped_matmul_lowers(platform):
  from sparseformer.kernels.grouped_matmul import gmm  # pylint: disable=import-outside-toplevel

  def fn(lhs, rhs, group_sizes, d_out):
    kernel = lambda a, b: gmm(a, b, group_sizes, interpret=False,
                              platform="gpu" if platform == "cuda" else "tpu")
    out, vjp = jax.vjp(kernel, lhs, rhs)
    return out, *vjp(d_out)

  args = (jax.ShapeDtypeStruct((384, 256), jnp.bfloat16),
          jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16),
          jax.ShapeDtypeStruct((8,), jnp.int32), jax.ShapeDtypeStruct((384, 512), jnp.bfloat16))
  assert _kernel_calls(lower(fn, args, platform), platform) == 3
