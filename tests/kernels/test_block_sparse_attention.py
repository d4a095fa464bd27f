"""Pallas block-sparse flash attention (interpret mode) against a dense masked-softmax reference.

Both kernel families run here: the GPU (Triton-style, `platform="gpu"`) and the TPU
(Mosaic-style, scalar prefetch, `platform="tpu"`) kernels, in interpret mode. Interpret mode
starts every output buffer as NaN (checked by `test_interpret_outputs_start_poisoned`), so the
`isfinite` checks below fail on any output element a kernel forgets to write.

Each case compiles one fwd+bwd program (~10 s on 2 cores), so the cases are chosen to cover:
local, causal, BigBird (per-head random), strided, per-head mixtures, fully masked rows and
empty query blocks, padded lengths, GQA/MQA, f32/bf16, head dims 32/64/128, sub-tiled GPU
loops, traced layouts; values, LSE and dq/dk/dv with cotangents on both out and lse.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from sparseformer.kernels.block_sparse_attention import api, common
from sparseformer.kernels.block_sparse_attention import BlockSizes
from sparseformer.layers.attention import backends as sa, builders as lb, layouts

# (abs tolerance on values/lse, tolerance on grads relative to the largest reference grad)
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}
SEED = int(np.random.SeedSequence().entropy % (2**31))  # fresh inputs every run; printed on failure


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


def check_against_reference(layout, *, platform, heads=4, kv_heads=2, dim=32, batch=1,
                            dtype=jnp.float32, block_sizes=None, seed=SEED):
  q, k, v, d_out, d_lse = _inputs(seed, batch, layout.seq_q, layout.seq_kv, heads, kv_heads, dim,
                                  dtype)
  scale = 1.0 / math.sqrt(dim)
  mask = layout.to_token_mask()
  kernel = jax.jit(functools.partial(api.block_sparse_attention_with_lse, layout=layout,
                                     platform=platform, interpret=True, block_sizes=block_sizes))
  reference = jax.jit(functools.partial(dense_reference, mask=mask, scale=scale))
  got = _values_and_grads(kernel, q, k, v, d_out, d_lse)
  want = _values_and_grads(reference, q, k, v, d_out, d_lse)
  value_tol, grad_tol = TOL[dtype]
  where = f"layout={layout!r} platform={platform} dtype={dtype.__name__} seed={seed}"
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape, (name, g.shape, w.shape)
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
    # name: (layout builder, kwargs of check_against_reference)
    "causal_gqa_subtiles_f32": (lambda: lb.dense(256, block_q=32, causal=True),
                                dict(platform="gpu", block_sizes=SUB_TILES, batch=2)),
    "local_bf16_d64": (lambda: lb.sliding_window(256, block_q=32, left=45),
                       dict(platform="gpu", dtype=jnp.bfloat16, dim=64)),
    "bigbird_per_head_mqa": (lambda: lb.bigbird(256, block_q=32, left=40, num_global=8,
                                                num_random_blocks=2, num_heads=4, seed=SEED % 1000),
                             dict(platform="gpu", kv_heads=1)),
    "strided_noncausal_padded": (lambda: lb.strided(200, block_q=32, stride=24, causal=False,
                                                    seq_kv=150),
                                 dict(platform="gpu", block_sizes=SUB_TILES)),
    "per_head_mixture_bf16": (lambda: layouts.per_head([
        lb.sliding_window(256, block_q=32, left=31), lb.dense(256, block_q=32),
        lb.strided(256, block_q=32, stride=40), lb.global_tokens(256, block_q=32, num_global=5)]),
                              dict(platform="gpu", dtype=jnp.bfloat16)),
    "fully_masked_rows": (lambda: _fully_masked_layout(160, 32), dict(platform="gpu")),
    # dQ summed by atomic adds inside the dK/dV kernel: GQA group loop, sub-tiles, masked rows.
    "fused_dq_gqa_subtiles_masked_rows": (lambda: _fully_masked_layout(160, 32), dict(
        platform="gpu", block_sizes=dataclasses.replace(SUB_TILES, block_q_dkv=32, fused_dq=True))),
    # The non-default loop structures: forward in FULL-first split loops, backward in one loop
    # branching on each block's kind.
    "swapped_loops_mixture_masked_rows": (lambda: _fully_masked_layout(160, 32), dict(
        platform="gpu", block_sizes=dataclasses.replace(SUB_TILES, separate_partial=True,
                                                        separate_partial_bwd=False))),
    "tpu_causal_gqa_d128": (lambda: lb.dense(256, block_q=64, causal=True),
                            dict(platform="tpu", dim=128)),
    "tpu_mixture_masked_rows_bf16": (lambda: _fully_masked_layout(160, 32),
                                     dict(platform="tpu", dtype=jnp.bfloat16, heads=4, kv_heads=2)),
    "tpu_bigbird_padded": (lambda: lb.bigbird(200, block_q=32, left=30, num_global=4,
                                              num_random_blocks=1, seed=SEED % 1000),
                           dict(platform="tpu", heads=2, kv_heads=1, batch=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(case):
  build, kwargs = CASES[case]
  check_against_reference(build(), **kwargs)


def test_traced_layout_matches_host_layout():
  """kv_index / kv_count / kv_mask_id as traced arrays: transposed view computed on device."""
  layout = lb.bigbird(192, block_q=32, left=40, num_global=4, num_random_blocks=2, num_heads=2,
                      seed=SEED % 1000)
  q, k, v, d_out, d_lse = _inputs(SEED, 1, 192, 192, 2, 1, 32, jnp.float32)

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
    assert np.isfinite(g).all(), name
    np.testing.assert_allclose(g, w, atol=2e-5 * max(1.0, np.abs(w).max()), err_msg=name)


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


def test_public_entry_point_and_attend_backend():
  layout = lb.sliding_window(128, block_q=32, left=20)
  q, k, v, _, _ = _inputs(SEED, 1, 128, 128, 2, 2, 16, jnp.float32)
  out = np.asarray(sa.attend(q, k, v, layout, backend="pallas"))  # interpret=None -> True on CPU
  want = np.asarray(dense_reference(q, k, v, layout.to_token_mask(), 0.25)[0])
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, want, atol=2e-5)


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
  tiles = common.resolve_tiles(sizes, layout_block_q=128, layout_block_kv=128, head_dim=128,
                               platform="gpu", interpret=False, itemsize=itemsize,
                               shared_memory_bytes=budget)
  assert {name: getattr(tiles, name) for name in want} == want
  for tile, stages in ((tiles.fwd_kv, tiles.num_stages), (tiles.dq_kv, tiles.num_stages_dq),
                       (tiles.dkv_q, tiles.num_stages_bwd)):
    assert stages * 2 * tile * 128 * itemsize <= budget or sizes is not None


def test_interpret_mode_keeps_gpu_defaults():
  tiles = common.resolve_tiles(None, layout_block_q=128, layout_block_kv=128, head_dim=128,
                               platform="gpu", interpret=True, itemsize=4,
                               shared_memory_bytes=1024)
  assert (tiles.fwd_q, tiles.fwd_kv, tiles.dq_kv, tiles.dkv_q) == (128, 128, 64, 64)


# ---------------------------------------------------------------------------------------------
# Configuration errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, shapes, match", [
    (dict(block_sizes=BlockSizes(block_q=24)), None, "block_q=24 must be a positive divisor"),
    (dict(block_sizes=BlockSizes(block_kv_dkv=8), interpret=False), None, "powers of two >= 16"),
    (dict(block_sizes=BlockSizes(block_q=16), platform="tpu"), None, "TPU kernels use the layout"),
    (dict(platform="tpu", interpret=False), None, "multiples of 128"),
    (dict(platform="cuda"), None, "platform='cuda'"),
    (dict(), ((1, 64, 4, 16), (1, 64, 3, 16)), "multiple of num_kv_heads"),
    (dict(), ((1, 96, 4, 16), (1, 96, 2, 16)), "differ from the layout"),
    (dict(), ((1, 64, 3, 16), (1, 64, 1, 16)), "layout has 4 head rows"),
    (dict(block_sizes=BlockSizes(num_warps=3)), None, "num_warps=3"),
    (dict(block_sizes=BlockSizes(num_warps_dq=12)), None, "num_warps_dq=12"),
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


def test_layout_without_contract_field_raises():
  layout = lb.dense(64, block_q=32)
  broken = types.SimpleNamespace(**{f.name: getattr(layout, f.name)
                                    for f in dataclasses.fields(layout)})
  broken.kv_mask_id = None
  with pytest.raises(ValueError, match="kv_mask_id"):
    api.block_sparse_attention(jnp.zeros((1, 64, 2, 16)), jnp.zeros((1, 64, 2, 16)),
                               jnp.zeros((1, 64, 2, 16)), broken)


@pytest.mark.parametrize("capability, want", [("9.0", 232448), ("10.3", 232448), ("8.6", 101376),
                                              ("8.0", 166912), ("13.7", 101376), ("", 101376)])
def test_gpu_shared_memory_by_compute_capability(monkeypatch, capability, want):
  device = types.SimpleNamespace(compute_capability=capability)
  monkeypatch.setattr(common.jax, "devices", lambda backend=None: [device])
  assert common.gpu_shared_memory_bytes() == want


def test_gpu_shared_memory_without_a_gpu_is_an_h100s():
  if jax.default_backend() != "cpu":
    pytest.skip("a GPU (or TPU) is attached")
  assert common.gpu_shared_memory_bytes() == 232448
