"""KV caches for decoding the static attention kinds: what each kind keeps, how prefill writes it, and what one
decode step reads.

    arrays, axes = init(kind, config, batch=B, max_len=L, num_kv_heads=K, head_dim=H, dtype=dt)
    cache = write_prefill(kind, config, arrays, k, v, lengths)       # k, v [B, T, K, H] after RoPE
    cache = write_step(kind, config, cache, k_t, v_t, positions)     # k_t, v_t [B, 1, K, H]; positions [B]
    out = read_step(kind, config, cache, q_t, positions, layer=i)    # q_t [B, 1, N, H] -> [B, 1, N, H]

What each kind keeps (per layer, k and v alike; R = ring slots) and what a step at position p reads:

  storage  kinds                                   k, v                 a step reads
  full     global                                  [B, max_len, K, H]   the prefix 0..p (masked read)
  full     strided fixed bigbird longformer custom [B, max_len, K, H]   the key blocks BlockLayout(max_len) lists
                                                                        for query block p // block_size (per head
                                                                        where the layout is), gathered, with the
                                                                        token predicate of PARTIAL blocks
  ring     local                                   [B, R, K, H]         the ring; R = (window-1)*dilation + 1
                                                                        (= window undilated)
  sinks    sinks                                   [B, S + W, K, H]     S = num_sinks slots + a ring of W = window
  chunk    chunked                                 [B, C, K, H]         the current chunk (C = chunk_size)

(every R, S, W, C above is capped at max_len). Position x lives in slot x (full), x % R (ring, chunk), x (sinks,
x < S) or S + x % W (sinks, x >= S). Every row has written exactly positions 0..length-1, so the position a ring
slot holds is a function of the row's length (`_slot_positions`): no position array is stored. Ring reads mask
each slot by the kind's token predicate at its stored position (the same predicates as builders.py: local =
Diagonal(0, left) [& DiagonalPeriod], sinks = Diagonal(0, left) | k < S, chunked = SameChunk & causal), so an
overwritten or stale slot is never visible.

Prefill writes the last positions a row keeps and nothing from its pad positions (index >= length). Softmax in
f32, output in q's dtype, a query with no visible key returns zeros (the backends' contract).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.layers.attention import kinds
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.layouts import BlockLayout, from_block_table

LISTED_KINDS = ("strided", "fixed", "bigbird", "longformer", "custom")  # full cache, layout-listed blocks
STORAGE = {"global": "full", **{kind: "full" for kind in LISTED_KINDS}, "local": "ring", "sinks": "sinks",
           "chunked": "chunk"}
KV_AXES = ("batch", "kv_seq", "kv_heads", "head_dim")


def validate(kind: str, config: SparseAttentionConfig, max_len: int) -> None:
  """Raises a ValueError naming the field and the fix when `kind` cannot be decoded with a cache."""
  if kind not in STORAGE:
    raise ValueError(f"attention kind {kind!r} has no static KV cache; choose from {tuple(STORAGE)}.")
  if not config.causal:
    raise ValueError(f"decoding attention kind {kind!r} needs a causal layout (a bidirectional one reads keys "
                     "that do not exist yet); set attention.causal=True.")
  if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
    raise ValueError(f"max_len={max_len!r} must be an integer >= 1.")


def slots(kind: str, config: SparseAttentionConfig, max_len: int) -> int:
  """Number of positions the cache of `kind` keeps per row (see the module table)."""
  storage = STORAGE[kind]
  if storage == "full":
    return max_len
  if storage == "ring":
    return min((config.window - 1) * config.dilation + 1, max_len)
  if storage == "sinks":
    return min(config.num_sinks, max_len) + min(config.window, max_len)
  return min(config.chunk_size, max_len)


def init(kind: str, config: SparseAttentionConfig, *, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
         dtype) -> tuple[dict[str, jax.Array], dict[str, tuple[str, ...]]]:
  """(zeroed cache {"k", "v"} [B, slots, K, H] in `dtype`, their logical axes)."""
  validate(kind, config, max_len)
  shape = (batch, slots(kind, config, max_len), num_kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}, {"k": KV_AXES, "v": KV_AXES}


# ------------------------------------------------------------------------------------- slot bookkeeping
def _ring_geometry(kind: str, config: SparseAttentionConfig, num_slots: int) -> tuple[int, int]:
  """(first ring slot, ring size): sinks keep min(num_sinks, .) fixed slots before their ring."""
  if STORAGE[kind] != "sinks":
    return 0, num_slots
  sinks = min(config.num_sinks, num_slots)
  return sinks, num_slots - sinks


def _slot_positions(kind: str, config: SparseAttentionConfig, num_slots: int, last: jax.Array) -> jax.Array:
  """int32 [B, slots]: the position each slot holds once positions 0..last[b] are written; -1 = empty."""
  slot = jnp.arange(num_slots, dtype=jnp.int32)[None]
  last = last.astype(jnp.int32)[:, None]
  if STORAGE[kind] == "full":
    return jnp.where(slot <= last, slot, -1)
  first, size = _ring_geometry(kind, config, num_slots)
  ring = slot - first
  # The largest x <= last with x = ring (mod size), and x >= first (sinks hold the positions below).
  position = ring + size * jnp.floor_divide(last - ring, size)
  position = jnp.where((ring >= 0) & (position >= first) & (position >= 0), position, -1)
  return jnp.where(ring < 0, jnp.where(slot <= last, slot, -1), position)


def _slot_of(kind: str, config: SparseAttentionConfig, num_slots: int, position: jax.Array) -> jax.Array:
  """int32 [B]: the slot position[b] is written to."""
  if STORAGE[kind] == "full":
    return position
  first, size = _ring_geometry(kind, config, num_slots)
  return jnp.where(position < first, position, first + position % size)


def write_prefill(kind: str, config: SparseAttentionConfig, cache: dict, k: jax.Array, v: jax.Array,
                  lengths: jax.Array) -> dict:
  """Writes a prompt's k, v [B, T, K, H] (row b real at positions < lengths[b], 1 <= lengths[b] <= T): each slot
  gets the position it holds after lengths[b] tokens (`_slot_positions`), empty slots and pad positions zero."""
  if STORAGE[kind] == "full":  # a masked copy of the prefix (T <= max_len)
    real = (jnp.arange(k.shape[1])[None] < lengths[:, None])[:, :, None, None]
    write = lambda buffer, values: jax.lax.dynamic_update_slice_in_dim(
        buffer, jnp.where(real, values, 0).astype(buffer.dtype), 0, axis=1)
    return {"k": write(cache["k"], k), "v": write(cache["v"], v)}
  held = _slot_positions(kind, config, cache["k"].shape[1], lengths - 1)  # [B, slots], each < lengths[b]
  source = jnp.clip(held, 0, k.shape[1] - 1)[:, :, None, None]

  def gather(values):
    taken = jnp.take_along_axis(values, source, axis=1)
    return jnp.where((held >= 0)[:, :, None, None], taken, 0).astype(cache["k"].dtype)

  return {"k": gather(k), "v": gather(v)}


def write_step(kind: str, config: SparseAttentionConfig, cache: dict, k_t: jax.Array, v_t: jax.Array,
               positions: jax.Array) -> dict:
  """Writes one token per row, k_t, v_t [B, 1, K, H], at positions [B] (< max_len for a full cache)."""
  rows = jnp.arange(k_t.shape[0])
  slot = _slot_of(kind, config, cache["k"].shape[1], positions)
  return {name: cache[name].at[rows, slot].set(new[:, 0].astype(cache[name].dtype), mode="drop")
          for name, new in (("k", k_t), ("v", v_t))}


# ----------------------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=64)
def crop_layout(layout: BlockLayout, seq_len: int) -> BlockLayout:
  """`layout` restricted to its first seq_len queries and keys (the same rows and tiles; padded rows and keys
  follow the BlockLayout contract). Prefill of a listed kind attends under crop(layout(max_len), T), so it
  equals decode where a layout depends on the sequence length (bigbird's per-head random blocks)."""
  if seq_len == layout.seq_q:
    return layout
  num_q, num_kv = math.ceil(seq_len / layout.block_q), math.ceil(seq_len / layout.block_kv)
  table = layout.block_table()[:, :num_q, :num_kv]
  return from_block_table(table, layout.partial_masks, seq_q=seq_len, seq_kv=seq_len, block_q=layout.block_q,
                          block_kv=layout.block_kv, name=f"{layout.name}[:{seq_len}]")


def prefill_layout(kind: str, config: SparseAttentionConfig, *, seq_len: int, max_len: int, num_heads: int,
                   layer: int) -> BlockLayout:
  """The layout a prefill of seq_len tokens attends under: the decode layout of max_len cropped for the listed
  kinds; the ring kinds' layouts do not depend on the length, so theirs is built for seq_len."""
  if STORAGE[kind] != "full":
    return kinds.build_layout(kind, config, seq_len=seq_len, num_heads=num_heads, layer=layer)
  layout = kinds.build_layout(kind, config, seq_len=max_len, num_heads=num_heads, layer=layer)
  return crop_layout(layout, seq_len)


def _ring_visible(kind: str, config: SparseAttentionConfig, query: jax.Array, key: jax.Array) -> jax.Array:
  """The kind's token predicate allowed(q, k) for q [B, 1] and key positions [B, S] (-1 = empty slot)."""
  diff = query - key
  valid = (key >= 0) & (diff >= 0)
  if kind == "local":
    return valid & (diff <= (config.window - 1) * config.dilation) & (diff % config.dilation == 0)
  if kind == "sinks":
    return valid & ((diff <= config.window - 1) | (key < config.num_sinks))
  return valid & (key // config.chunk_size == query // config.chunk_size)  # chunked


def _listed_keys(layout: BlockLayout, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(key positions int32 [B, Hl, S], visible bool [B, Hl, S]) of the blocks `layout` lists for each row's query
  block, S = max_kv * block_kv: kv_count and the PARTIAL tiles' rows decide what is visible."""
  block = positions // layout.block_q
  row = positions % layout.block_q
  kv_index = jnp.asarray(layout.kv_index)[:, block].transpose(1, 0, 2)  # [B, Hl, max_kv]
  mask_id = jnp.asarray(layout.kv_mask_id)[:, block].transpose(1, 0, 2)
  listed = jnp.arange(layout.max_kv) < jnp.asarray(layout.kv_count)[:, block].T[:, :, None]
  tile_rows = jnp.asarray(layout.partial_masks)[jnp.maximum(mask_id, 0), row[:, None, None]]  # [B, Hl, max_kv, bk]
  visible = listed[..., None] & ((mask_id < 0)[..., None] | tile_rows)
  keys = kv_index[..., None] * layout.block_kv + jnp.arange(layout.block_kv)
  batch, heads = keys.shape[:2]
  return keys.reshape(batch, heads, -1), visible.reshape(batch, heads, -1)


def read_step(kind: str, config: SparseAttentionConfig, cache: dict, q_t: jax.Array, positions: jax.Array, *,
              layer: int = 0) -> jax.Array:
  """Attention of one query per row, q_t [B, 1, N, H] at positions [B], over what the cache of `kind` lists for
  it (after `write_step` of that position) -> [B, 1, N, H] in q_t's dtype."""
  k_cache, v_cache = cache["k"], cache["v"]
  batch, num_slots, kv_heads, _ = k_cache.shape
  num_heads = q_t.shape[2]
  if kind in LISTED_KINDS:
    layout = kinds.build_layout(kind, config, seq_len=num_slots, num_heads=num_heads, layer=layer)
    keys, visible = _listed_keys(layout, positions)
    rows = jnp.arange(batch)[:, None, None]
    if layout.num_heads == 1:  # one list for every head: gather [B, S, K, H]
      take = lambda cache_: cache_.at[rows[:, 0], keys[:, 0]].get(mode="clip")
      return _attend(q_t, take(k_cache), take(v_cache), visible[:, 0], per_head=False)
    # Per-head lists: query head n reads its own blocks of kv head n // G: gather [B, N, S, H].
    kv_head = (jnp.arange(num_heads) // (num_heads // kv_heads))[None, :, None]
    take = lambda cache_: cache_.at[rows, keys, kv_head].get(mode="clip")
    return _attend(q_t, take(k_cache), take(v_cache), visible, per_head=True)
  held = _slot_positions(kind, config, num_slots, positions)  # [B, slots]
  if kind == "global":
    visible = held >= 0
  else:
    visible = _ring_visible(kind, config, positions[:, None], held)
  return _attend(q_t, k_cache, v_cache, visible, per_head=False)


def _attend(q_t: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *, per_head: bool) -> jax.Array:
  """Softmax attention of q_t [B, 1, N, H] over gathered keys: shared k, v [B, S, K, H] with visible [B, S], or
  per-head k, v [B, N, S, H] with visible [B, N, S]. f32 statistics; no visible key -> zeros."""
  batch, _, num_heads, head_dim = q_t.shape
  q = q_t[:, 0].astype(jnp.float32) * head_dim**-0.5
  if per_head:
    scores = jnp.einsum("BNH,BNSH->BNS", q, k, preferred_element_type=jnp.float32)
    mask = visible
  else:
    kv_heads = k.shape[2]
    q = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim)
    scores = jnp.einsum("BKGH,BSKH->BKGS", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, num_heads, -1)
    mask = visible[:, None, :]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)
  if per_head:
    out = jnp.einsum("BNS,BNSH->BNH", weights, v, preferred_element_type=jnp.float32)
  else:
    kv_heads = v.shape[2]
    weights = weights.reshape(batch, kv_heads, num_heads // kv_heads, -1)
    out = jnp.einsum("BKGS,BSKH->BKGH", weights, v, preferred_element_type=jnp.float32)
  return out.reshape(batch, 1, num_heads, head_dim).astype(q_t.dtype)


__all__ = ["LISTED_KINDS", "STORAGE", "crop_layout", "init", "prefill_layout", "read_step", "slots", "validate",
           "write_prefill", "write_step"]
