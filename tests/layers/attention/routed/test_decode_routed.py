"""Cached decode of the content-routed kinds (routed/decode_moba.py, decode_nsa.py, decode_dsa.py,
decode_common.py) against each layer's own full forward pass, which test_moba / test_nsa / test_dsa hold
to the papers' references.

Each case: a T = 48 sequence, two rows prefilled to different lengths with junk past their lengths (so a
cache that kept a padded position would be caught), then every later position decoded, each row at its own
position, in one jitted lax.scan (one compile per case). Every position's output (prefill and decode)
must equal the full forward's within 1e-5 relative (f32, NumPy, NaN checked); the forward of a batch is
row-independent, so this is also "the mixed-length batch equals each row alone".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.routed import decode_common as dc
from sparseformer.layers.attention.routed import make_routed
from sparseformer.layers.attention.routed.config import DSAConfig, MoBAConfig, NSAConfig

B, T, DIM, H, KVH, D = 2, 48, 32, 4, 2, 16
MAX_LEN = 64
FAST_COMPILE = {"xla_backend_optimization_level": 0}
LENGTHS = (3, 17)  # prefilled tokens per row; the last decoded position is T - 3 + 17 - 1 = 61 < MAX_LEN


def _module(kind: str, **fields):
  """The layer on the reference backend (test_moba / test_nsa / test_dsa hold every backend to it; it compiles
  in half the time of xla), its parameters drawn in NumPy (eager initialisers compile one kernel each)."""
  config = SparseAttentionConfig(block_size=8, backend="reference", **fields)
  abstract = nnx.eval_shape(lambda: make_routed(
      kind, dim=DIM, num_heads=H, num_kv_heads=KVH, head_dim=D, config=config, rope_theta=10_000.0, init_std=0.3,
      dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(1)
  return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), state))


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  shapes = {"x": (B, T, DIM), "q": (B, T, H, D), "k": (B, T, KVH, D), "v": (B, T, KVH, D)}
  real = {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name, shape in shapes.items()}
  junk = {name: jnp.asarray(rng.normal(size=shape) * 3, jnp.float32) for name, shape in shapes.items()}
  return real, junk


def _decode_everything(module, seed: int):
  """(full forward [B, T, H, D], per-position decode outputs [B, T, H, D], prefill outputs, cache after prefill)."""
  real, junk = _inputs(seed)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  steps = T - min(LENGTHS)

  def run(real, junk):
    keep = dc.real_rows(lengths, T)
    prompt = {name: jnp.where(keep.reshape(B, T, *(1,) * (a.ndim - 2)), a, junk[name]) for name, a in real.items()}
    # One forward compile: rows 0..B-1 are the full sequences (a full-length prefill is the layer's forward,
    # `out, _ = module(...)`), rows B..2B-1 the junk-padded prompts.
    both = {name: jnp.concatenate([real[name], prompt[name]]) for name in real}
    out, cache = module.prefill(both["x"], both["q"], both["k"], both["v"], jnp.concatenate([positions] * 2),
                                jnp.concatenate([jnp.full((B,), T, jnp.int32), lengths]),
                                module.init_cache(2 * B, MAX_LEN))
    full, prefilled = out[:B], out[B:]
    cache = jax.tree.map(lambda a: a[B:], cache)

    def step(cache, s):
      position = lengths + s
      token = {name: a[jnp.arange(B), jnp.minimum(position, T - 1)][:, None] for name, a in real.items()}
      out, cache = module.decode_step(token["x"], token["q"], token["k"], token["v"], position, cache)
      return cache, out[:, 0]

    _, decoded = jax.lax.scan(step, cache, jnp.arange(steps))  # [steps, B, H, D]
    return full, prefilled, decoded, cache

  # LLVM at -O0 halves the compile (the suite's cost here) and leaves the HLO, hence the math, as it is.
  compiled = jax.jit(run).lower(real, junk).compile(FAST_COMPILE)
  full, prefilled, decoded, cache = (jax.tree.map(np.asarray, r) for r in compiled(real, junk))
  got = np.zeros_like(full)
  for b, length in enumerate(LENGTHS):
    got[b, :length] = prefilled[b, :length]
    got[b, length:] = decoded[:T - length, b]
    assert (prefilled[b, length:] == 0).all(), "prefill outputs past a row's length must be zero"
  return full, got, cache


def _assert_equal_rel(got, want, rtol=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert not np.isnan(got).any(), "NaN in the decode outputs"
  err = np.abs(got - want).max(axis=(-1, -2))  # [B, T]: per position
  worst = np.unravel_index(np.argmax(err), err.shape)
  assert err.max() <= rtol * np.abs(want).max(), f"row, position {worst}: error {err.max()} vs scale {np.abs(want).max()}"


def _assert_only_real_positions(cache: dict, name: str, lengths=LENGTHS):
  for b, length in enumerate(lengths):
    assert (cache[name][b, length:] == 0).all(), f"cache[{name!r}] holds row {b}'s padding"
    assert (np.abs(cache[name][b, :length]) > 0).any(axis=tuple(range(1, cache[name].ndim - 1))).all()


def test_moba_decode_equals_the_forward_at_every_position(seed):
  module = _module("moba", moba=MoBAConfig(block_size=8, topk=3))
  full, got, cache = _decode_everything(module, seed)
  _assert_equal_rel(got, full)
  assert cache["k"].shape == (B, MAX_LEN, KVH, D) and cache["block_sum"].shape == (B, MAX_LEN // 8, KVH, D)
  _assert_only_real_positions(cache, "k")
  _assert_only_real_positions(cache, "v")


# l=8, d=4, l'=8, n=4 (1 initial + 2 local forced, 1 ranked), w=12: T=48 wraps the window ring 4 times.
NSA = dict(compress_block=8, compress_stride=4, select_block=8, num_selected=4, window=12, init_blocks=1,
           local_blocks=2, gate_hidden=8)


@pytest.mark.parametrize("compression,separate_kv", [("mlp", True), ("mean", False)])
def test_nsa_decode_equals_the_forward_at_every_position(seed, compression, separate_kv):
  module = _module("nsa", nsa=NSAConfig(**NSA, compression=compression, separate_kv=separate_kv))
  full, got, cache = _decode_everything(module, seed)
  _assert_equal_rel(got, full)
  names = {"k", "v", "cmp_k", "cmp_v"} | ({"cmp_k_raw", "cmp_v_raw", "win_k", "win_v"} if separate_kv else set())
  assert set(cache) == names
  assert cache["cmp_k"].shape == (B, (MAX_LEN - 8) // 4 + 1, KVH, D)
  if separate_kv:
    assert cache["win_k"].shape == (B, 12, KVH, D) and cache["cmp_k_raw"].shape == (B, 8, KVH, D)
  _assert_only_real_positions(cache, "k")


# topk 20 < T: the early positions attend every key (t + 1 <= topk), the later ones select; dsa_block keeps
# topk // block_size = 2 of 6 blocks of 8.
DSA = dict(index_heads=3, index_head_dim=8, rope_dim=4, topk=20, block_size=8, key_chunk=16, query_chunk=16)


@pytest.mark.parametrize("kind", ["dsa", "dsa_block"])
def test_dsa_decode_equals_the_forward_at_every_position(seed, kind):
  module = _module(kind, dsa=DSAConfig(**DSA))
  full, got, cache = _decode_everything(module, seed)
  _assert_equal_rel(got, full)
  assert set(cache) == {"k", "v", "index_k"} and cache["index_k"].shape == (B, MAX_LEN, 8)
  _assert_only_real_positions(cache, "index_k")


def test_dsa_warmup_decodes_dense_as_its_forward(seed):
  """The warm-up stage's forward is dense causal attention: its decode is dense too and keeps no indexer cache."""
  module = _module("dsa", dsa=DSAConfig(**DSA, stage="warmup"))
  full, got, cache = _decode_everything(module, seed)
  _assert_equal_rel(got, full)
  assert set(cache) == {"k", "v"}


