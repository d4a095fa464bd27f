"""Pallas block-sparse flash attention (interpret mode) against a dense masked-softmax reference.

Both kernel families run here: the GPU (Triton-style, `platform="gpu"`) and the TPU
(Mosaic-style, scalar prefetch, `platform="tpu"`) kernels, in interpret mode. Interpret mode
starts every output buffer as NaN (checked by `test_interpret_outputs_start_poisoned`), so the
`isfinite` checks below fail on any output element a kernel forgets to write.

Each case compiles one fwd+bwd program (~10 s on 2 cores), so the cases are chosen to cover:
local, causal, BigBird (per-head random), strided, per-head mixtures, fully masked rows and
empty query blocks, padded lengths, GQA/MQA, f32/bf16, head dims 32/64/128, sub-tiled GPU
loops, rectangular blocks (block_q != block_kv), an explicit `scale`, traced layouts; values,
LSE and dq/dk/dv with cotangents on both out and lse. Inputs come from the `seed` fixture
(tests/conftest.py): fixed by default, fresh under `pytest -m fuzz`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from sparseformer.kernels.block_sparse_attention import api, common, tiles as tiles_lib
from sparseformer.kernels.block_sparse_attention import BlockSizes
from sparseformer.layers.attention import backends as sa, builders as lb, layouts

# (abs tolerance on values/lse, tolerance on grads relative to the largest reference grad)
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}


def dense_reference(q, k, v, mask, scale):
  """Obvious dense masked attention in f32: (out [B, T, H, D], lse [B, H, T]).

  mask: bool [Hl, T, S]. Rows with no visible key: out 0, lse -inf, zero gradients.
  """
  group = q.shape[2] // k.shape[2]
  k = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k,
                 precision=jax.lax.Precision.HIGHEST) * scale
  mask = jnp.asarray(mask)[None]
  row_max = jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.exp(jnp.where(mask, s - row_max, -jnp.inf))
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("bhts,bshd->bthd", p / l_safe, v, precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(l > 0, jnp.log(l_safe) + row_max, -jnp.inf)[..., 0]
  return out, lse


def _inputs(seed, batch, seq_q, seq_kv, heads, kv_heads, dim, dtype):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (batch, seq_q, heads, dim)).astype(dtype)
  k = jax.random.normal(keys[1], (batch, seq_kv, kv_heads, dim)).astype(dtype)
  v = jax.random.normal(keys[2], (batch, seq_kv, kv_heads, dim)).astype(dtype)
  d_out = jax.random.normal(keys[3], (batch, seq_q, heads, dim), jnp.float32)
  d_lse = jax.random.normal(keys[4], (batch, heads, seq_q), jnp.float32)
  return q, k, v, d_out, d_lse


def _values_and_grads(fn, q, k, v, d_out, d_lse):
  (out, lse), vjp = jax.vjp(fn, q, k, v)
  grads = vjp((d_out.astype(out.dtype), d_lse))
  return [np.asarray(x.astype(jnp.float32)) for x in (out, lse, *grads)]


def check_against_reference(layout, *, platform, seed, heads=4, kv_heads=2, dim=32, batch=1,
                            dtype=jnp.float32, block_sizes=None, scale=None):
  """Kernel (interpret mode) vs `dense_reference`: out, lse and dq/dk/dv; `scale` None is the
  kernel's default, which the reference takes as 1 / sqrt(dim)."""
  q, k, v, d_out, d_lse = _inputs(seed, batch, layout.seq_q, layout.seq_kv, heads, kv_heads, dim,
                                  dtype)
  mask = layout.to_token_mask()
  kernel = jax.jit(functools.partial(api.block_sparse_attention_with_lse, layout=layout,
                                     platform=platform, interpret=True, block_sizes=block_sizes,
                                     scale=scale))
  reference = jax.jit(functools.partial(dense_reference, mask=mask,
                                        scale=1.0 / math.sqrt(dim) if scale is None else scale))
  got = _values_and_grads(kernel, q, k, v, d_out, d_lse)
  want = _values_and_grads(reference, q, k, v, d_out, d_lse)
  value_tol, grad_tol = TOL[dtype]
  where = f"layout={layout!r} platform={platform} dtype={dtype.__name__} scale={scale} seed={seed}"
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape, (name, g.shape, w.shape, where)
    assert not np.isnan(w).any(), f"reference {name} has NaN, {where}"
    if name == "lse":  # rows with no visible key: exactly -inf in both
      assert np.array_equal(np.isneginf(g), np.isneginf(w)), f"lse -inf pattern differs, {where}"
      g, w = np.where(np.isneginf(w), 0.0, g), np.where(np.isneginf(w), 0.0, w)
    assert np.isfinite(g).all(), f"{name} has NaN/inf (unwritten or unsafe), {where}"
    tol = value_tol if name in ("out", "lse") else grad_tol * max(1.0, np.abs(w).max())
    err = np.abs(g - w).max()
    assert err <= tol, f"{name}: max abs err {err:.3g} > {tol:.3g}, {where}"
  return got


