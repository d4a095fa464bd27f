"""Per-token key-block selections -> a traced BlockLayout -> the existing backends (reference / xla / pallas).

    out = attend_selected(q, k, v, block_index, block_q=64, block_kv=512, backend="xla")

`block_index` int32 [B, Hl, T, S] lists, for every query token, the key blocks (of `block_kv` tokens) it attends
(-1 = empty slot; order and duplicates do not matter); Hl = 1 (shared), KVH (per GQA group, NSA) or H (per query
head, MoBA). A query block of `block_q` tokens visits the union of its tokens' blocks (the research note's
option (b)); every visited tile is PARTIAL with the token mask "row r selected this block" AND causal (key
position <= query position) AND "key < seq_kv", AND an optional per-slot key mask (`token_mask`, e.g. DSA-block's
selected keys inside a block). Padded query rows copy the last real row (BlockLayout contract).

Cost: the union width W (static; `width`, default min(num_kv_blocks, block_q * S)) is what the xla backend
iterates per query block, and the tiles take Hl' * T * W * block_kv bools, Hl' = B * H (batch and heads are
folded into the layout's head axis so that every backend runs it unchanged) or 1 for one shared selection.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sparseformer.layers.attention import backends
from sparseformer.layers.attention.layouts import FULL


@dataclasses.dataclass(frozen=True)
class TracedLayout:
  """The BlockLayout contract fields with jax (maybe traced) lists; see layouts.BlockLayout."""

  seq_q: int
  seq_kv: int
  block_q: int
  block_kv: int
  kv_index: jax.Array  # int32 [Hl, nq, W]
  kv_count: jax.Array  # int32 [Hl, nq]
  kv_mask_id: jax.Array  # int32 [Hl, nq, W]
  partial_masks: jax.Array  # bool [Hl * nq * W, bq, bk]: one tile per list entry


def union_width(num_kv_blocks: int, block_q: int, slots: int) -> int:
  """The widest possible union of `slots` blocks chosen by each of `block_q` tokens."""
  return max(1, min(num_kv_blocks, block_q * slots))


def selected_layout(block_index: jax.Array, *, seq_kv: int, block_q: int, block_kv: int, width: int | None = None,
                    token_mask: jax.Array | None = None, causal: bool = True) -> TracedLayout:
  """Traced layout of one sequence's selections block_index int32 [Hl, T, S] (-1 = empty).

  Each query block lists the ascending union of its rows' blocks, at most `width` of them (default
  `union_width`; a union wider than `width` is cut to its `width` lowest blocks, so pass a bound). Entries
  past kv_count repeat the last listed id and mask id (FULL when a row lists nothing). token_mask: bool
  [Hl, T, S, block_kv], for slot s of token t the keys of its block it may see.
  """
  heads, seq_q, slots = block_index.shape
  nq, nk = math.ceil(seq_q / block_q), math.ceil(seq_kv / block_kv)
  width = union_width(nk, block_q, slots) if width is None else min(width, nk)
  rows = jnp.minimum(jnp.arange(nq * block_q), seq_q - 1)  # padded query rows copy the last real row
  selection = block_index[:, rows].astype(jnp.int32)  # [Hl, Tp, S]
  listed = (selection >= 0) & (selection < nk)
  head = jnp.arange(heads)[:, None, None]
  chosen = jnp.zeros((heads, nq * block_q, nk + 1), bool)
  chosen = chosen.at[head, jnp.arange(nq * block_q)[None, :, None], jnp.where(listed, selection, nk)].set(True)
  chosen = chosen[..., :nk].reshape(heads, nq, block_q, nk)
  union = chosen.any(axis=2)  # [Hl, nq, nk]
  count = jnp.minimum(union.sum(-1), width).astype(jnp.int32)
  # Visited blocks rank by nk - id, so top_k lists them first and in ascending order.
  _, kv_index = jax.lax.top_k(jnp.where(union, nk - jnp.arange(nk), 0), width)
  slot = jnp.arange(width)
  last = jnp.maximum(count - 1, 0)[..., None]
  in_list = slot < count[..., None]
  kv_index = jnp.where(count[..., None] > 0, jnp.where(in_list, kv_index, jnp.take_along_axis(kv_index, last, -1)), 0)
  tile = jnp.arange(heads * nq * width, dtype=jnp.int32).reshape(heads, nq, width)
  kv_mask_id = jnp.where(count[..., None] > 0, jnp.where(in_list, tile, jnp.take_along_axis(tile, last, -1)), FULL)

  # Tiles [Hl, nq, W, bq, bk]: row r selected the block, key in range, causal, per-slot key mask.
  gather_index = jnp.broadcast_to(kv_index[:, :, None, :], (heads, nq, block_q, width))
  row_selected = jnp.take_along_axis(chosen, gather_index, axis=-1)  # [Hl, nq, bq, W]
  masks = jnp.swapaxes(row_selected, 2, 3)[..., None]  # [Hl, nq, W, bq, 1]
  key_pos = kv_index[..., None] * block_kv + jnp.arange(block_kv)  # [Hl, nq, W, bk]
  masks = masks & (key_pos < seq_kv)[:, :, :, None, :]
  if causal:
    query_pos = rows.reshape(nq, block_q)[None, :, None, :, None]
    masks = masks & (key_pos[:, :, :, None, :] <= query_pos)
  if token_mask is not None:
    row_selection = selection.reshape(heads, nq, block_q, 1, slots)
    which_slot = jnp.argmax(row_selection == kv_index[:, :, None, :, None], axis=-1)  # [Hl, nq, bq, W]
    row_mask = token_mask[:, rows].reshape(heads, nq, block_q, slots, block_kv)
    slot_mask = jnp.take_along_axis(row_mask, which_slot[..., None], axis=3)  # [Hl, nq, bq, W, bk]
    masks = masks & jnp.swapaxes(slot_mask, 2, 3)
  return TracedLayout(seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv, kv_index=kv_index.astype(jnp.int32),
                      kv_count=count, kv_mask_id=kv_mask_id.astype(jnp.int32),
                      partial_masks=masks.reshape(heads * nq * width, block_q, block_kv))


def attend_selected(q: jax.Array, k: jax.Array, v: jax.Array, block_index: jax.Array, *, block_q: int, block_kv: int,
                    backend: str = "auto", width: int | None = None, token_mask: jax.Array | None = None,
                    causal: bool = True, scale: float | None = None) -> jax.Array:
  """Attention of q [B, T, H, D] over k, v [B, S, KVH, D] restricted to each token's selected key blocks.

  block_index int32 [B, Hl, T, Sl] with Hl in (1, KVH, H) (a KVH row serves its GQA group of query heads);
  token_mask bool [B, Hl, T, Sl, block_kv] optional. Returns [B, T, H, D] in q.dtype; a row that selects
  nothing visible returns zeros. Gradients flow to q, k, v (never to the selection). `width` bounds the
  union of a query block's selections (see `selected_layout`).
  """
  batch, seq_q, heads, dim = q.shape
  kv_heads = k.shape[2]
  if block_index.ndim != 4 or block_index.shape[0] != batch or block_index.shape[2] != seq_q:
    raise ValueError(f"block_index must be [B={batch}, Hl, T={seq_q}, S], got {block_index.shape}")
  selection_heads = block_index.shape[1]
  if selection_heads not in (1, kv_heads, heads):
    raise ValueError(f"block_index has {selection_heads} head rows; it must have 1, num_kv_heads={kv_heads} or "
                     f"num_heads={heads}")
  if token_mask is not None and token_mask.shape != (*block_index.shape, block_kv):
    raise ValueError(f"token_mask must be {(*block_index.shape, block_kv)} ([B, Hl, T, S, block_kv]), got "
                     f"{token_mask.shape}")
  shared = selection_heads == 1 and batch == 1
  if not shared and selection_heads != heads:  # per-group or shared rows serve their query heads
    repeat = heads // selection_heads
    block_index = jnp.repeat(block_index, repeat, axis=1)
    token_mask = None if token_mask is None else jnp.repeat(token_mask, repeat, axis=1)
  layout_rows = 1 if shared else batch * heads
  block_index = block_index.reshape(layout_rows, seq_q, -1)
  token_mask = None if token_mask is None else token_mask.reshape(layout_rows, seq_q, -1, block_kv)
  layout = selected_layout(block_index, seq_kv=k.shape[1], block_q=block_q, block_kv=block_kv, width=width,
                           token_mask=token_mask, causal=causal)
  # Batch folded into heads: query head b * H + h reads kv head b * KVH + h // G, as GQA does.
  fold = lambda x: jnp.swapaxes(x, 0, 1).reshape(1, x.shape[1], -1, x.shape[3])
  out = backends.attend(fold(q), fold(k), fold(v), layout, backend=backend, scale=scale)
  return jnp.swapaxes(out.reshape(seq_q, batch, heads, dim), 0, 1)
