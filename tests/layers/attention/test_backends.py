"""`xla` backend against the dense `reference` (values and dq/dk/dv), plus an independent oracle;
the `auto` dispatch rule, `scale`, and the input errors of `attend`.

Inputs are seeded: fixed numbers or the `seed` fixture of tests/conftest.py (fresh under
`pytest -m fuzz`); hypothesis runs derandomized except in the `fuzz` twin.
"""

import functools
import logging
import types

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.layers.attention import backends as sa, builders as lb, layouts

TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 2e-2)}  # (values, grads), abs and rel


def random_inputs(seed, batch, seq_q, seq_kv, heads, kv_heads, dim, dtype):
  """Fresh normal q, k, v (in dtype) and an f32 output cotangent (NumPy RNG: no compile per shape)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  q, k, v = normal(batch, seq_q, heads, dim), normal(batch, seq_kv, kv_heads, dim), normal(batch, seq_kv, kv_heads, dim)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), normal(batch, seq_q, heads, dim)


@functools.partial(jax.jit, static_argnames=("layout",))
def _values_and_grads(q, k, v, cotangent, mask, layout=None):
  """(out, dq, dk, dv) in one compiled call: the xla backend under `layout`, or, with layout None,
  the reference under the token mask operand (one compile per shape, shared by every layout)."""
  if layout is None:
    fn = lambda q, k, v: sa.masked_attention(q, k, v, mask)
  else:
    fn = functools.partial(sa.attend, layout=layout, backend="xla")
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cotangent.astype(out.dtype)))


def values_and_grads(backend, q, k, v, cotangent, layout):
  if backend == "reference":
    results = _values_and_grads(q, k, v, cotangent, jnp.asarray(layout.to_token_mask()))
  else:
    assert backend == "xla"
    results = _values_and_grads(q, k, v, cotangent, None, layout=layout)
  return [np.asarray(x.astype(jnp.float32)) for x in results]


_reference = jax.jit(sa.masked_attention)


def assert_matches_reference(layout, *, heads=4, kv_heads=2, dim=16, batch=2, dtype=jnp.float32, seed=0):
  q, k, v, cotangent = random_inputs(seed, batch, layout.seq_q, layout.seq_kv, heads, kv_heads, dim, dtype)
  expected = values_and_grads("reference", q.astype(jnp.float32), k.astype(jnp.float32),
                              v.astype(jnp.float32), cotangent, layout)
  got = values_and_grads("xla", q, k, v, cotangent, layout)
  value_tol, grad_tol = TOL[dtype]
  for name, g, e, tol in zip(("out", "dq", "dk", "dv"), got, expected, (value_tol,) + (grad_tol,) * 3):
    assert np.isfinite(g).all(), f"{name}: non-finite values in xla output for {layout!r}"
    assert np.isfinite(e).all(), f"{name}: non-finite values in reference output"
    np.testing.assert_allclose(g, e, atol=tol, rtol=tol, err_msg=f"{name} differs for {layout!r}")


def _patterns(seq, block_q, block_kv, causal):
  geo = dict(seq_q=seq, block_q=block_q, block_kv=block_kv)
  out = [lb.dense(causal=causal, **geo), lb.strided(stride=7, causal=causal, **geo),
         lb.fixed(stride=16, summary=3, causal=causal, **geo), lb.global_tokens(num_global=5, causal=causal, **geo),
         lb.chunked(chunk=13, causal=causal, **geo),
         lb.bigbird(left=9, right=0 if causal else 4, num_global=3, num_random_blocks=2, causal=causal, **geo),
         lb.longformer(left=10, right=0 if causal else 3, num_global=2, causal=causal, **geo)]
  if causal:
    out += [lb.sliding_window(left=11, **geo), lb.dilated_window(left=4, dilation=3, **geo),
            lb.sinks(num_sinks=3, left=9, **geo)]
  else:
    out += [lb.sliding_window(left=6, right=9, **geo), lb.dilated_window(left=3, right=2, dilation=4, **geo)]
  return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq,block_q,block_kv,kv_heads", [(64, 16, 16, 1), (45, 8, 16, 2)])
def test_every_pattern_matches_reference(causal, seq, block_q, block_kv, kv_heads):
  # One head per pattern: every builder in one compiled call (compiles dominate the test time).
  patterns = _patterns(seq, block_q, block_kv, causal)
  patterns = patterns[:len(patterns) // kv_heads * kv_heads]
  assert_matches_reference(layouts.per_head(patterns), heads=len(patterns), kv_heads=kv_heads)


def test_shared_layouts_with_gqa():
  geo = dict(seq_q=39, block_q=8)
  assert_matches_reference(lb.sliding_window(left=7, **geo), heads=4, kv_heads=4)
  assert_matches_reference(lb.bigbird(left=8, num_global=4, num_random_blocks=1, **geo), heads=4, kv_heads=1)
  assert_matches_reference(lb.strided(stride=6, causal=False, **geo), heads=6, kv_heads=3)


def test_bucketed_query_blocks():
  # Global queries (block 0 sees every key block) next to short window rows: the xla path runs
  # them as separate buckets and must put the outputs back in query order.
  layout = lb.longformer(seq_q=70, block_q=8, left=4, right=3, num_global=8, causal=False)
  plan = sa._Plan(layout, 4, 2, 16)  # pylint: disable=protected-access
  assert len(plan.buckets) > 1 and plan.inverse is not None
  assert_matches_reference(layout)
  counts = np.array([7, 1, 3, 3, 2, 9, 9, 1])
  widths = sa._bucket_widths(counts)  # pylint: disable=protected-access
  assert widths[-1] == 9 and (widths[np.searchsorted(widths, counts)] >= counts).all()


def test_rectangular_sequences_and_blocks():
  layout = lb.sliding_window(seq_q=21, seq_kv=50, block_q=4, block_kv=16, left=3, right=20)
  assert_matches_reference(layout)
  assert_matches_reference(lb.dense(seq_q=21, seq_kv=50, block_q=16, block_kv=8, causal=False))


def test_bfloat16():
  layout = lb.bigbird(seq_q=90, block_q=16, left=16, num_global=16, num_random_blocks=1)
  assert_matches_reference(layout, dtype=jnp.bfloat16, dim=32)


def test_fully_masked_rows_give_zeros_and_finite_grads():
  geo = dict(seq_q=40, block_q=8)
  # Rows 0..12 see nothing (no key >= 13 lies in their causal window of 5); rows >= 13 see something.
  blind = layouts.intersection(lb.sliding_window(left=5, **geo),
                               lb.from_predicate(lb.keys_where(lambda k: k >= 13), **geo))
  # Query block 2 visits no block at all.
  block_mask = np.tril(np.ones((5, 5), bool))
  block_mask[2] = False
  empty_block = layouts.from_block_mask(block_mask, **geo)
  for layout in (blind, empty_block):
    rows = ~layout.to_token_mask()[0].any(-1)
    assert rows.any()
    q, k, v, cotangent = random_inputs(3, 1, 40, 40, 2, 1, 8, jnp.float32)
    results = {backend: values_and_grads(backend, q, k, v, cotangent, layout) for backend in ("reference", "xla")}
    for backend, (out, dq, dk, dv) in results.items():
      for x in (out, dq, dk, dv):
        assert np.isfinite(x).all(), backend
      assert (out[:, rows] == 0).all() and (dq[:, rows] == 0).all(), backend
      assert np.abs(out[:, ~rows]).min() > 0, backend
    for got, expected in zip(results["xla"], results["reference"]):
      np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@st.composite
def block_mask_cases(draw) -> dict:
  """A random block mask (per head or shared), maybe intersected with a window (token-level
  PARTIAL blocks), any lengths, GQA groups of 1 to 3: kwargs of `check_block_mask_case`."""
  block_q, block_kv = draw(st.sampled_from([4, 8])), draw(st.sampled_from([4, 8]))
  seq_q, seq_kv = draw(st.integers(1, 33)), draw(st.integers(1, 33))
  heads, kv_heads = draw(st.sampled_from([(2, 1), (2, 2), (3, 1)]))
  layout_heads = draw(st.sampled_from([1, heads]))
  nq, nk = -(-seq_q // block_q), -(-seq_kv // block_kv)
  window = draw(st.none() | st.tuples(st.integers(0, 12), st.integers(0, 5)))
  return dict(block_mask=draw(hnp.arrays(bool, (layout_heads, nq, nk))), seq_q=seq_q, seq_kv=seq_kv,
              block_q=block_q, block_kv=block_kv, heads=heads, kv_heads=kv_heads, window=window,
              seed=draw(st.integers(0, 2**16)))


def check_block_mask_case(block_mask, seq_q, seq_kv, block_q, block_kv, heads, kv_heads, window, seed):
  """xla vs reference under `block_mask` [Hl, nq, nk], intersected with sliding_window(left, right)
  when `window` is a (left, right) pair."""
  geo = dict(seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv)
  layout = layouts.from_block_mask(np.asarray(block_mask, bool), **geo)
  if window is not None:
    layout = layouts.intersection(layout, lb.sliding_window(left=window[0], right=window[1], **geo))
  assert_matches_reference(layout, heads=heads, kv_heads=kv_heads, dim=8, batch=1, seed=seed)


# Edge cases that 4 random examples rarely reach.
_NO_DIAGONAL = ~np.eye(5, dtype=bool) & np.tri(5, dtype=bool)  # [5, 5]: strictly-past blocks only
_NO_DIAGONAL[3] = False  # query block 3 lists no block at all
BLOCK_MASK_EDGE_CASES = {
    # Rows with no visible key: a window inside the (missing) diagonal block blinds rows 8i+3..7,
    # and a query block with an empty list; GQA group of 2 over a shared layout.
    "blind_rows_gqa": dict(block_mask=_NO_DIAGONAL[None], seq_q=40, seq_kv=40, block_q=8, block_kv=8,
                           heads=4, kv_heads=2, window=(3, 0), seed=1),
    # Per-head PARTIAL masks: every head lists different blocks under the window, GQA groups of 2,
    # rectangular and padded lengths.
    "per_head_partial_gqa": dict(block_mask=np.stack([np.tri(5, 4, dtype=bool), np.ones((5, 4), bool),
                                                      np.tri(5, 4, -1, dtype=bool), np.eye(5, 4, dtype=bool)]),
                                 seq_q=37, seq_kv=30, block_q=8, block_kv=8, heads=4, kv_heads=2,
                                 window=(9, 2), seed=2),
    # GQA group of 3, per-head lists with a fully masked head and rectangular blocks.
    "groups_of_three_empty_head": dict(block_mask=np.stack([np.zeros((3, 6), bool), np.ones((3, 6), bool),
                                                            np.eye(3, 6, dtype=bool)]),
                                       seq_q=23, seq_kv=22, block_q=8, block_kv=4, heads=3, kv_heads=1,
                                       window=None, seed=3),
}


@pytest.mark.parametrize("case", list(BLOCK_MASK_EDGE_CASES))
def test_block_mask_edge_cases(case):
  check_block_mask_case(**BLOCK_MASK_EDGE_CASES[case])


@hypothesis.settings(max_examples=4, deadline=None)  # derandomized by the conftest profile
@hypothesis.given(case=block_mask_cases())
def test_property_random_block_masks(case):
  check_block_mask_case(**case)


@pytest.mark.fuzz
@pytest.mark.slow
@hypothesis.settings(max_examples=80, deadline=None, derandomize=False)
@hypothesis.given(case=block_mask_cases())
def test_property_random_block_masks_fuzz(case):
  check_block_mask_case(**case)


def test_jit_any_length_and_backend_dispatch():
  for seq in (1, 130):
    layout = lb.sliding_window(seq_q=seq, block_q=32, left=40)
    q, k, v, _ = random_inputs(seq, 2, seq, seq, 4, 2, 8, jnp.float32)
    out = jax.jit(lambda q, k, v: sa.attend(q, k, v, layout))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = _reference(q, k, v, jnp.asarray(layout.to_token_mask()))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
  via_attend = jax.jit(lambda q, k, v: sa.attend(q, k, v, layout, backend="reference"))(q, k, v)
  np.testing.assert_array_equal(np.asarray(via_attend), np.asarray(expected))
  if jax.default_backend() == "cpu":
    assert sa.resolve_backend("auto") == "xla"
  with pytest.raises(ValueError, match="backend must be one of"):
    sa.resolve_backend("flash")
  with pytest.raises(ValueError, match="backend must be one of"):
    sa.attend(q, k, v, layout, backend="flash")
  with pytest.raises(ValueError, match="seq"):
    sa.attend(q[:, :5], k[:, :5], v[:, :5], layout)
  with pytest.raises(ValueError, match="multiple"):
    sa.attend(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), layout)


# ------------------------------------------------------------- auto dispatch, scale, errors
def _shapes(head_dim, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct((1, 256, 4, head_dim), dtype)


@pytest.mark.parametrize("platform, head_dim, block, want", [
    ("tpu", 64, 64, "xla"),  # every sparse preset's block_size=64: not a multiple of 128
    ("tpu", 64, 128, "pallas"),
    ("gpu", 96, 64, "xla"),  # head dim not a power of two
    ("gpu", 8, 64, "xla"),  # head dim < 16
    ("cuda", 64, 64, "pallas"),
    ("gpu", 64, 8, "xla"),  # 8-token tiles: below tl.dot's 16
    ("cpu", 64, 128, "xla"),
])
def test_auto_falls_back_to_xla_where_the_kernel_cannot_run(platform, head_dim, block, want):
  layout = lb.sliding_window(256, block_q=block, left=100)
  assert sa.resolve_backend("auto", _shapes(head_dim), layout, platform=platform) == want
  assert sa.resolve_backend("pallas", _shapes(head_dim), layout, platform=platform) == "pallas"
  assert sa.resolve_backend("auto", platform=platform) == ("xla" if platform == "cpu" else "pallas")


def test_auto_fallback_is_logged_once_per_reason(caplog, monkeypatch):
  monkeypatch.setattr(sa, "_reported_fallbacks", set())
  layout = lb.sliding_window(256, block_q=64, left=100)
  with caplog.at_level(logging.WARNING, logger=sa.__name__):
    for _ in range(3):
      sa.resolve_backend("auto", _shapes(64), layout, platform="tpu")
    sa.resolve_backend("auto", _shapes(96), layout, platform="gpu")
    sa.resolve_backend("auto", _shapes(96), layout, platform="gpu")
  messages = [record.getMessage() for record in caplog.records]
  assert len(messages) == 2, messages
  assert "multiples of 128" in messages[0] and "xla" in messages[0]
  assert "head_dim=96" in messages[1]


def jit_values_and_grads(fn, q, k, v, cotangent) -> list[np.ndarray]:
  """(out, dq, dk, dv) of fn(q, k, v) in NumPy, traced afresh (attend picks "auto" at trace time)."""
  def run(q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))
  return [np.asarray(x) for x in jax.jit(run)(q, k, v, cotangent)]


def test_auto_fallback_computes_the_xla_values(monkeypatch):
  """On a (pretend) TPU or GPU, auto under a configuration the kernel rejects (16-token blocks; head
  dim 24) runs xla and matches the reference, where an explicit backend="pallas" raises."""
  layout = lb.sliding_window(48, block_q=16, left=20)
  q, k, v, cotangent = random_inputs(5, 1, 48, 48, 2, 1, 24, jnp.float32)
  expected = values_and_grads("reference", q, k, v, cotangent, layout)
  monkeypatch.setattr(sa, "_reported_fallbacks", set())
  for platform, match in (("tpu", "multiples of 128"), ("gpu", "head_dim=24")):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert sa.resolve_backend("auto", q, layout) == "xla"
    got = jit_values_and_grads(lambda q, k, v: sa.attend(q, k, v, layout), q, k, v, cotangent)
    assert_close(got, expected, TOL[jnp.float32][1], f"auto on {platform}", seed=5)
    with pytest.raises(ValueError, match=match):
      sa.attend(q, k, v, layout, backend="pallas")


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_scale_multiplies_the_logits(backend, seed):
  """attend(q, scale=s) == attend(q * s * sqrt(D)) at the default 1/sqrt(D), values and grads."""
  layout = lb.bigbird(40, block_q=8, left=9, num_global=3, num_random_blocks=1, num_heads=2)
  q, k, v, cotangent = random_inputs(seed, 1, 40, 40, 2, 1, 16, jnp.float32)
  scale = 0.7  # 2.8x the default 0.25: a kernel that dropped it would be far off
  mask = jnp.asarray(layout.to_token_mask())
  want_fn = lambda q, k, v: sa.masked_attention(q * (scale * 4.0), k, v, mask)
  got_fn = lambda q, k, v: sa.attend(q, k, v, layout, backend=backend, scale=scale)
  got = jit_values_and_grads(got_fn, q, k, v, cotangent)
  assert_close(got, jit_values_and_grads(want_fn, q, k, v, cotangent), 2e-5, f"scale on {backend}", seed=seed)
  default = np.asarray(_reference(q, k, v, mask))  # the default scale: far from scale=0.7
  assert np.abs(default - got[0]).max() > 1e-2, f"scale had no effect (seed {seed})"


@pytest.mark.parametrize("q_shape, kv_shape, match", [
    ((40, 2, 16), (1, 40, 1, 16), r"expected q \[B, T, H, D\]"),
    ((1, 40, 2, 16), (1, 40, 1, 16, 1), r"expected q \[B, T, H, D\]"),
    ((2, 40, 2, 16), (1, 40, 1, 16), "differ in batch or head dim"),
    ((1, 40, 2, 16), (1, 40, 1, 8), "differ in batch or head dim"),
    ((1, 40, 3, 16), (1, 40, 2, 16), "must be a multiple of num_kv_heads"),
    ((1, 32, 2, 16), (1, 32, 1, 16), "layout built for seq 40x40"),
    ((1, 40, 3, 16), (1, 40, 1, 16), "layout has 2 heads; it must have 1 or num_heads=3"),
])
@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_attend_rejects_inconsistent_inputs(q_shape, kv_shape, match, backend):
  layout = layouts.per_head([lb.sliding_window(40, block_q=8, left=5)] * 2)
  q, k = np.zeros(q_shape, np.float32), np.zeros(kv_shape, np.float32)
  with pytest.raises(ValueError, match=match):
    sa.attend(q, k, k, layout, backend=backend)


# ------------------------------------------------------------- independent oracle: splash
def _splash_vs_xla(name, with_grads):
  splash = pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  kernel_lib, mask_lib = splash.splash_attention_kernel, splash.splash_attention_mask
  seq, heads, dim = 256, 2, 32
  shape = (seq, seq)
  masks = {"causal": (mask_lib.CausalMask(shape), lb.dense(seq, block_q=64)),
           "local": (mask_lib.LocalMask(shape, (40, 0), 0), lb.sliding_window(seq, block_q=64, left=40)),
           "chunked": (mask_lib.ChunkedCausalMask(shape, 100), lb.chunked(seq, block_q=32, block_kv=64, chunk=100))}
  splash_mask, layout = masks[name]
  blocks = dict(block_q=128, block_kv=128, block_kv_compute=128, block_q_dkv=128, block_kv_dkv=128,
                block_kv_dkv_compute=128, block_q_dq=128, block_kv_dq=128)
  kernel = kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([splash_mask] * heads),
                                      block_sizes=kernel_lib.BlockSizes(**blocks), head_shards=1,
                                      q_seq_shards=1, interpret=True)
  q, k, v, cotangent = random_inputs(11, 1, seq, seq, heads, heads, dim, jnp.float32)
  scale = dim**-0.5
  # splash takes [H, S, D] and does not scale the logits.
  to_hsd = lambda x: x[0].transpose(1, 0, 2)
  oracle = lambda q, k, v: kernel(to_hsd(q) * scale, to_hsd(k), to_hsd(v)).transpose(1, 0, 2)[None]
  ours = lambda q, k, v: sa.attend(q, k, v, layout, backend="xla")
  expected, got = oracle(q, k, v), ours(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
  if with_grads:
    expected_grads = jax.vjp(oracle, q, k, v)[1](cotangent)
    got_grads = jax.vjp(ours, q, k, v)[1](cotangent)
    for g, e in zip(got_grads, expected_grads):
      assert np.isfinite(np.asarray(g)).all()
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["causal", "local", "chunked"])
def test_splash_oracle_values(name):
  _splash_vs_xla(name, with_grads=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal", "local", "chunked"])
def test_splash_oracle_grads(name):
  _splash_vs_xla(name, with_grads=True)


# ------------------------------------------------ traced layouts (lists built inside jit)
def routed_layout(geometry: tuple, kv_index, kv_count, kv_mask_id, partial_masks):
  """A content-routed layout: the contract fields, lists as (traced) jax arrays, no transposed view."""
  seq_q, seq_kv, block_q, block_kv = geometry
  return types.SimpleNamespace(seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv, kv_index=kv_index,
                               kv_count=kv_count, kv_mask_id=kv_mask_id, partial_masks=partial_masks)


def traced_values_and_grads(q, k, v, cotangent, layout, *, backend="xla", traced_masks=True):
  """(out, dq, dk, dv) of `attend` under `layout` whose lists (and partial_masks if `traced_masks`)
  go through jax.jit as arguments, so the backend sees tracers."""
  geometry = (layout.seq_q, layout.seq_kv, layout.block_q, layout.block_kv)

  def run(q, k, v, cotangent, kv_index, kv_count, kv_mask_id, *masks):
    assert isinstance(kv_index, jax.core.Tracer)
    routed = routed_layout(geometry, kv_index, kv_count, kv_mask_id, *(masks or (layout.partial_masks,)))
    out, vjp = jax.vjp(lambda q, k, v: sa.attend(q, k, v, routed, backend=backend), q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))

  lists = [jnp.asarray(x) for x in (layout.kv_index, layout.kv_count, layout.kv_mask_id)]
  masks = [jnp.asarray(layout.partial_masks)] if traced_masks else []
  return [np.asarray(x.astype(jnp.float32)) for x in jax.jit(run)(q, k, v, cotangent, *lists, *masks)]


def assert_close(got, expected, tol, what, *, seed):
  """NumPy comparison of (out, dq, dk, dv) lists: no NaN / inf on either side, max error <= tol * scale."""
  for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
    assert not np.isnan(g).any() and np.isfinite(g).all(), f"{what}: {name} not finite (seed {seed})"
    assert not np.isnan(e).any() and np.isfinite(e).all(), f"{what}: expected {name} not finite (seed {seed})"
    error = float(np.max(np.abs(g - e), initial=0.0))
    bound = tol * max(1.0, float(np.max(np.abs(e), initial=0.0)))
    assert error <= bound, f"{what}: {name} max error {error:.3g} > {bound:.3g} (seed {seed})"


def _mixture_with_blind_rows(seq=40, block_q=8):
  geo = dict(seq_q=seq, block_q=block_q)
  blind = layouts.intersection(lb.sliding_window(left=5, **geo), lb.from_predicate(lb.keys_where(lambda k: k >= 13), **geo))
  block_mask = np.tril(np.ones((5, 5), bool))
  block_mask[2] = False  # query block 2 visits no block at all
  return layouts.per_head([blind, layouts.from_block_mask(block_mask, **geo), lb.sliding_window(left=9, **geo),
                           lb.dense(causal=False, **geo)])


TRACED_CASES = {  # name: (layout, heads, kv_heads)
    "causal": (lb.dense(64, block_q=16), 2, 2),
    "sliding_window": (lb.sliding_window(72, block_q=8, left=13), 2, 1),
    "bigbird_per_head": (lb.bigbird(64, block_q=8, left=9, num_global=3, num_random_blocks=2, num_heads=4), 4, 2),
    "mixture_blind_rows": (_mixture_with_blind_rows(), 4, 4),
    "padded_rectangular": (lb.sliding_window(seq_q=21, seq_kv=50, block_q=8, block_kv=16, left=3, right=20), 2, 1),
    "gqa_shared": (lb.strided(45, block_q=8, block_kv=16, stride=6, causal=False), 6, 2),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(TRACED_CASES))
def test_traced_layout_matches_host_layout_and_reference(case, dtype, seed):
  layout, heads, kv_heads = TRACED_CASES[case]
  q, k, v, cotangent = random_inputs(seed, 2, layout.seq_q, layout.seq_kv, heads, kv_heads, 16, dtype)
  expected = values_and_grads("reference", *(x.astype(jnp.float32) for x in (q, k, v)), cotangent, layout)
  host = values_and_grads("xla", q, k, v, cotangent, layout)
  traced = traced_values_and_grads(q, k, v, cotangent, layout, traced_masks=case != "causal")
  value_tol, grad_tol = TOL[dtype]
  # Same math, a different bucket width: host and traced differ by summation order only.
  assert_close(traced, host, 1e-5 if dtype == jnp.float32 else 1e-2, f"{case}: traced vs host", seed=seed)
  assert_close(traced, expected, max(value_tol, grad_tol), f"{case}: traced vs reference", seed=seed)
  if case == "mixture_blind_rows":
    blind = ~layout.to_token_mask().any(-1)  # [Hl, T]
    out = traced[0].transpose(0, 2, 1, 3)  # [B, H, T, D]
    assert blind.any() and (out[:, blind] == 0).all()


def test_traced_layout_through_auto_and_reference_backends(seed):
  layout, heads, kv_heads = TRACED_CASES["bigbird_per_head"]
  q, k, v, cotangent = random_inputs(seed, 1, layout.seq_q, layout.seq_kv, heads, kv_heads, 8, jnp.float32)
  expected = values_and_grads("reference", q, k, v, cotangent, layout)
  for backend in ("auto", "reference"):  # auto is xla on CPU, pallas on an accelerator
    got = traced_values_and_grads(q, k, v, cotangent, layout, backend=backend)
    assert_close(got, expected, TOL[jnp.float32][1], f"backend {backend}", seed=seed)
  lists = [jnp.asarray(x) for x in (layout.kv_index, layout.kv_count, layout.kv_mask_id, layout.partial_masks)]
  geometry = (layout.seq_q, layout.seq_kv, layout.block_q, layout.block_kv)
  mask = jax.jit(lambda *lists: sa.token_mask(routed_layout(geometry, *lists)))(*lists)
  np.testing.assert_array_equal(np.asarray(mask), layout.to_token_mask())


def test_traced_layout_errors_name_the_field():
  layout, heads, kv_heads = TRACED_CASES["sliding_window"]
  q, k, v, _ = random_inputs(0, 1, layout.seq_q, layout.seq_kv, heads, kv_heads, 8, jnp.float32)
  lists = [jnp.asarray(x) for x in (layout.kv_index, layout.kv_count, layout.kv_mask_id, layout.partial_masks)]
  good = routed_layout((layout.seq_q, layout.seq_kv, layout.block_q, layout.block_kv), *lists)
  with pytest.raises(ValueError, match="seq_q must be a positive Python int"):
    jax.jit(lambda seq: sa.attend(q, k, v, types.SimpleNamespace(**{**vars(good), "seq_q": seq})))(layout.seq_q)
  with pytest.raises(ValueError, match="no field 'kv_mask_id'"):
    sa.attend(q, k, v, types.SimpleNamespace(**{**vars(good), "kv_mask_id": None}))
  with pytest.raises(ValueError, match="kv_count"):
    sa.attend(q, k, v, types.SimpleNamespace(**{**vars(good), "kv_count": lists[1][:, :-1]}))
  with pytest.raises(ValueError, match="partial_masks"):
    sa.attend(q, k, v, types.SimpleNamespace(**{**vars(good), "partial_masks": lists[3][:, :4]}))


def moba_layout(q, k, *, block: int, top_k: int):
  """Tiny MoBA-like router (inside jit): per head, each query block attends its causal diagonal block
  (PARTIAL, a lower-triangular tile) and the `top_k` earlier key blocks whose mean-pooled key best
  matches the block's mean-pooled query (FULL). q [1, T, H, D], k [1, T, KVH, D]; T % block == 0."""
  seq, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
  nq = seq // block
  q_mean = q[0].reshape(nq, block, heads, -1).mean(1)  # [nq, H, D]
  k_mean = jnp.repeat(k[0].reshape(nq, block, kv_heads, -1).mean(1), heads // kv_heads, axis=1)
  scores = jnp.einsum("ihd,jhd->hij", q_mean, k_mean)
  rows, cols = jnp.arange(nq)[:, None], jnp.arange(nq)[None, :]
  _, picked = jax.lax.top_k(jnp.where(cols < rows, scores, -jnp.inf), top_k)  # [H, nq, top_k]
  num_past = jnp.minimum(jnp.arange(nq), top_k)  # only blocks before the diagonal are eligible
  picked = jnp.where(jnp.arange(top_k) < num_past[:, None], picked, nq)  # nq: not picked
  kv_index = jnp.sort(jnp.concatenate([picked, jnp.broadcast_to(rows, (heads, nq, 1))], -1), -1)
  kv_count = jnp.broadcast_to(num_past + 1, (heads, nq)).astype(jnp.int32)
  last = jnp.take_along_axis(kv_index, kv_count[..., None] - 1, -1)  # the diagonal block
  kv_index = jnp.where(kv_index == nq, last, kv_index).astype(jnp.int32)  # padding repeats the last id
  kv_mask_id = jnp.where(kv_index == rows[None], 0, -1).astype(jnp.int32)
  partial_masks = jnp.tril(jnp.ones((1, block, block), bool))
  return routed_layout((seq, seq, block, block), kv_index, kv_count, kv_mask_id, partial_masks)


def test_top_k_routed_layout_matches_reference(seed):
  block, top_k, heads, kv_heads = 16, 2, 4, 2
  q, k, v, cotangent = random_inputs(seed, 1, 128, 128, heads, kv_heads, 16, jnp.float32)

  @jax.jit
  def routed_attention(q, k, v, cotangent):
    layout = moba_layout(q, k, block=block, top_k=top_k)
    out, vjp = jax.vjp(lambda q, k, v: sa.attend(q, k, v, layout, backend="xla"), q, k, v)
    return (out, *vjp(cotangent)), (layout.kv_index, layout.kv_count)

  got, (kv_index, kv_count) = routed_attention(q, k, v, cotangent)
  kv_index, kv_count = np.asarray(kv_index), np.asarray(kv_count)
  # The token mask of the same selection, in NumPy: FULL earlier blocks, causal diagonal block.
  mask = np.zeros((heads, 128, 128), bool)
  tril = np.tril(np.ones((block, block), bool))
  for h, i in np.ndindex(kv_count.shape):
    for j in kv_index[h, i, :kv_count[h, i]]:
      assert j <= i
      mask[h, i * block:(i + 1) * block, j * block:(j + 1) * block] = tril if j == i else True
  assert not (mask == np.tril(np.ones((128, 128), bool))).all(), "the router must drop some blocks"
  assert len({kv_index[h, -1, :kv_count[h, -1]].tobytes() for h in range(heads)}) > 1, "heads should differ"
  expected = values_and_grads("reference", q, k, v, cotangent,
                              types.SimpleNamespace(to_token_mask=lambda: mask))
  assert_close([np.asarray(x) for x in got], expected, TOL[jnp.float32][1], "top-k routed", seed=seed)


@pytest.mark.parametrize("seq", [64, 50])  # a multiple of the block (no padding) and not
@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_numpy_inputs_any_length(backend, seq):
  """Every backend takes NumPy q, k, v eagerly (64 = 4 blocks of 16 once failed in lax.map)."""
  layout = lb.sliding_window(seq, block_q=16, left=20)
  rng = np.random.default_rng(seq)
  q, k, v = (rng.standard_normal((1, seq, 2, 8), np.float32) for _ in range(3))
  got = np.asarray(sa.attend(q, k, v, layout, backend=backend))
  want = np.asarray(sa.masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                        jnp.asarray(layout.to_token_mask())))
  assert not np.isnan(got).any()
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