# ---------------------------------------------------------------------------------------------
# Kernels vs reference
# ---------------------------------------------------------------------------------------------

SUB_TILES = BlockSizes(block_q=16, block_kv=16, block_q_dq=16, block_kv_dq=16, block_q_dkv=16,
                       block_kv_dkv=16)


def _fully_masked_layout(seq, block):
  """Strictly-past window: query 0 sees nothing, the first query block of a far window is empty."""
  far = lb.from_predicate(lb.Diagonal(40, 60), seq_q=seq, block_q=block, name="far(40,60)")
  near = lb.from_predicate(lb.Diagonal(1, 8), seq_q=seq, block_q=block, name="past(1,8)")
  return layouts.per_head([far, near, far, near])


CASES = {
    # name: (layout builder of the seed, kwargs of check_against_reference)
    "causal_gqa_subtiles_f32": (lambda seed: lb.dense(256, block_q=32, causal=True),
                                dict(platform="gpu", block_sizes=SUB_TILES, batch=2)),
    "local_bf16_d64": (lambda seed: lb.sliding_window(256, block_q=32, left=45),
                       dict(platform="gpu", dtype=jnp.bfloat16, dim=64)),
    "bigbird_per_head_mqa": (lambda seed: lb.bigbird(256, block_q=32, left=40, num_global=8,
                                                     num_random_blocks=2, num_heads=4,
                                                     seed=seed % 1000),
                             dict(platform="gpu", kv_heads=1)),
    "strided_noncausal_padded": (lambda seed: lb.strided(200, block_q=32, stride=24, causal=False,
                                                         seq_kv=150),
                                 dict(platform="gpu", block_sizes=SUB_TILES)),
    "per_head_mixture_bf16": (lambda seed: layouts.per_head([
        lb.sliding_window(256, block_q=32, left=31), lb.dense(256, block_q=32),
        lb.strided(256, block_q=32, stride=40), lb.global_tokens(256, block_q=32, num_global=5)]),
                              dict(platform="gpu", dtype=jnp.bfloat16)),
    "fully_masked_rows": (lambda seed: _fully_masked_layout(160, 32), dict(platform="gpu")),
    # dQ summed by atomic adds inside the dK/dV kernel: GQA group loop, sub-tiles, masked rows.
    "fused_dq_gqa_subtiles_masked_rows": (lambda seed: _fully_masked_layout(160, 32), dict(
        platform="gpu", block_sizes=dataclasses.replace(SUB_TILES, block_q_dkv=32, fused_dq=True))),
    # The non-default loop structures: forward in FULL-first split loops, backward in one loop
    # branching on each block's kind.
    "swapped_loops_mixture_masked_rows": (lambda seed: _fully_masked_layout(160, 32), dict(
        platform="gpu", block_sizes=dataclasses.replace(SUB_TILES, separate_partial=True,
                                                        separate_partial_bwd=False))),
    # Rectangular blocks both ways (the builders' `block_kv=`), padded lengths, sub-tiled query
    # blocks on GPU, explicit logit scales.
    "rectangular_tall_blocks_subtiles_scale": (
        lambda seed: lb.sliding_window(150, block_q=32, block_kv=16, left=37),
        dict(platform="gpu", block_sizes=SUB_TILES, scale=0.3)),
    "tpu_rectangular_wide_blocks_scale_bf16": (
        lambda seed: lb.chunked(150, block_q=16, block_kv=32, chunk=50),
        dict(platform="tpu", dtype=jnp.bfloat16, scale=0.9)),
    "tpu_causal_gqa_d128": (lambda seed: lb.dense(256, block_q=64, causal=True),
                            dict(platform="tpu", dim=128)),
    "tpu_mixture_masked_rows_bf16": (lambda seed: _fully_masked_layout(160, 32),
                                     dict(platform="tpu", dtype=jnp.bfloat16, heads=4, kv_heads=2)),
    "tpu_bigbird_padded": (lambda seed: lb.bigbird(200, block_q=32, left=30, num_global=4,
                                                   num_random_blocks=1, seed=seed % 1000),
                           dict(platform="tpu", heads=2, kv_heads=1, batch=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(case, seed):
  build, kwargs = CASES[case]
  check_against_reference(build(seed), seed=seed, **kwargs)


def test_traced_layout_matches_host_layout(seed):
  """kv_index / kv_count / kv_mask_id as traced arrays: transposed view computed on device."""
  layout = lb.bigbird(192, block_q=32, left=40, num_global=4, num_random_blocks=2, num_heads=2,
                      seed=seed % 1000)
  q, k, v, d_out, d_lse = _inputs(seed, 1, 192, 192, 2, 1, 32, jnp.float32)

  def traced(q, k, v, kv_index, kv_count, kv_mask_id, partial_masks):
    routed = types.SimpleNamespace(
        seq_q=layout.seq_q, seq_kv=layout.seq_kv, block_q=layout.block_q, block_kv=layout.block_kv,
        kv_index=kv_index, kv_count=kv_count, kv_mask_id=kv_mask_id, partial_masks=partial_masks)
    return api.block_sparse_attention_with_lse(q, k, v, routed, platform="gpu", interpret=True)

  arrays = [jnp.asarray(x) for x in (layout.kv_index, layout.kv_count, layout.kv_mask_id,
                                     layout.partial_masks)]
  fn = jax.jit(traced)  # the layout arrays are jit arguments, hence traced
  got = _values_and_grads(lambda q, k, v: fn(q, k, v, *arrays), q, k, v, d_out, d_lse)
  reference = jax.jit(functools.partial(dense_reference, mask=layout.to_token_mask(),
                                        scale=1 / math.sqrt(32)))
  want = _values_and_grads(reference, q, k, v, d_out, d_lse)
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert np.isfinite(g).all() and np.isfinite(w).all(), f"{name}: NaN/inf, seed={seed}"
    err, tol = np.abs(g - w).max(), 2e-5 * max(1.0, np.abs(w).max())
    assert err <= tol, f"{name}: max abs err {err:.3g} > {tol:.3g}, seed={seed}"


# Layouts whose block lists are checked directly (transposition, reordering).
LIST_LAYOUTS = {
    "causal": lb.dense(200, block_q=32, causal=True),
    "bigbird": lb.bigbird(256, block_q=32, left=40, num_global=8, num_random_blocks=2,
                          num_heads=3),
    "mixture_with_empty": layouts.per_head([
        lb.sliding_window(160, block_q=32, left=20),
        lb.from_predicate(lb.Diagonal(40, 60), seq_q=160, block_q=32)]),
}


@pytest.mark.parametrize("layout", LIST_LAYOUTS.values(), ids=LIST_LAYOUTS.keys())
def test_transpose_block_lists_matches_host(layout):
  q_index, q_count, q_mask_id = jax.jit(common.transpose_block_lists, static_argnums=3)(
      layout.kv_index, layout.kv_count, layout.kv_mask_id, layout.num_kv_blocks)
  q_index, q_count, q_mask_id = map(np.asarray, (q_index, q_count, q_mask_id))
  np.testing.assert_array_equal(q_count, layout.q_count)
  width = layout.max_q
  valid = np.arange(width) < layout.q_count[..., None]
  np.testing.assert_array_equal(np.where(valid, q_index[..., :width], -1),
                                np.where(valid, layout.q_index, -1))
  np.testing.assert_array_equal(np.where(valid, q_mask_id[..., :width], -9),
                                np.where(valid, layout.q_mask_id, -9))
  # Padding rule: entries past the count repeat the last valid id (0 when empty).
  last = np.take_along_axis(q_index, np.maximum(q_count - 1, 0)[..., None], -1)
  pad = np.where(q_count[..., None] > 0, last, 0)
  padding = np.arange(q_index.shape[-1]) >= q_count[..., None]
  assert np.where(padding, q_index == pad, True).all()


@pytest.mark.parametrize("layout", LIST_LAYOUTS.values(), ids=LIST_LAYOUTS.keys())
def test_full_blocks_first_keeps_each_row_and_orders_it(layout):
  """Host (NumPy) and traced (jit) reorders agree; rows keep their (block, mask) pairs, FULL first."""
  views = [(layout.kv_index, layout.kv_count, layout.kv_mask_id),
           (layout.q_index, layout.q_count, layout.q_mask_id)]
  for index, count, mask_id in views:
    host = common.full_blocks_first(index, count, mask_id)
    assert all(isinstance(x, np.ndarray) for x in host)
    traced = jax.jit(common.full_blocks_first)(index, count, mask_id)
    for h, t in zip(host, traced):
      np.testing.assert_array_equal(h, np.asarray(t))
    new_index, new_mask, full = host
    np.testing.assert_array_equal(full, (np.where(np.arange(index.shape[-1]) < count[..., None],
                                                  mask_id, 0) < 0).sum(-1))
    for row in np.ndindex(*count.shape):
      n, f = count[row], full[row]
      assert sorted(zip(index[row][:n], mask_id[row][:n])) == sorted(
          zip(new_index[row][:n], new_mask[row][:n])), row
      assert (new_mask[row][:f] < 0).all() and (new_mask[row][f:n] >= 0).all(), row
      pad_to = new_index[row][n - 1] if n else 0
      assert (new_index[row][n:] == pad_to).all(), row


def test_interpret_outputs_start_poisoned():
  """The NaN checks above catch unwritten elements only if interpret mode poisons outputs."""
  def kernel(x_ref, o_ref):
    o_ref[:4] = x_ref[:4]  # leaves o_ref[4:] unwritten

  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                       interpret=True)(jnp.ones(8, jnp.float32))
  out = np.asarray(out)
  assert np.isfinite(out[:4]).all() and np.isnan(out[4:]).all()


def test_public_entry_point_and_attend_backend(seed):
  layout = lb.sliding_window(128, block_q=32, left=20)
  q, k, v, _, _ = _inputs(seed, 1, 128, 128, 2, 2, 16, jnp.float32)
  want = np.asarray(dense_reference(q, k, v, layout.to_token_mask(), 0.25)[0])
  # interpret=None -> True on CPU; scale=0.125 on 2q is the default 1/sqrt(16) on q.
  for out in (sa.attend(q, k, v, layout, backend="pallas"),
              api.block_sparse_attention(2 * q, k, v, layout, scale=0.125)):
    out = np.asarray(out)
    assert np.isfinite(out).all(), f"NaN/inf, seed={seed}"
    err = np.abs(out - want).max()
    assert err <= 2e-5, f"max abs err {err:.3g}, seed={seed}"


H100_SHARED_MEMORY, A100_SHARED_MEMORY = 232448, 166912


@pytest.mark.parametrize("itemsize, budget, sizes, want", [
    # bf16, D = 128: the measured defaults fit an H100 (3 x 2 x 128 x 128 x 2 B = 192 KiB).
    (2, H100_SHARED_MEMORY, None, dict(fwd_kv=128, num_stages=3, dq_kv=64, dkv_q=64)),
    # An A100 drops the forward to 2 stages rather than shrinking the tiles.
    (2, A100_SHARED_MEMORY, None, dict(fwd_kv=128, num_stages=2, dq_kv=64, dkv_q=64)),
    # f32, D = 128: 2 x 2 x 128 x 128 x 4 B = 256 KiB > 227 KiB, the H100 compile failure.
    (4, H100_SHARED_MEMORY, None, dict(fwd_kv=64, num_stages=2, dq_kv=64, dkv_q=64)),
    (4, 101376, None, dict(fwd_kv=32, num_stages=2, dq_kv=32, dkv_q=32)),  # sm86 / sm89
    # Explicit values are the user's call, even when they do not fit.
    (4, H100_SHARED_MEMORY, BlockSizes(block_kv=128), dict(fwd_kv=128, num_stages=2)),
    (2, A100_SHARED_MEMORY, BlockSizes(num_stages=3), dict(fwd_kv=64, num_stages=3)),
])
def test_gpu_defaults_fit_shared_memory(itemsize, budget, sizes, want):
  tiles = tiles_lib.resolve_tiles(sizes, layout_block_q=128, layout_block_kv=128, head_dim=128,
                               platform="gpu", interpret=False, itemsize=itemsize,
                               shared_memory_bytes=budget)
  assert {name: getattr(tiles, name) for name in want} == want
  for tile, stages in ((tiles.fwd_kv, tiles.num_stages), (tiles.dq_kv, tiles.num_stages_dq),
                       (tiles.dkv_q, tiles.num_stages_bwd)):
    assert stages * 2 * tile * 128 * itemsize <= budget or sizes is not None


def test_interpret_mode_keeps_gpu_defaults():
  tiles = tiles_lib.resolve_tiles(None, layout_block_q=128, layout_block_kv=128, head_dim=128,
                               platform="gpu", interpret=True, itemsize=4,
                               shared_memory_bytes=1024)
  assert (tiles.fwd_q, tiles.fwd_kv, tiles.dq_kv, tiles.dkv_q) == (128, 128, 64, 64)


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, shapes, match", [
    (dict(block_sizes=BlockSizes(block_q=24)), None, "block_q=24 must be a positive divisor"),
    (dict(block_sizes=BlockSizes(block_kv=24)), None, "block_kv=24 must be a positive divisor of "
                                                      "layout.block_kv=32"),
    (dict(block_sizes=BlockSizes(block_q_dq=0)), None, "block_q_dq=0 must be a positive divisor"),
    (dict(block_sizes=BlockSizes(block_kv_dkv=8), interpret=False), None, "powers of two >= 16"),
    (dict(block_sizes=BlockSizes(block_q=16), platform="tpu"), None, "TPU kernels use the layout"),
    (dict(platform="tpu", interpret=False), None, "multiples of 128"),
    (dict(platform="cuda"), None, "platform='cuda'"),
    (dict(), ((1, 64, 4, 16), (1, 64, 3, 16)), "multiple of num_kv_heads"),
    (dict(), ((1, 96, 4, 16), (1, 96, 2, 16)), "differ from the layout"),
    (dict(), ((1, 64, 3, 16), (1, 64, 1, 16)), "layout has 4 head rows"),
    (dict(block_sizes=BlockSizes(num_warps=3)), None, "num_warps=3"),
    (dict(block_sizes=BlockSizes(num_warps_bwd=32)), None, "num_warps_bwd=32"),
    (dict(block_sizes=BlockSizes(num_warps_dq=12)), None, "num_warps_dq=12"),
    (dict(block_sizes=BlockSizes(num_stages=0)), None, "num_stages=0"),
    (dict(block_sizes=BlockSizes(num_stages_bwd=0)), None, "num_stages_bwd=0"),
    (dict(block_sizes=BlockSizes(num_stages_dq=0)), None, "num_stages_dq=0"),
    (dict(block_sizes=BlockSizes(fused_dq=True), platform="tpu"), None, "fused_dq=True"),
    (dict(interpret=False), ((1, 64, 4, 24), (1, 64, 2, 24)), "head_dim=24"),
])
def test_bad_configuration_raises(kwargs, shapes, match):
  layout = layouts.per_head([lb.dense(64, block_q=32)] * 4)
  q_shape, kv_shape = shapes or ((1, 64, 4, 16), (1, 64, 2, 16))
  q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  with pytest.raises(ValueError, match=match):
    api.block_sparse_attention(q, k, k, layout, **kwargs)


