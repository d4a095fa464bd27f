"""BlockLayout: which key blocks each query block visits, and how (the central abstraction).

A layout is a static (host NumPy) description of a block-sparse attention mask. It is built at
trace time, never traced, and every backend (`reference`, `xla`, `pallas`) consumes the same
arrays. The contract (shared with kernels/) is in the `BlockLayout` docstring.

This module holds the data structure, its canonical constructor from a dense block table, the
generic constructors (`from_block_mask`) and the algebra (`union`, `intersection`, `per_head`).
Named patterns (causal, sliding window, BigBird, ...) live in `builders.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# Block-table codes (internal dense view, see `BlockLayout.block_table`).
EMPTY = -2  # block not visited
FULL = -1  # every (q, k) token pair of the block allowed; >= 0: index into partial_masks

_INT_FIELDS = ("kv_index", "kv_count", "kv_mask_id", "q_index", "q_count", "q_mask_id")


class BlockGrid:
  """Block counts and padded lengths of anything with seq_q, seq_kv, block_q, block_kv."""

  @property
  def num_q_blocks(self) -> int:
    return math.ceil(self.seq_q / self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return math.ceil(self.seq_kv / self.block_kv)

  @property
  def padded_seq_q(self) -> int:
    return self.num_q_blocks * self.block_q

  @property
  def padded_seq_kv(self) -> int:
    return self.num_kv_blocks * self.block_kv


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, usable as a jit static
class BlockLayout(BlockGrid):
  """Block-sparse attention mask as per-query-block lists of key blocks.

  Sizes: `num_q_blocks = ceil(seq_q / block_q)`, `num_kv_blocks = ceil(seq_kv / block_kv)`;
  `Hl` (= `num_heads`) is 1 (shared by all heads) or the number of attention heads.

  Forward view (ascending key block ids):
    kv_index:   int32 [Hl, num_q_blocks, max_kv] key block ids; entries past kv_count repeat the
                last valid id (0 when kv_count == 0), so prefetching them stays in bounds.
    kv_count:   int32 [Hl, num_q_blocks] number of valid entries.
    kv_mask_id: int32 [Hl, num_q_blocks, max_kv] -1 = FULL block, >= 0 = PARTIAL (index into
                partial_masks). Padding entries repeat the last valid mask id (-1 when empty).
  Transposed view (per key block, the query blocks that visit it; for dK/dV passes):
    q_index, q_count, q_mask_id: same rules, shapes [Hl, num_kv_blocks, max_q] / [Hl, num_kv_blocks].
  Token predicate:
    partial_masks: bool [P, block_q, block_kv], P >= 1 deduplicated tiles (one all-True dummy if
                nothing is partial). [p, a, b]: query qi*block_q + a may see key kj*block_kv + b.
  Padding: a padded key (index >= seq_kv) is never allowed, so blocks touching the padded key
  tail are PARTIAL. A padded query row (index >= seq_q) behaves exactly like the last real query
  row (never an extra fully masked row); backends drop padded rows from the output.

  allowed(h, q, k) = block (q // block_q, k // block_kv) is listed for head h AND
                     (mask_id == -1 OR partial_masks[mask_id, q % block_q, k % block_kv]).
  Positions of queries and keys both start at 0 (causal means k <= q).
  """

  seq_q: int
  seq_kv: int
  block_q: int
  block_kv: int
  kv_index: np.ndarray
  kv_count: np.ndarray
  kv_mask_id: np.ndarray
  q_index: np.ndarray
  q_count: np.ndarray
  q_mask_id: np.ndarray
  partial_masks: np.ndarray
  name: str = "custom"  # human-readable description (plots, reprs, benchmark tables)

  def __post_init__(self):
    nq, nk = self.num_q_blocks, self.num_kv_blocks
    hl = self.kv_count.shape[0] if self.kv_count.ndim == 2 else -1
    expected = {
        "kv_index": (hl, nq, self.kv_index.shape[-1]), "kv_count": (hl, nq),
        "kv_mask_id": (hl, nq, self.kv_index.shape[-1]),
        "q_index": (hl, nk, self.q_index.shape[-1]), "q_count": (hl, nk),
        "q_mask_id": (hl, nk, self.q_index.shape[-1]),
    }
    for field, shape in expected.items():
      value = getattr(self, field)
      if value.dtype != np.int32 or value.shape != shape:
        raise ValueError(f"BlockLayout.{field}: expected int32 {shape}, got {value.dtype} {value.shape}")
      value.flags.writeable = False
    pm = self.partial_masks
    if pm.dtype != np.bool_ or pm.ndim != 3 or pm.shape[1:] != (self.block_q, self.block_kv) or not len(pm):
      raise ValueError(f"BlockLayout.partial_masks: expected bool [P>=1, {self.block_q}, {self.block_kv}], "
                       f"got {pm.dtype} {pm.shape}")
    pm.flags.writeable = False

  # ----------------------------------------------------------------------------------- sizes
  @property
  def num_heads(self) -> int:
    """Hl: 1 when shared by all heads, else the number of attention heads."""
    return self.kv_count.shape[0]

  @property
  def max_kv(self) -> int:
    return self.kv_index.shape[-1]

  @property
  def max_q(self) -> int:
    return self.q_index.shape[-1]

  def __repr__(self) -> str:
    return (f"BlockLayout({self.name!r}, seq={self.seq_q}x{self.seq_kv}, block={self.block_q}x{self.block_kv}, "
            f"heads={self.num_heads}, max_kv={self.max_kv}, partial_masks={len(self.partial_masks)}, "
            f"density={self.density():.4f})")

  # ------------------------------------------------------------------------------- views
  def block_table(self) -> np.ndarray:
    """Dense block view int32 [Hl, num_q_blocks, num_kv_blocks]: EMPTY (-2), FULL (-1) or a partial id."""
    table = np.full((self.num_heads, self.num_q_blocks, self.num_kv_blocks), EMPTY, np.int32)
    h, i, m = np.nonzero(np.arange(self.max_kv) < self.kv_count[..., None])
    table[h, i, self.kv_index[h, i, m]] = self.kv_mask_id[h, i, m]
    return table

  def density(self) -> float:
    """Fraction of (head, query block, key block) triples visited: the compute relative to dense."""
    return float(self.kv_count.sum()) / (self.num_heads * self.num_q_blocks * self.num_kv_blocks)

  def token_density(self) -> float:
    """Fraction of (head, query, key) token pairs allowed (<= density()). O(T^2): small layouts only."""
    return float(self.to_token_mask().mean())

  def to_token_mask(self) -> np.ndarray:
    """Token mask bool [Hl, seq_q, seq_kv] (padding cropped). O(T^2) memory: tests and plots only."""
    table = self.block_table()
    tiles = np.concatenate([
        self.partial_masks,
        np.ones((1, self.block_q, self.block_kv), bool),  # FULL -> index P
        np.zeros((1, self.block_q, self.block_kv), bool),  # EMPTY -> index P + 1
    ])
    p = len(self.partial_masks)
    tile_id = np.where(table == FULL, p, np.where(table == EMPTY, p + 1, table))
    mask = tiles[tile_id]  # [Hl, nq, nk, bq, bk]
    mask = mask.transpose(0, 1, 3, 2, 4).reshape(self.num_heads, self.padded_seq_q, self.padded_seq_kv)
    return mask[:, :self.seq_q, :self.seq_kv]

  def device_arrays(self) -> dict:
    """The int arrays and partial_masks as jnp arrays (for kernels taking them as operands)."""
    arrays = {name: jnp.asarray(getattr(self, name)) for name in _INT_FIELDS}
    arrays["partial_masks"] = jnp.asarray(self.partial_masks)
    return arrays

  def with_heads(self, num_heads: int) -> BlockLayout:
    """This layout with Hl = num_heads (a shared layout repeated per head)."""
    if self.num_heads == num_heads:
      return self
    if self.num_heads != 1:
      raise ValueError(f"cannot broadcast a layout with {self.num_heads} heads to {num_heads} heads")
    table = np.repeat(self.block_table(), num_heads, axis=0)
    return from_block_table(table, self.partial_masks, **self._geometry(), name=self.name)

  def _geometry(self) -> dict:
    return dict(seq_q=self.seq_q, seq_kv=self.seq_kv, block_q=self.block_q, block_kv=self.block_kv)


# --------------------------------------------------------------------------- construction
def _list_view(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Compress a block table [Hl, R, C] into (index, count, mask_id) lists of visited columns."""
  visited = table != EMPTY
  count = visited.sum(-1).astype(np.int32)
  width = max(int(count.max(initial=0)), 1)
  # Stable argsort of "not visited" puts visited columns first, in ascending order.
  order = np.argsort(~visited, axis=-1, kind="stable")[..., :width].astype(np.int32)
  slot = np.minimum(np.arange(width), np.maximum(count[..., None] - 1, 0))  # padding repeats the last
  index = np.take_along_axis(order, slot, axis=-1)
  index = np.where(count[..., None] > 0, index, 0).astype(np.int32)
  mask_id = np.take_along_axis(table, index, axis=-1)
  mask_id = np.where(count[..., None] > 0, mask_id, FULL).astype(np.int32)
  return index, count, mask_id


def from_block_table(table: np.ndarray, tiles: np.ndarray, *, seq_q: int, seq_kv: int, block_q: int,
                     block_kv: int | None = None, name: str = "custom") -> BlockLayout:
  """Canonical BlockLayout from a dense block table (every other constructor ends here).

  Args:
    table: int [Hl, nq, nk] or [nq, nk]: EMPTY (-2), FULL (-1) or an index into `tiles`.
    tiles: bool [P, block_q, block_kv] token masks of the partial entries (may repeat, may be
      all-True / all-False: they are deduplicated and reclassified as FULL / EMPTY here).
  Padding rules of the contract are enforced here: padded keys are masked out (a FULL block
  touching the key tail becomes PARTIAL) and padded query rows copy the last real row.
  """
  block_kv = block_q if block_kv is None else block_kv
  for field, value in (("seq_q", seq_q), ("seq_kv", seq_kv), ("block_q", block_q), ("block_kv", block_kv)):
    if int(value) <= 0:
      raise ValueError(f"{field} must be > 0, got {value}")
  nq, nk = math.ceil(seq_q / block_q), math.ceil(seq_kv / block_kv)
  table = np.asarray(table, np.int64)
  table = table[None] if table.ndim == 2 else table
  if table.shape[1:] != (nq, nk):
    raise ValueError(f"block table shape {table.shape} does not match ({nq}, {nk}) blocks for "
                     f"seq {seq_q}x{seq_kv} and block {block_q}x{block_kv}")
  tiles = np.asarray(tiles, bool).reshape(-1, block_q, block_kv)

  # Gather every partial entry's tile together with the padding of its block position.
  h, qi, kj = np.nonzero(table >= 0)
  padded_key = seq_kv % block_kv != 0
  h_full, qi_full, kj_full = np.nonzero((table == FULL) & padded_key & (np.arange(nk) == nk - 1))
  entries = tiles[table[h, qi, kj]]
  entries = np.concatenate([entries, np.ones((len(h_full), block_q, block_kv), bool)])
  h, qi, kj = (np.concatenate(pair) for pair in ((h, h_full), (qi, qi_full), (kj, kj_full)))
  key_valid = (kj[:, None] * block_kv + np.arange(block_kv)) < seq_kv  # [N, bk]
  entries &= key_valid[:, None, :]
  last_row = np.minimum(np.arange(block_q)[None] + qi[:, None] * block_q, seq_q - 1) - qi[:, None] * block_q
  entries = np.take_along_axis(entries, last_row[:, :, None], axis=1)  # padded rows copy the last real row

  out = np.where(table == FULL, FULL, EMPTY).astype(np.int32)
  is_full = entries.all(axis=(1, 2))
  is_empty = ~entries.any(axis=(1, 2))
  out[h, qi, kj] = np.where(is_full, FULL, EMPTY)
  partial = ~is_full & ~is_empty
  if partial.any():
    packed = np.packbits(entries[partial].reshape(int(partial.sum()), -1), axis=1)
    unique, inverse = np.unique(packed, axis=0, return_inverse=True)
    out[h[partial], qi[partial], kj[partial]] = inverse.reshape(-1)
    partial_masks = np.unpackbits(unique, axis=1, count=block_q * block_kv).astype(bool)
    partial_masks = partial_masks.reshape(-1, block_q, block_kv)
  else:
    partial_masks = np.ones((1, block_q, block_kv), bool)

  kv_index, kv_count, kv_mask_id = _list_view(out)
  q_index, q_count, q_mask_id = _list_view(out.transpose(0, 2, 1))
  return BlockLayout(seq_q=int(seq_q), seq_kv=int(seq_kv), block_q=int(block_q), block_kv=int(block_kv),
                     kv_index=kv_index, kv_count=kv_count, kv_mask_id=kv_mask_id, q_index=q_index,
                     q_count=q_count, q_mask_id=q_mask_id, partial_masks=partial_masks, name=name)


def from_block_mask(block_mask: np.ndarray, *, seq_q: int, seq_kv: int | None = None, block_q: int,
                    block_kv: int | None = None, name: str = "block_mask") -> BlockLayout:
  """Layout visiting exactly the blocks set in `block_mask` (bool [nq, nk] or [Hl, nq, nk]), all FULL.

  The generic escape hatch (e.g. the block-sparse masks of OpenAI's blocksparse / DeepSpeed
  Sparse Attention). Combine with `intersection(..., dense(causal=True))` for a token-level
  causal diagonal. Only the padded key tail is masked at token level.
  """
  block_mask = np.asarray(block_mask)
  if block_mask.dtype != np.bool_:
    raise ValueError(f"block_mask must be a bool array, got {block_mask.dtype}")
  seq_kv = seq_q if seq_kv is None else seq_kv
  table = np.where(block_mask, FULL, EMPTY)
  return from_block_table(table, np.ones((1, block_q, block_kv or block_q), bool), seq_q=seq_q,
                          seq_kv=seq_kv, block_q=block_q, block_kv=block_kv, name=name)


# ------------------------------------------------------------------------------- algebra
def _dense_tiles(layout: BlockLayout, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
  """(tile ids [H, nq, nk], tiles [P + 2, bq, bk]) with FULL -> P (all True), EMPTY -> P + 1."""
  table = layout.with_heads(num_heads).block_table()
  p = len(layout.partial_masks)
  tiles = np.concatenate([layout.partial_masks, np.ones((1, layout.block_q, layout.block_kv), bool),
                          np.zeros((1, layout.block_q, layout.block_kv), bool)])
  return np.where(table == FULL, p, np.where(table == EMPTY, p + 1, table)), tiles


def _combine(layouts: Sequence[BlockLayout], is_union: bool, name: str | None) -> BlockLayout:
  if not layouts:
    raise ValueError("need at least one layout")
  geometry = layouts[0]._geometry()
  for layout in layouts[1:]:
    if layout._geometry() != geometry:
      raise ValueError(f"layouts differ in geometry: {layout._geometry()} vs {geometry}")
  num_heads = max(layout.num_heads for layout in layouts)
  tables = [layout.with_heads(num_heads).block_table() for layout in layouts]
  if is_union:
    result = np.where(np.any([t == FULL for t in tables], 0), FULL, EMPTY)
    touched = np.any([t != EMPTY for t in tables], 0) & (result != FULL)
  else:
    result = np.where(np.all([t == FULL for t in tables], 0), FULL, EMPTY)
    touched = np.all([t != EMPTY for t in tables], 0) & (result != FULL)
  h, qi, kj = np.nonzero(touched)
  tile = None
  for layout in layouts:  # combine only the blocks whose result needs a token-level mask
    ids, tiles = _dense_tiles(layout, num_heads)
    part = tiles[ids[h, qi, kj]]
    tile = part if tile is None else (tile | part if is_union else tile & part)
  table = result.astype(np.int64)
  tiles = np.ones((1, geometry["block_q"], geometry["block_kv"]), bool)
  if len(h):
    table[h, qi, kj] = np.arange(len(h))
    tiles = tile
  op = " | " if is_union else " & "
  return from_block_table(table, tiles, **geometry,
                          name=name or "(" + op.join(layout.name for layout in layouts) + ")")


def union(*layouts: BlockLayout, name: str | None = None) -> BlockLayout:
  """Token-level union: a pair is allowed if any layout allows it. Hl=1 layouts broadcast over heads."""
  return _combine(layouts, True, name)


def intersection(*layouts: BlockLayout, name: str | None = None) -> BlockLayout:
  """Token-level intersection: a pair is allowed if every layout allows it."""
  return _combine(layouts, False, name)


def per_head(layouts: Sequence[BlockLayout], *, name: str | None = None) -> BlockLayout:
  """Per-head mixture: head h uses `layouts[h]` (each with Hl=1), e.g. Sparse Transformer's
  strided heads (Child et al., 2019) or a local/global split of heads within one layer."""
  layouts = list(layouts)
  if not layouts:
    raise ValueError("per_head needs at least one layout")
  geometry = layouts[0]._geometry()
  tables, tiles, offset = [], [], 0
  for layout in layouts:
    if layout._geometry() != geometry or layout.num_heads != 1:
      raise ValueError(f"per_head needs Hl=1 layouts of one geometry {geometry}; got {layout!r}")
    table = layout.block_table()
    tables.append(np.where(table >= 0, table + offset, table))
    tiles.append(layout.partial_masks)
    offset += len(layout.partial_masks)
  return from_block_table(np.concatenate(tables), np.concatenate(tiles), **geometry,
                          name=name or "per_head[" + ", ".join(layout.name for layout in layouts) + "]")
