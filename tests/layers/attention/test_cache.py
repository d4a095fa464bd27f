"""KV caches of the static attention kinds (layers/attention/cache.py through Attention.prefill / decode_step):
prefill of mixed-length prompts plus one decode step per position equal the full forward pass at every position,
with rings wrapping (T = 48 > 2 x window 8), per-head layouts (bigbird's random blocks, a custom per-head
factory) and each kind's cache holding exactly the slots it should."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.attention import Attention, builders, kinds, layouts
from sparseformer.layers.attention import cache as cache_lib
from sparseformer.layers.attention.config import SparseAttentionConfig

SEQ, PROMPT, BATCH, DIM, HEADS, KV_HEADS, HEAD_DIM = 48, 16, 2, 32, 4, 2, 8
LENGTHS = np.array([5, 13])  # rows start decoding at different positions
STEPS = SEQ - int(LENGTHS.max())  # every row decodes until the longer one reaches SEQ
BASE = SparseAttentionConfig(backend="reference", block_size=8, window=8, stride=8, summary_tokens=4, num_global=8,
                             num_random_blocks=1, random_per_head=True, chunk_size=16, num_sinks=4,
                             layout_factory="decode_test_per_head")
# name -> (kind, config changes, slots per row the cache must hold)
CASES = {
    "global": ("global", {}, SEQ),
    "local": ("local", {}, 8),
    "local_dilated": ("local", {"window": 4, "dilation": 3}, 10),  # (window - 1) * dilation + 1
    "strided": ("strided", {}, SEQ),
    "fixed": ("fixed", {"stride": 16}, SEQ),
    "bigbird_per_head": ("bigbird", {}, SEQ),
    "longformer": ("longformer", {}, SEQ),
    "chunked": ("chunked", {}, 16),
    "sinks": ("sinks", {}, 4 + 8),
    "custom_per_head": ("custom", {}, SEQ),
}


def _per_head_factory(config, seq_len, num_heads):
  """Heads alternate between a 12-token window and strided columns (a per-head custom layout)."""
  window = builders.sliding_window(seq_len, block_q=config.block_size, left=11)
  columns = builders.strided(seq_len, block_q=config.block_size, stride=6)
  return layouts.per_head([window if head % 2 == 0 else columns for head in range(num_heads)])


@pytest.fixture(autouse=True, scope="module")
def _register_factory():
  kinds.register_layout_factory("decode_test_per_head", _per_head_factory)


def _layer(kind: str, config: SparseAttentionConfig) -> Attention:
  return Attention(dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, kind=kind,
                   sparse_config=config, rope_theta=10_000.0, init_std=0.3, out_init_std=0.3, dtype=jnp.float32,
                   param_dtype=jnp.float32, rngs=nnx.Rngs(0))


# The default suite runs one case per code path (the full prefix, the shared and the per-head block lists, each
# ring predicate); the rest share those paths and run with `pytest -m slow`.
SLOW_CASES = ("local_dilated", "fixed", "longformer", "custom_per_head")


@functools.lru_cache(maxsize=2)
def _decoded(cases: tuple[str, ...]) -> dict:
  """Per case: (full forward [B, T, D], prefill outputs [B, PROMPT, D], decode outputs [STEPS, B, D], cache), the
  cases in one jit (one compile; the reference backend keeps the forward's compile small)."""
  layers = {case: _layer(CASES[case][0], dataclasses.replace(BASE, **CASES[case][1])) for case in cases}
  x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, DIM), jnp.float32)
  lengths = jnp.asarray(LENGTHS, jnp.int32)

  @jax.jit
  def run(x):
    full = {case: layer(x, jnp.arange(SEQ))[0] for case, layer in layers.items()}
    prefilled, caches = {}, {}
    for case, layer in layers.items():
      prefilled[case], caches[case] = layer.prefill(x[:, :PROMPT], jnp.arange(PROMPT), lengths,
                                                    layer.init_cache(BATCH, SEQ))

    def step(caches, offset):
      positions = lengths + offset
      x_t = x[jnp.arange(BATCH), positions][:, None]
      outs = {}
      for case, layer in layers.items():
        outs[case], caches[case] = layer.decode_step(x_t, positions, caches[case])
        outs[case] = outs[case][:, 0]
      return caches, outs

    caches, decoded = jax.lax.scan(step, caches, jnp.arange(STEPS))
    return {case: (full[case], prefilled[case], decoded[case], caches[case]) for case in layers}

  return jax.tree.map(np.asarray, run(x))


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  assert np.isfinite(actual).all() and np.isfinite(expected).all()
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("case", [pytest.param(case, marks=[pytest.mark.slow] if case in SLOW_CASES else [])
                                  for case in CASES])
def test_decode_equals_forward_at_every_position(case):
  group = SLOW_CASES if case in SLOW_CASES else tuple(name for name in CASES if name not in SLOW_CASES)
  full, prefilled, decoded, cache = _decoded(group)[case]
  for row, length in enumerate(LENGTHS):
    assert _relative_error(prefilled[row, :length], full[row, :length]) < 1e-5, (case, row, "prefill")
    positions = length + np.arange(STEPS)
    assert _relative_error(decoded[:, row], full[row, positions]) < 1e-5, (case, row, "decode")
  # The cache holds exactly the kind's slots (a ring of `window` for local), nothing sized by SEQ otherwise.
  slots = CASES[case][2]
  assert set(cache) == {"k", "v"}
  assert cache["k"].shape == cache["v"].shape == (BATCH, slots, KV_HEADS, HEAD_DIM), case


def test_prefill_keeps_only_real_positions():
  """A prompt longer than the ring keeps its last `window` real positions; pads write nothing (ring or prefix)."""
  k = jnp.arange(1, PROMPT + 1, dtype=jnp.float32)[None, :, None, None] * jnp.ones((BATCH, 1, KV_HEADS, HEAD_DIM))
  caches = {kind: _layer(kind, BASE).init_cache(BATCH, SEQ) for kind in ("local", "global")}
  write = jax.jit(lambda caches, k: {kind: cache_lib.write_prefill(kind, BASE, cache, k, k, jnp.asarray(LENGTHS))
                                     for kind, cache in caches.items()})
  written = jax.tree.map(np.asarray, write(caches, k))
  expected = {"local": np.zeros((BATCH, 8)), "global": np.zeros((BATCH, SEQ))}  # position + 1 per slot, 0 = empty
  for row, length in enumerate(LENGTHS):
    for position in range(max(0, length - 8), length):
      expected["local"][row, position % 8] = position + 1
    expected["global"][row, :length] = np.arange(1, length + 1)
  for kind in expected:
    for name in ("k", "v"):
      np.testing.assert_array_equal(written[kind][name][:, :, 0, 0], expected[kind], err_msg=f"{kind} {name}")


def test_routed_kind_without_decode_is_a_clear_error():
  layer = _layer("global", BASE)

  class NoDecode(nnx.Module):
    pass

  layer.routed = nnx.data(NoDecode())
  layer.kind = "moba"
  with pytest.raises(ValueError, match="decode for attention kind 'moba' is not built yet"):
    layer.init_cache(BATCH, SEQ)


def test_bidirectional_layout_cannot_decode():
  layer = _layer("local", dataclasses.replace(BASE, causal=False))
  with pytest.raises(ValueError, match="attention.causal=True"):
    layer.init_cache(BATCH, SEQ)