F32 = jnp.float32


@pytest.mark.parametrize("q_shape, kv_shapes, dtypes, match", [
    ((64, 2, 16), ((1, 64, 2, 16),) * 2, (F32,) * 3, "must be rank 4"),
    ((1, 64, 2, 16), ((1, 64, 2, 16), (1, 64, 1, 16)), (F32,) * 3, "must have the same shape"),
    ((2, 64, 2, 16), ((1, 64, 2, 16),) * 2, (F32,) * 3, "must share batch and head_dim"),
    ((1, 64, 2, 16), ((1, 64, 2, 32),) * 2, (F32,) * 3, "must share batch and head_dim"),
    ((1, 64, 2, 16), ((1, 64, 2, 16),) * 2, (F32, jnp.bfloat16, jnp.bfloat16), "must be equal"),
    ((1, 64, 2, 16), ((1, 64, 2, 16),) * 2, (jnp.int32,) * 3, "dtype=int32"),
])
def test_bad_inputs_raise(q_shape, kv_shapes, dtypes, match):
  q, k, v = (jnp.zeros(shape, dtype) for shape, dtype in zip((q_shape, *kv_shapes), dtypes))
  with pytest.raises(ValueError, match=match):
    api.block_sparse_attention(q, k, v, lb.dense(64, block_q=32))


