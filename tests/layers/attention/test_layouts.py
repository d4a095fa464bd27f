"""BlockLayout contract and every pattern builder against hand-written token masks."""

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest

from sparseformer.layers.attention import builders as lb, layouts


def check_contract(layout: layouts.BlockLayout) -> None:
  """Every rule of notes/layout_contract.md, checked from the list arrays alone."""
  hl, nq, nk = layout.num_heads, layout.num_q_blocks, layout.num_kv_blocks
  bq, bk, pm = layout.block_q, layout.block_kv, layout.partial_masks
  assert pm.dtype == bool and pm.ndim == 3 and len(pm) >= 1 and pm.shape[1:] == (bq, bk)
  if len(pm) > 1 or (layout.kv_mask_id >= 0).any():
    flat = pm.reshape(len(pm), -1)
    assert len({row.tobytes() for row in flat}) == len(pm), "partial masks not deduplicated"
  for index, count, mask_id, n_rows, n_cols in (
      (layout.kv_index, layout.kv_count, layout.kv_mask_id, nq, nk),
      (layout.q_index, layout.q_count, layout.q_mask_id, nk, nq)):
    assert index.dtype == count.dtype == mask_id.dtype == np.int32
    assert count.shape == (hl, n_rows) and index.shape[:2] == (hl, n_rows)
    assert (index >= 0).all() and (index < n_cols).all() and (mask_id >= -1).all() and (mask_id < len(pm)).all()
    for h, r in itertools.product(range(hl), range(n_rows)):
      c = count[h, r]
      assert (np.diff(index[h, r, :c]) > 0).all(), "block ids not strictly ascending"
      assert (index[h, r, c:] == (index[h, r, c - 1] if c else 0)).all(), "bad index padding"
  # Both views describe the same (block, mask id) set.
  fwd = {(h, i, int(layout.kv_index[h, i, m]), int(layout.kv_mask_id[h, i, m]))
         for h in range(hl) for i in range(nq) for m in range(layout.kv_count[h, i])}
  bwd = {(h, int(layout.q_index[h, j, m]), j, int(layout.q_mask_id[h, j, m]))
         for h in range(hl) for j in range(nk) for m in range(layout.q_count[h, j])}
  assert fwd == bwd
  # Token mask through the contract's formula, on the padded grid.
  padded = np.zeros((hl, nq * bq, nk * bk), bool)
  for h, i, j, mid in fwd:
    padded[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] = True if mid == -1 else pm[mid]
  assert not padded[:, :, layout.seq_kv:].any(), "a padded key is visible"
  assert (padded[:, layout.seq_q:] == padded[:, layout.seq_q - 1:layout.seq_q]).all(), \
      "padded query rows must copy the last real row"
  np.testing.assert_array_equal(padded[:, :layout.seq_q, :layout.seq_kv], layout.to_token_mask())
  for h, i, j, mid in fwd:  # FULL really full, PARTIAL really partial (over real rows)
    rows = slice(i * bq, min((i + 1) * bq, layout.seq_q))
    tile = padded[h, rows, j * bk:(j + 1) * bk]
    assert tile.any() and (tile.all() == (mid == -1))


def token_mask(fn, seq_q, seq_kv=None):
  seq_kv = seq_q if seq_kv is None else seq_kv
  return np.array([[bool(fn(q, k)) for k in range(seq_kv)] for q in range(seq_q)])


def assert_mask(layout, expected):
  check_contract(layout)
  got = layout.to_token_mask()
  expected = np.broadcast_to(expected, got.shape)
  if not np.array_equal(got, expected):
    bad = np.argwhere(got != expected)[:5]
    raise AssertionError(f"{layout!r}: token masks differ at (h, q, k) {bad.tolist()}")


