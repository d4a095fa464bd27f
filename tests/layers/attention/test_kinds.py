"""Attention kinds: config validation, build_layout per kind (token masks), caching, per-layer bigbird seeds,
values and gradients under jit against the masked reference, plots."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.layers.attention import backends as sa, builders as lb, kinds as ap, layouts, plot as layout_plot
from sparseformer.layers.attention.config import SparseAttentionConfig

CONFIG = SparseAttentionConfig(block_size=8, window=6, stride=8, summary_tokens=2, num_global=3,
                               num_random_blocks=1, chunk_size=12, num_sinks=2, backend="xla")


def _mask(fn, seq):
  q, k = np.arange(seq)[:, None], np.arange(seq)[None, :]
  return np.broadcast_to(fn(q, k), (seq, seq))


def _window_mask(seq, window):
  return _mask(lambda q, k: (k <= q) & (q - k < window), seq)


def custom_factory(config, *, seq_len, num_heads):
  """Test factory: per-head mix of a window and dense causal."""
  geo = dict(seq_q=seq_len, block_q=config.block_size)
  return layouts.per_head([lb.sliding_window(left=3, **geo), lb.dense(**geo)] * (num_heads // 2))


@pytest.mark.parametrize("seq", [29, 64])
def test_each_kind_matches_its_token_mask(seq):
  causal = _mask(lambda q, k: k <= q, seq)
  window = _window_mask(seq, CONFIG.window)
  expected = {
      "global": causal,
      "local": window,
      "strided": causal & _mask(lambda q, k: (q - k <= 8) | ((q - k) % 8 == 0), seq),
      "fixed": causal & _mask(lambda q, k: (q // 8 == k // 8) | (k % 8 >= 6), seq),
      "longformer": causal & (window | _mask(lambda q, k: (k < 3) | (q < 3), seq)),
      "chunked": causal & _mask(lambda q, k: q // 12 == k // 12, seq),
      "sinks": causal & (window | _mask(lambda q, k: k < 2, seq)),
  }
  for kind, mask in expected.items():
    layout = ap.build_layout(kind, CONFIG, seq_len=seq, num_heads=4)
    np.testing.assert_array_equal(layout.to_token_mask()[0], mask, err_msg=kind)
  bigbird = ap.build_layout("bigbird", CONFIG, seq_len=seq, num_heads=4).to_token_mask()[0]
  assert (bigbird >= expected["longformer"]).all() and (bigbird <= causal).all()
  assert (bigbird > expected["longformer"]).any(), "no random block was added"


def test_local_dilated_and_per_head_bigbird():
  config = dataclasses.replace(CONFIG, dilation=3, window=4)
  layout = ap.build_layout("local", config, seq_len=30, num_heads=2)
  np.testing.assert_array_equal(layout.to_token_mask()[0], _mask(lambda q, k: (q - k) % 3 == 0, 30) &
                                _mask(lambda q, k: (k <= q) & (q - k <= 9), 30))
  config = dataclasses.replace(CONFIG, random_per_head=True, num_random_blocks=2)
  layout = ap.build_layout("bigbird", config, seq_len=80, num_heads=4)
  assert layout.num_heads == 4


def test_encoder_kinds():
  config = dataclasses.replace(CONFIG, causal=False, window=3, window_right=2)
  layout = ap.build_layout("local", config, seq_len=20, num_heads=1)
  np.testing.assert_array_equal(layout.to_token_mask()[0], _mask(lambda q, k: (q - k <= 2) & (k - q <= 2), 20))
  assert ap.build_layout("global", config, seq_len=20, num_heads=1).to_token_mask().all()


def test_custom_kind_by_path_and_registered_name():
  config = dataclasses.replace(CONFIG, layout_factory=f"{__name__}:custom_factory")
  ap.validate_kind("custom", config)
  layout = ap.build_layout("custom", config, seq_len=24, num_heads=4)
  assert layout.num_heads == 4
  ap.register_layout_factory("test_window", lambda config, *, seq_len, num_heads: lb.sliding_window(
      seq_len, block_q=config.block_size, left=2))
  layout = ap.build_layout("custom", dataclasses.replace(CONFIG, layout_factory="test_window"), seq_len=24,
                           num_heads=4)
  np.testing.assert_array_equal(layout.to_token_mask()[0], _window_mask(24, 3))


def test_build_layout_is_cached():
  a = ap.build_layout("local", CONFIG, seq_len=100, num_heads=4)
  b = ap.build_layout("local", dataclasses.replace(CONFIG), seq_len=100, num_heads=4)
  assert a is b
  assert ap.build_layout("local", CONFIG, seq_len=101, num_heads=4) is not a


def _assert_close(name, got, want, rtol):
  """Max error relative to the reference's largest entry, in NumPy f64; NaN anywhere fails."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert not np.isnan(want).any(), f"{name}: NaN in the reference"
  assert not np.isnan(got).any(), f"{name}: NaN at {np.argwhere(np.isnan(got))[:5].tolist()}"
  error = np.abs(got - want).max() / np.abs(want).max()
  assert error < rtol, f"{name}: max |got - want| / max |want| = {error:.2e}"


