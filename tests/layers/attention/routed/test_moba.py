"""Tests of layers/attention/routed/moba.py and moba_kv_major.py (dispatch: test_kv_major.py) against a dense MoBA
written from the paper.

Reference (Lu et al., 2025, §2.2, eq. 2-6): per query head, block i's score is q . mean(K[block i]) (f32, no
scale); blocks after the query's own block are out, the own block is in and counts in top-k, the other
topk - 1 are the best-scoring past blocks (ties to the lower index); one causal softmax over the union.
"""

import dataclasses

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseformer.layers.attention import SparseAttentionConfig, backends, blocked_causal_attention, layouts
from sparseformer.layers.attention.routed import config as routed_config, moba

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from grad_check import assert_close, values_and_grads  # noqa: E402

SHAPE = dict(batch=2, seq=45, heads=4, kv_heads=2, dim=16)  # odd T (not a multiple of the block), GQA
BLOCK, TOPK, BLOCK_Q = 8, 3, 4


def _inputs(seed, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, seq, h, dim)), dtype) for h in (heads, kv_heads, kv_heads)]


def _reference_selection(q, k, block, topk):
  """[B, H, T, min(topk, nk)] from the paper's definition, own block first, then by decreasing score; -1 pads."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, seq, heads, _ = q.shape
  group, num_blocks = heads // k.shape[2], -(-seq // block)
  means = np.stack([k[:, i * block:(i + 1) * block].mean(1) for i in range(num_blocks)], 1)  # [B, nk, KVH, D]
  out = np.full((batch, heads, seq, min(topk, num_blocks)), -1)
  for b, h, t in np.ndindex(batch, heads, seq):
    own = t // block
    scores = means[b, :own, h // group] @ q[b, t, h]
    past = np.argsort(-scores, kind="stable")[:topk - 1]
    out[b, h, t, :1 + len(past)] = [own, *past]
  return out


def _reference_mask(selection, seq, block):
  """bool [B, H, T, T]: keys of the selected blocks, causal."""
  batch, heads = selection.shape[:2]
  mask = np.zeros((batch, heads, seq, seq), bool)
  for b, h, t, slot in np.ndindex(*selection.shape):
    if selection[b, h, t, slot] >= 0:
      mask[b, h, t, selection[b, h, t, slot] * block:(selection[b, h, t, slot] + 1) * block] = True
  return mask & np.tril(np.ones((seq, seq), bool))


def _dense(q, k, v, mask):
  heads, kv_heads = q.shape[2], k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), heads // kv_heads, axis=2) for x in (k, v))
  scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k, precision="highest") / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(jnp.asarray(mask), scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v, precision="highest")


def _moba(backend, scheme, block=BLOCK, topk=TOPK, tile=8):
  return lambda q, k, v: moba.moba_attention(q, k, v, block_size=block, topk=topk, block_q=BLOCK_Q, backend=backend,
                                             scheme=scheme, kv_major_tile=tile)[0]


def test_selection_equals_the_reference_with_own_block_forced_and_padding(seed):
  q, k, _ = _inputs(seed, **SHAPE)
  got = np.asarray(moba.select_blocks(q, k, BLOCK, TOPK))
  want = _reference_selection(q, k, BLOCK, TOPK)
  np.testing.assert_array_equal(got, want)
  own = np.arange(SHAPE["seq"]) // BLOCK
  assert (got[..., 0] == own).all()  # the own block is always selected, first
  for row in got.reshape(-1, got.shape[-1]):
    listed = row[row >= 0]
    assert len(set(listed)) == len(listed)  # no block twice
  assert (got[:, :, :BLOCK, 1:] == -1).all()  # the first block's queries have no past block: padded with -1
  assert (got <= own[:, None]).all()  # never a future block


@pytest.mark.parametrize("backend,scheme", [("reference", "union"), ("xla", "union"), ("xla", "kv_major"),
                                            ("pallas", "union")])
def test_moba_equals_the_dense_referencevalues_and_grads(seed, backend, scheme):
  q, k, v = _inputs(seed, **SHAPE)
  mask = _reference_mask(_reference_selection(q, k, BLOCK, TOPK), SHAPE["seq"], BLOCK)
  got = jax.jit(lambda q, k, v: values_and_grads(_moba(backend, scheme), q, k, v))(q, k, v)
  assert_close(got, values_and_grads(lambda q, k, v: _dense(q, k, v, mask), q, k, v), 2e-5, 2e-5)


def test_moba_kv_major_in_bfloat16():
  q, k, v = _inputs(4, **SHAPE, dtype=jnp.bfloat16)
  mask = _reference_mask(_reference_selection(q, k, BLOCK, TOPK), SHAPE["seq"], BLOCK)
  got = jax.jit(lambda q, k, v: values_and_grads(_moba("xla", "kv_major"), q, k, v))(q, k, v)
  want = values_and_grads(lambda q, k, v: _dense(q, k, v, mask), *(x.astype(jnp.float32) for x in (q, k, v)))
  assert_close(got, want, 2e-2, 2e-2)


@pytest.mark.parametrize("scheme", ["union", "kv_major"])
def test_topk_at_least_the_number_of_blocks_equals_dense_causal(seed, scheme):
  q, k, v = _inputs(seed, 1, 29, 2, 1, 8)
  got = jax.jit(_moba("xla", scheme, topk=9))(q, k, v)  # 4 blocks of 8
  want = blocked_causal_attention(q, k, v, block_size=8)
  diff = np.abs(np.asarray(got) - np.asarray(want))
  assert not np.isnan(diff).any() and diff.max() < 1e-5


def test_traced_selection_equals_the_same_selection_as_a_host_layout(seed):
  """MoBA's traced union layout against a host BlockLayout built from the reference selection."""
  q, k, v = _inputs(seed, 1, 45, 2, 2, 8)
  selection = _reference_selection(q, k, BLOCK, TOPK)
  mask = _reference_mask(selection, 45, BLOCK)[0]  # [H, T, T]
  nq, nk = -(-45 // BLOCK_Q), -(-45 // BLOCK)
  padded = np.zeros((2, nq * BLOCK_Q, nk * BLOCK), bool)
  padded[:, :45, :45] = mask
  padded[:, 45:] = padded[:, 44:45]
  tiles = padded.reshape(2, nq, BLOCK_Q, nk, BLOCK).transpose(0, 1, 3, 2, 4).reshape(-1, BLOCK_Q, BLOCK)
  host = layouts.from_block_table(np.arange(2 * nq * nk).reshape(2, nq, nk), tiles, seq_q=45, seq_kv=45,
                                  block_q=BLOCK_Q, block_kv=BLOCK)
  want = jax.jit(lambda q, k, v: backends.attend(q, k, v, host, backend="xla"))(q, k, v)
  got = jax.jit(_moba("xla", "union"))(q, k, v)
  diff = np.abs(np.asarray(got) - np.asarray(want))
  assert not np.isnan(diff).any() and diff.max() < 1e-5


def test_density_counts_attended_over_causal_keys(seed):
  q, k, _ = _inputs(seed, **SHAPE)
  selection = _reference_selection(q, k, BLOCK, TOPK)
  want = _reference_mask(selection, SHAPE["seq"], BLOCK).sum() / (
      SHAPE["batch"] * SHAPE["heads"] * SHAPE["seq"] * (SHAPE["seq"] + 1) / 2)
  got = float(moba.density(jnp.asarray(selection), BLOCK))
  assert abs(got - want) < 1e-6


@pytest.mark.parametrize("field,value", [("block_size", 0), ("topk", 0), ("scheme", "rows"), ("kv_major_tile", -1)])
def test_bad_moba_fields_are_errors_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f"attention.moba.{field}"):
    routed_config.MoBAConfig(**{field: value})


def test_moba_module_returns_its_density_through_attention():
  from flax import nnx
  from sparseformer.layers.attention import Attention
  config = SparseAttentionConfig(block_size=4, moba=routed_config.MoBAConfig(block_size=8, topk=2))
  layer = Attention(dim=16, num_heads=2, num_kv_heads=1, head_dim=8, kind="moba", sparse_config=config,
                    rope_theta=10_000.0, init_std=0.2, out_init_std=0.2, dtype=jnp.float32, param_dtype=jnp.float32,
                    rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 20, 16)), jnp.float32)
  out, aux = nnx.jit(lambda layer, x: layer(x, jnp.arange(20)))(layer, x)
  assert out.shape == (1, 20, 16) and np.isfinite(np.asarray(out)).all()
  assert set(aux) == {"density"} and 0 < float(aux["density"]) <= 1
  assert dataclasses.replace(config).moba.topk == 2