@pytest.mark.parametrize("kind", ["moba", "nsa", "dsa"])
def test_bad_shapes_are_errors_before_any_work(kind):
  module = _module(kind, moba=MoBAConfig(block_size=8, topk=3), nsa=NSAConfig(**NSA), dsa=DSAConfig(**DSA))
  real, _ = _inputs(0)
  cache = module.init_cache(B, 16)
  positions = jnp.arange(T)
  with pytest.raises(ValueError, match="max_len"):  # 48 prompt positions, a cache of 16
    module.prefill(real["x"], real["q"], real["k"], real["v"], positions, jnp.asarray(LENGTHS), cache)
  with pytest.raises(ValueError, match="lengths"):
    module.prefill(real["x"][:, :8], real["q"][:, :8], real["k"][:, :8], real["v"][:, :8], positions[:8],
                   jnp.asarray([3]), cache)
  with pytest.raises(ValueError, match=r"positions must be int32 \[B=2\]"):
    module.decode_step(real["x"][:, :1], real["q"][:, :1], real["k"][:, :1], real["v"][:, :1], jnp.zeros((2, 1)),
                       cache)
  # A cache shorter than every block (NSA: no compressed block ever completes) still traces (shape check only).
  token = [real[name][:, :1] for name in ("x", "q", "k", "v")]
  out, _ = jax.eval_shape(module.decode_step, *token, jnp.zeros((B,), jnp.int32), module.init_cache(B, 4))
  assert out.shape == (B, 1, H, D)


