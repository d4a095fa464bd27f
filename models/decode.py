"""Cached decoding of a DecoderLM: prefill a batch of prompts, then append one token per row per step.

    cache = init_cache(model, batch_size=B, max_len=L)
    logits, cache = prefill(model, tokens, lengths, cache)   # tokens int32 [B, T] right-padded; logits f32 [B, V]
    logits, cache = decode(model, cache, next_tokens)        # next_tokens int32 [B]; each row at its own length

The cache is a pytree: {"layer{i}": that layer's arrays (layers/attention/cache.py says what each attention kind
keeps: the K/V prefix, a ring of `window` positions, sinks + ring, the current chunk), "lengths": int32 [B]
(positions written per row), "max_len": int32 [] (the positions a row may hold)}. `cache_logical_axes` gives
the logical axis names of every array in the same structure ("batch", "kv_seq", "kv_heads", "head_dim"), so the
trainer's rules table places it on a mesh like the parameters:

    specs = jax.tree.map(lambda axes, a: sharding.logical_to_spec(axes, a.shape, mesh), axes, cache,
                         is_leaf=lambda x: isinstance(x, tuple))

At every position decode equals the full forward pass (tests/models/test_decode.py). `prefill` and `decode`
compile once per (model structure, shapes); the model is passed to them as nnx.split state, so repeated calls do
not retrace; `snapshot(model)` splits it once for a generation loop (prefill and decode take either). Both run
the model in eval mode (`model.eval()`: no router jitter) and MoE layers dropless
(`MoEFeedForward.infer`). The cache passed in is donated: its buffers are reused for the returned cache, so use
only the returned one.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.models.decoder import DecoderLM

Cache = dict


def _check_model(model: DecoderLM, batch_size: int, max_len: int) -> None:
  for name, value in (("batch_size", batch_size), ("max_len", max_len)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r} must be an integer >= 1.")
  if max_len > model.config.max_seq_len:
    raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={model.config.max_seq_len} (the positions the "
                     f"model was built for); pass max_len <= {model.config.max_seq_len}.")
  for layer, block in enumerate(model.blocks):
    if block.ffn_kind == "moe" and block.ffn.config.routing != "token_choice":
      raise ValueError(f"layer {layer}: model.moe.routing={block.ffn.config.routing!r} cannot decode token by "
                       "token (each expert picks among the whole sequence); decode a token_choice model.")


def init_cache(model: DecoderLM, batch_size: int, max_len: int) -> Cache:
  """A zeroed cache for `batch_size` rows of up to `max_len` positions (<= model.config.max_seq_len)."""
  _check_model(model, batch_size, max_len)
  cache = {f"layer{i}": block.attention.init_cache(batch_size, max_len) for i, block in enumerate(model.blocks)}
  cache["lengths"] = jnp.zeros((batch_size,), jnp.int32)
  cache["max_len"] = jnp.asarray(max_len, jnp.int32)
  return cache


def cache_logical_axes(model: DecoderLM, batch_size: int, max_len: int) -> dict:
  """Logical axis names (a tuple per array) of `init_cache(model, batch_size, max_len)`, same structure."""
  _check_model(model, batch_size, max_len)
  axes = {f"layer{i}": block.attention.cache_logical_axes(batch_size, max_len)
          for i, block in enumerate(model.blocks)}
  return {**axes, "lengths": ("batch",), "max_len": ()}


@functools.lru_cache(maxsize=16)
def _prefill_fn(graphdef):
  def run(state, tokens, lengths, cache):
    return nnx.merge(graphdef, state, copy=True).prefill(tokens, lengths, cache)

  return jax.jit(run, donate_argnames=("cache",))


@functools.lru_cache(maxsize=16)
def _decode_fn(graphdef):
  def run(state, tokens, cache):
    return nnx.merge(graphdef, state, copy=True).decode_step(tokens, cache)

  return jax.jit(run, donate_argnames=("cache",))


class Snapshot(NamedTuple):
  """A model's eval-mode (graphdef, state), taken once (`snapshot`) for a loop of `decode` calls: splitting a
  model costs host time every call (a graph walk), a snapshot none. Later changes to the model are not seen."""
  graphdef: Any
  state: Any
  config: Any


def snapshot(model: DecoderLM) -> Snapshot:
  """`model` in eval mode (deterministic: no router jitter), split once; prefill and decode accept it."""
  if isinstance(model, Snapshot):
    return model
  model.eval()
  graphdef, state = nnx.split(model)
  return Snapshot(graphdef, state, model.config)


def _split(model):
  frozen = snapshot(model)
  return frozen.graphdef, frozen.state


def _check_cache(cache: Cache, batch: int) -> tuple[np.ndarray, int]:
  if not isinstance(cache, dict) or "lengths" not in cache or "max_len" not in cache:
    raise ValueError("cache must be the dict init_cache returned (with 'lengths' and 'max_len').")
  lengths, max_len = jax.device_get((cache["lengths"], cache["max_len"]))
  if lengths.shape != (batch,):
    raise ValueError(f"the cache holds {lengths.shape[0]} rows, the tokens {batch}; init_cache with "
                     f"batch_size={batch}.")
  return lengths, int(max_len)


def _check_tokens(tokens: np.ndarray, model: DecoderLM) -> None:
  if tokens.size and (tokens.min() < 0 or tokens.max() >= model.config.vocab_size):
    raise ValueError(f"token ids must lie in [0, model.vocab_size={model.config.vocab_size}); got ids in "
                     f"[{tokens.min()}, {tokens.max()}].")


def prefill(model: DecoderLM | Snapshot, tokens, lengths, cache: Cache) -> tuple[jax.Array, Cache]:
  """Runs the prompts tokens[b, :lengths[b]] (int32 [B, T], right-padded; 1 <= lengths[b] <= T <= max_len) into
  a fresh `cache` -> (logits f32 [B, V] at position lengths[b] - 1, cache holding positions 0..lengths[b] - 1 of
  every row and nothing of the pad positions)."""
  tokens = np.asarray(tokens)
  lengths_host = np.asarray(lengths)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be an integer array [batch, time], got {tokens.dtype} {tokens.shape}.")
  if lengths_host.shape != (tokens.shape[0],) or not np.issubdtype(lengths_host.dtype, np.integer):
    raise ValueError(f"lengths must be an integer array [{tokens.shape[0]}] (one per prompt), got "
                     f"{lengths_host.dtype} {lengths_host.shape}.")
  cached_lengths, max_len = _check_cache(cache, tokens.shape[0])
  if tokens.shape[1] > max_len:
    raise ValueError(f"the prompts have {tokens.shape[1]} positions, more than the cache's max_len={max_len}; "
                     "truncate them or init_cache with a larger max_len.")
  if lengths_host.min() < 1 or lengths_host.max() > tokens.shape[1]:
    raise ValueError(f"every length must lie in [1, {tokens.shape[1]}] (a prompt has at least one token, e.g. "
                     f"BOS); got {lengths_host.tolist()}.")
  if cached_lengths.any():
    raise ValueError("prefill needs a fresh cache (init_cache); this one already holds tokens.")
  _check_tokens(tokens, model)
  graphdef, state = _split(model)
  return _prefill_fn(graphdef)(state, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths_host, jnp.int32), cache)


def decode(model: DecoderLM | Snapshot, cache: Cache, tokens) -> tuple[jax.Array, Cache]:
  """Appends tokens int32 [B] at position cache["lengths"][b] of each row -> (logits f32 [B, V] there, cache)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be an integer array [batch] (one per row), got {tokens.dtype} {tokens.shape}.")
  lengths, max_len = _check_cache(cache, tokens.shape[0])
  if lengths.max() >= max_len:
    raise ValueError(f"row {int(lengths.argmax())} already holds max_len={max_len} positions; init_cache with a "
                     "larger max_len (at most model.max_seq_len) to decode further.")
  _check_tokens(tokens, model)
  graphdef, state = _split(model)
  return _decode_fn(graphdef)(state, jnp.asarray(tokens, jnp.int32), cache)


__all__ = ["Cache", "Snapshot", "cache_logical_axes", "decode", "init_cache", "prefill", "snapshot"]