@pytest.mark.parametrize("kind", ap.ATTENTION_KINDS)
def test_every_kind_equals_the_masked_reference_under_jit(kind):
  seq, heads, kv_heads, dim = 37, 4, 2, 8
  config = dataclasses.replace(CONFIG, layout_factory=f"{__name__}:custom_factory") if kind == "custom" else CONFIG
  rng = np.random.default_rng(0)
  q, cotangent = (jnp.asarray(rng.standard_normal((2, seq, heads, dim), np.float32)) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((2, seq, kv_heads, dim), np.float32)) for _ in range(2))
  mask = jnp.asarray(ap.build_layout(kind, config, seq_len=seq, num_heads=heads).to_token_mask())

  def sparse(q, k, v):  # the layout is built at trace time, for the traced sequence length
    layout = ap.build_layout(kind, config, seq_len=q.shape[1], num_heads=q.shape[2])
    return sa.attend(q, k, v, layout, backend=config.backend)

  def values_and_grads(attention, transform):
    def loss(q, k, v):  # a random cotangent: permuted rows or heads change the gradients
      out = attention(q, k, v)
      return jnp.sum(out * cotangent), out
    (_, out), grads = transform(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)

  got = values_and_grads(sparse, jax.jit)
  want = values_and_grads(lambda q, k, v: sa.masked_attention(q, k, v, mask), lambda f: f)  # eager: no compile
  for name, got_array, want_array in zip(("out", "dq", "dk", "dv"), got, want):
    _assert_close(f"{kind} {name}", got_array, want_array, rtol=1e-5)


def test_bigbird_random_blocks_differ_by_layer_and_repeat_per_layer():
  layouts = [ap.build_layout("bigbird", CONFIG, seq_len=64, num_heads=4, layer=layer) for layer in (0, 1, 1)]
  tables = [layout.block_table()[0] for layout in layouts]
  assert (tables[0] != tables[1]).any(), "layers 0 and 1 drew the same random blocks"
  assert layouts[1] is layouts[2]
  geo = dict(block_q=CONFIG.block_size, left=CONFIG.window - 1, num_global=CONFIG.num_global,
             num_random_blocks=CONFIG.num_random_blocks)
  for layer, table in enumerate(tables[:2]):  # layer i is bigbird seeded by attention.seed + i
    np.testing.assert_array_equal(table, lb.bigbird(64, seed=CONFIG.seed + layer, **geo).block_table()[0])
  local = [ap.build_layout("local", CONFIG, seq_len=64, num_heads=4, layer=layer) for layer in (0, 3)]
  assert local[0] is local[1]  # kinds without randomness share one layout across layers
  with pytest.raises(ValueError, match="layer"):
    ap.build_layout("bigbird", CONFIG, seq_len=64, num_heads=4, layer=-1)


@pytest.mark.parametrize("field,value,match", [
    ("backend", "flash", "backend"), ("block_size", 0, "block_size"), ("window", 0, "window"),
    ("window_right", 2, "window_right"), ("summary_tokens", 200, "summary_tokens"), ("dilation", 0, "dilation"),
    ("num_random_blocks", -1, "num_random_blocks"), ("chunk_size", 0, "chunk_size"), ("seed", 1.5, "seed"),
])
def test_config_rejects_bad_fields(field, value, match):
  with pytest.raises(ValueError, match=match):
    SparseAttentionConfig(**{field: value})


def test_validate_kind_errors():
  with pytest.raises(ValueError, match="unknown"):
    ap.validate_kind("sliding", CONFIG)
  with pytest.raises(ValueError, match="layout_factory"):
    ap.validate_kind("custom", CONFIG)
  with pytest.raises(ValueError, match="cannot be imported"):
    ap.validate_kind("custom", dataclasses.replace(CONFIG, layout_factory="no_such_module:f"))
  with pytest.raises(ValueError, match="num_sinks"):
    ap.validate_kind("sinks", dataclasses.replace(CONFIG, num_sinks=0))
  with pytest.raises(ValueError, match="causal"):
    ap.validate_kind("sinks", dataclasses.replace(CONFIG, causal=False))
  with pytest.raises(ValueError, match="num_global"):
    ap.validate_kind("longformer", dataclasses.replace(CONFIG, num_global=0))


def test_plot_writes_png(tmp_path):
  import matplotlib
  original = matplotlib.get_backend()
  matplotlib.use("svg")  # any non-Agg backend: the plot must not switch it (notebook inline plots)
  try:
    path = tmp_path / "layouts.png"
    layout_plot.save_layouts_png([ap.build_layout(kind, CONFIG, seq_len=64, num_heads=2)
                                  for kind in ("local", "bigbird")], str(path))
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(original)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  big = tmp_path / "big.png"
  layout_plot.save_layout_png(lb.sliding_window(seq_q=8192, block_q=128, left=511), str(big))
  assert big.stat().st_size > 1000