# Models with routed layers, decoded through models/decode.py (prefill + decode).
MODEL_ATTENTION = SparseAttentionConfig(
    backend="reference", block_size=8, window=16, moba=MoBAConfig(block_size=8, topk=2),
    nsa=NSAConfig(**NSA), dsa=DSAConfig(**DSA))


@pytest.mark.parametrize("pattern", [("moba",), pytest.param(("moba", "nsa", "dsa", "dsa_block"), marks=pytest.mark.slow)])
def test_model_with_routed_layers_decodes_as_its_forward(pattern):
  """models/decode.py's prefill + decode of a model with routed layers equal its forward's logits at every
  position (the 4-kind model costs ~23 s of CPU: `pytest -m slow tests/layers/attention/routed/test_decode_routed.py`)."""
  from sparseformer.models import decode, presets  # noqa: PLC0415
  from sparseformer.models.decoder import DecoderLM  # noqa: PLC0415

  config = dataclasses.replace(presets.tiny(), num_layers=len(pattern), d_model=32, max_seq_len=MAX_LEN,
                               attention=MODEL_ATTENTION, attention_pattern=pattern)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(2)
  model = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.2, a.dtype), state))
  tokens = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
  full = np.asarray(jax.jit(lambda tokens: model(tokens)[0])(tokens))  # [B, T, V]
  lengths = np.asarray(LENGTHS, np.int32)
  prompt = np.where(np.arange(T)[None] < lengths[:, None], tokens, 0)  # pads are token 0, not the sequence
  logits, cache = decode.prefill(model, prompt, lengths, decode.init_cache(model, B, MAX_LEN))
  got = {(b, int(lengths[b]) - 1): np.asarray(logits[b]) for b in range(B)}
  for step in range(T - min(LENGTHS)):
    position = np.minimum(lengths + step, T - 1)
    logits, cache = decode.decode(model, cache, tokens[np.arange(B), position])
    for b in range(B):
      if lengths[b] + step <= T - 1:
        got[(b, int(lengths[b]) + step)] = np.asarray(logits[b])
  want = np.stack([full[b, t] for (b, t) in got])
  _assert_equal_rel(np.stack(list(got.values()))[:, None], want[:, None])