def _replace(layout, **fields):
  """The layout's contract fields as a plain namespace, some replaced."""
  return types.SimpleNamespace(**{**{f.name: getattr(layout, f.name)
                                     for f in dataclasses.fields(layout)}, **fields})


@pytest.mark.parametrize("change, match", [
    (lambda lay: dict(kv_mask_id=None), "missing field 'kv_mask_id'"),
    (lambda lay: dict(kv_count=lay.kv_count[:, :1]), r"kv_count \(1, 1\) do not match num_q_bl"),
    (lambda lay: dict(kv_index=lay.kv_index[None]), "do not match num_q_blocks"),
    (lambda lay: dict(kv_mask_id=lay.kv_mask_id[..., :1]), "kv_mask_id .* must match kv_index"),
    (lambda lay: dict(partial_masks=lay.partial_masks[:, :16]), "partial_masks .* must be"),
    (lambda lay: dict(q_index=lay.q_index[:, :1]), "q_index .* does not match"),
])
def test_layout_breaking_the_contract_raises(change, match):
  layout = lb.dense(64, block_q=32)
  x = jnp.zeros((1, 64, 2, 16))
  with pytest.raises(ValueError, match=match):
    api.block_sparse_attention(x, x, x, _replace(layout, **change(layout)))


@pytest.mark.parametrize("platform, head_dim, block_q, block_kv, dtype, match", [
    ("tpu", 64, 128, 256, jnp.bfloat16, None),
    ("tpu", 40, 128, 128, F32, None),  # TPU kernels take any head dim
    ("tpu", 64, 64, 64, jnp.bfloat16, r"layout block sizes \(64, 64\).*multiples of 128"),
    ("tpu", 64, 128, 64, F32, "multiples of 128"),
    ("gpu", 64, 64, 64, jnp.bfloat16, None),
    ("gpu", 16, 256, 32, jnp.float16, None),
    ("gpu", 96, 64, 64, jnp.bfloat16, "head_dim=96: the GPU kernel needs a power of two"),
    ("gpu", 8, 64, 64, F32, "head_dim=8"),
    ("gpu", 64, 8, 64, F32, r"BlockSizes.block_q=8 \(default\): Triton tiles must be powers"),
    ("gpu", 64, 64, 48, F32, r"block_kv=48 \(default\): Triton tiles"),
    ("gpu", 64, 192, 64, F32, r"block_q=128 \(default\) must be a positive divisor of layout"),
    ("gpu", 64, 64, 64, jnp.int32, "dtype=int32"),
])
def test_unsupported_reason_states_the_compiled_constraints(platform, head_dim, block_q, block_kv,
                                                            dtype, match):
  reason = tiles_lib.unsupported_reason(platform, head_dim, block_q, block_kv, dtype)
  if match is None:
    assert reason is None
  else:
    assert reason is not None and re.search(match, reason), reason
    with pytest.raises(ValueError, match=match):  # the same rule, raised by the kernel's tiles
      tiles_lib.resolve_tiles(None, layout_block_q=block_q, layout_block_kv=block_kv,
                           head_dim=head_dim, platform=platform, interpret=False, dtype=dtype)
  # Interpret mode keeps only the platform-neutral rules (divisors, dtype).
  lifted = tiles_lib.unsupported_reason(platform, head_dim, block_q, block_kv, dtype, interpret=True)
  assert lifted is None or "divisor" in lifted or "dtype" in lifted, lifted


@pytest.mark.parametrize("capability, want", [("9.0", 232448), ("10.3", 232448), ("8.6", 101376),
                                              ("8.0", 166912), ("13.7", 101376), ("", 101376)])
def test_gpu_shared_memory_by_compute_capability(monkeypatch, capability, want):
  device = types.SimpleNamespace(compute_capability=capability)
  monkeypatch.setattr(tiles_lib.jax, "devices", lambda backend=None: [device])
  assert tiles_lib.gpu_shared_memory_bytes() == want


def test_gpu_shared_memory_without_a_gpu_is_an_h100s():
  if jax.default_backend() != "cpu":
    pytest.skip("a GPU (or TPU) is attached")
  assert tiles_lib.gpu_shared_memory_bytes() == 232448