GEOMETRIES = [dict(seq_q=37, block_q=8), dict(seq_q=32, block_q=8), dict(seq_q=29, block_q=4, block_kv=8),
              dict(seq_q=41, block_q=16, block_kv=4)]


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_dense(geo, causal):
  assert_mask(lb.dense(causal=causal, **geo), token_mask(lambda q, k: k <= q or not causal, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("left,right", [(0, 0), (3, 0), (8, 0), (9, 2), (5, 7)])
def test_sliding_window_exact_edges(geo, left, right):
  layout = lb.sliding_window(left=left, right=right, **geo)
  assert_mask(layout, token_mask(lambda q, k: q - left <= k <= q + right, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES[:3])
@pytest.mark.parametrize("left,right,dilation", [(3, 0, 2), (4, 1, 3), (2, 2, 5)])
def test_dilated_window(geo, left, right, dilation):
  layout = lb.dilated_window(left=left, right=right, dilation=dilation, **geo)
  allowed = {-i * dilation for i in range(right + 1)} | {i * dilation for i in range(left + 1)}
  assert_mask(layout, token_mask(lambda q, k: q - k in allowed, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_strided(geo, causal):
  stride = 6
  if causal:
    expected = lambda q, k: k <= q and (q - k <= stride or (q - k) % stride == 0)
  else:
    expected = lambda q, k: abs(q - k) <= stride or (q - k) % stride == 0
  assert_mask(lb.strided(stride=stride, causal=causal, **geo), token_mask(expected, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_fixed(geo, causal):
  stride, summary = 8, 2
  expected = lambda q, k: ((q // stride == k // stride) or k % stride >= stride - summary) and (k <= q or not causal)
  assert_mask(lb.fixed(stride=stride, summary=summary, causal=causal, **geo), token_mask(expected, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_global_tokens(geo, causal):
  g = 5
  expected = lambda q, k: (k < g or q < g) and (k <= q or not causal)
  assert_mask(lb.global_tokens(num_global=g, causal=causal, **geo), token_mask(expected, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_longformer(geo):
  left, g = 6, 3
  layout = lb.longformer(left=left, num_global=g, **geo)
  assert_mask(layout, token_mask(lambda q, k: k <= q and (q - k <= left or k < g or q < g), geo["seq_q"]))
  layout = lb.longformer(left=left, right=2, num_global=g, causal=False, **geo)
  assert_mask(layout, token_mask(lambda q, k: -2 <= q - k <= left or k < g or q < g, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("chunk", [5, 8, 16])
def test_chunked_borders(geo, chunk):
  layout = lb.chunked(chunk=chunk, **geo)
  assert_mask(layout, token_mask(lambda q, k: k <= q and q // chunk == k // chunk, geo["seq_q"]))
  layout = lb.chunked(chunk=chunk, causal=False, **geo)
  assert_mask(layout, token_mask(lambda q, k: q // chunk == k // chunk, geo["seq_q"]))


@pytest.mark.parametrize("geo", GEOMETRIES)
@pytest.mark.parametrize("num_sinks,left", [(1, 4), (4, 7), (10, 3), (0, 5)])
def test_sinks(geo, num_sinks, left):
  layout = lb.sinks(num_sinks=num_sinks, left=left, **geo)
  assert_mask(layout, token_mask(lambda q, k: k <= q and (k < num_sinks or q - k <= left), geo["seq_q"]))


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_counts(causal):
  seq, block, left, g, r = 150, 8, 8, 8, 3  # 19 query blocks, last one 6 tokens
  layout = lb.bigbird(seq, block_q=block, left=left, num_global=g, num_random_blocks=r, seed=7,
                      causal=causal, num_heads=2)
  check_contract(layout)
  base = lb.longformer(seq, block_q=block, left=left, num_global=g, causal=causal)
  base_table, table = base.block_table()[0], layout.block_table()
  for h in range(2):
    extra = (table[h] != layouts.EMPTY) & (base_table == layouts.EMPTY)
    # Random blocks are FULL (the padded key tail block is PARTIAL by the padding rule).
    assert (table[h][:, :-1][extra[:, :-1]] == layouts.FULL).all(), "random blocks must be FULL"
    for i in range(layout.num_q_blocks):
      eligible = base_table[i] == layouts.EMPTY
      if causal:
        eligible &= np.minimum((np.arange(layout.num_kv_blocks) + 1) * block, seq) - 1 <= i * block
      assert extra[i].sum() == min(r, eligible.sum()), (h, i)
      assert not (extra[i] & ~eligible).any()
  # The window/global part is kept at token level.
  expected = token_mask(lambda q, k: (k <= q or not causal) and (q - k <= left and k <= q or k < g or q < g), seq)
  assert (layout.to_token_mask() >= expected).all()
  # Seeded: same seed same layout, another seed or head different random blocks.
  again = lb.bigbird(seq, block_q=block, left=left, num_global=g, num_random_blocks=r, seed=7, causal=causal,
                     num_heads=2)
  np.testing.assert_array_equal(again.block_table(), table)
  other = lb.bigbird(seq, block_q=block, left=left, num_global=g, num_random_blocks=r, seed=8, causal=causal,
                     num_heads=2)
  assert not np.array_equal(other.block_table(), table)
  assert not np.array_equal(table[0], table[1])


@hypothesis.settings(max_examples=40, deadline=None)  # derandomized by the conftest profile
@hypothesis.given(data=st.data())
def test_from_block_mask_union_intersection_property(data):
  _block_mask_algebra(data)


@pytest.mark.fuzz
@hypothesis.settings(max_examples=40, deadline=None, derandomize=False)
@hypothesis.given(data=st.data())
def test_from_block_mask_union_intersection_property_fuzz(data):
  _block_mask_algebra(data)


def _block_mask_algebra(data):
  """from_block_mask, union and intersection of random block masks and a window vs token masks."""
  block_q = data.draw(st.sampled_from([1, 2, 4, 8]))
  block_kv = data.draw(st.sampled_from([1, 2, 4, 8]))
  seq_q, seq_kv = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
  nq, nk = -(-seq_q // block_q), -(-seq_kv // block_kv)
  heads = data.draw(st.sampled_from([1, 3]))
  geo = dict(seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv)
  masks = [data.draw(hnp.arrays(bool, (heads, nq, nk))) for _ in range(2)]
  layouts_ = [layouts.from_block_mask(m, **geo) for m in masks]
  token = [np.repeat(np.repeat(m, block_q, 1), block_kv, 2)[:, :seq_q, :seq_kv] for m in masks]
  for layout, expected in zip(layouts_, token):
    assert_mask(layout, expected)
  window = lb.sliding_window(left=data.draw(st.integers(0, 9)), right=data.draw(st.integers(0, 3)), **geo)
  w_mask = window.to_token_mask()
  assert_mask(layouts.union(layouts_[0], layouts_[1], window), token[0] | token[1] | w_mask)
  assert_mask(layouts.intersection(layouts_[0], window), token[0] & w_mask)
  assert_mask(layouts.intersection(layouts_[0], layouts_[1]), token[0] & token[1])


def test_per_head_mixture():
  geo = dict(seq_q=45, block_q=8, block_kv=4)
  parts = [lb.sliding_window(left=5, **geo), lb.dense(**geo), lb.chunked(chunk=10, **geo),
           lb.strided(stride=7, **geo)]
  mixed = layouts.per_head(parts)
  assert mixed.num_heads == 4
  assert_mask(mixed, np.concatenate([p.to_token_mask() for p in parts]))
  with pytest.raises(ValueError, match="geometry"):
    layouts.per_head([lb.dense(seq_q=45, block_q=8), lb.dense(seq_q=44, block_q=8)])


def test_rectangular_sequences():
  layout = lb.sliding_window(seq_q=20, seq_kv=33, block_q=8, block_kv=16, left=3, right=5)
  assert_mask(layout, token_mask(lambda q, k: q - 3 <= k <= q + 5, 20, 33))


def test_density_and_padding_counts():
  layout = lb.sliding_window(seq_q=1024, block_q=128, left=127)
  # Each query block sees itself and its left neighbour (the first block only itself).
  np.testing.assert_array_equal(layout.kv_count[0], [1] + [2] * 7)
  assert layout.density() == pytest.approx(15 / 64)
  assert layout.token_density() == pytest.approx(layout.to_token_mask().mean())
  causal = lb.dense(seq_q=1000, block_q=128)
  assert causal.padded_seq_q == 1024 and causal.max_kv == 8
  np.testing.assert_array_equal(causal.kv_mask_id[0, 3], [-1, -1, -1, causal.kv_mask_id[0, 3, 3]] + [
      causal.kv_mask_id[0, 3, 3]] * 4)


def test_large_layout_is_fast_and_linear():
  layout = lb.sliding_window(seq_q=65536, block_q=128, left=511)
  assert layout.max_kv == 5 and len(layout.partial_masks) == 2


def test_bad_arguments():
  with pytest.raises(ValueError, match="left"):
    lb.sliding_window(seq_q=16, block_q=4, left=-1)
  with pytest.raises(ValueError, match="block_q"):
    lb.dense(seq_q=16, block_q=0)
  with pytest.raises(ValueError, match="summary"):
    lb.fixed(seq_q=16, block_q=4, stride=4, summary=5)
  with pytest.raises(ValueError, match="bool"):
    layouts.from_block_mask(np.ones((2, 2), int), seq_q=4, block_q=2)
