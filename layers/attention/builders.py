"""Named block-sparse attention patterns, built on the host as `BlockLayout`s.

Each builder states its token predicate `allowed(q, k)` (0-based positions; causal means k <= q)
and the paper it comes from. Patterns are composed from small token predicates that can also
classify a whole block as empty / full / partial from its position ranges, so building a layout
costs O(number of blocks) plus O(partial blocks * block_q * block_kv), never O(T^2).

Geometry arguments shared by every builder: `seq_q` (query tokens), `block_q`, and optionally
`seq_kv` (defaults to seq_q) and `block_kv` (defaults to block_q) for rectangular blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from sparseformer.layers.attention.layouts import EMPTY, FULL, BlockLayout, from_block_table, per_head, union

# Block classes, ordered so that AND = minimum and OR = maximum.
NONE, SOME, ALL = 0, 1, 2
_INF = np.iinfo(np.int64).max // 4


class TokenPredicate:
  """allowed(q, k) on broadcastable int64 position arrays, plus a conservative block classifier.

  `classify(q_lo, q_hi, k_lo, k_hi)` gets inclusive real position ranges of the blocks
  ([nq, 1] and [1, nk]) and returns NONE / SOME / ALL per block; NONE and ALL must be exact,
  SOME means "evaluate the tile" (it may turn out empty or full).
  """

  def __call__(self, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def classify(self, q_lo, q_hi, k_lo, k_hi) -> np.ndarray:
    raise NotImplementedError

  def __and__(self, other: TokenPredicate) -> TokenPredicate:
    return _Combined(self, other, np.logical_and, np.minimum)

  def __or__(self, other: TokenPredicate) -> TokenPredicate:
    return _Combined(self, other, np.logical_or, np.maximum)


class _Combined(TokenPredicate):

  def __init__(self, a, b, token_op, class_op):
    self.a, self.b, self.token_op, self.class_op = a, b, token_op, class_op

  def __call__(self, q, k):
    return self.token_op(self.a(q, k), self.b(q, k))

  def classify(self, *ranges):
    return self.class_op(self.a.classify(*ranges), self.b.classify(*ranges))


class Diagonal(TokenPredicate):
  """lo <= q - k <= hi (None: unbounded). Causal = Diagonal(0, None); window = Diagonal(-right, left)."""

  def __init__(self, lo: int | None, hi: int | None):
    self.lo = -_INF if lo is None else lo
    self.hi = _INF if hi is None else hi

  def __call__(self, q, k):
    d = q - k
    return (d >= self.lo) & (d <= self.hi)

  def classify(self, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = q_lo - k_hi, q_hi - k_lo
    full = (d_min >= self.lo) & (d_max <= self.hi)
    none = (d_max < self.lo) | (d_min > self.hi)
    return np.where(full, ALL, np.where(none, NONE, SOME))


class DiagonalPeriod(TokenPredicate):
  """(q - k) % period == 0: every period-th diagonal (dilation, Sparse Transformer stride)."""

  def __init__(self, period: int):
    self.period = period

  def __call__(self, q, k):
    return (q - k) % self.period == 0

  def classify(self, q_lo, q_hi, k_lo, k_hi):
    if self.period == 1:
      return np.full(np.broadcast_shapes(q_lo.shape, k_lo.shape), ALL)
    d_min, d_max = q_lo - k_hi, q_hi - k_lo
    return np.where((d_max // self.period) * self.period >= d_min, SOME, NONE)


class SameChunk(TokenPredicate):
  """q // chunk == k // chunk (Llama-4 chunked attention, Sparse Transformer "fixed" A1)."""

  def __init__(self, chunk: int):
    self.chunk = chunk

  def __call__(self, q, k):
    return q // self.chunk == k // self.chunk

  def classify(self, q_lo, q_hi, k_lo, k_hi):
    c = self.chunk
    full = (q_lo // c == q_hi // c) & (k_lo // c == k_hi // c) & (q_lo // c == k_lo // c)
    none = (q_hi // c < k_lo // c) | (k_hi // c < q_lo // c)
    return np.where(full, ALL, np.where(none, NONE, SOME))


class _OneSided(TokenPredicate):
  """A predicate of one position only (query or key), e.g. global tokens, sinks, summary columns."""

  def __init__(self, fn: Callable[[np.ndarray], np.ndarray], on_query: bool):
    self.fn, self.on_query = fn, on_query

  def __call__(self, q, k):
    return self.fn(q if self.on_query else k)

  def classify(self, q_lo, q_hi, k_lo, k_hi):
    lo, hi = (q_lo, q_hi) if self.on_query else (k_lo, k_hi)
    flat_lo, flat_hi = lo.reshape(-1), hi.reshape(-1)
    width = int((flat_hi - flat_lo).max()) + 1
    pos = np.minimum(flat_lo[:, None] + np.arange(width), flat_hi[:, None])  # repeat last real pos
    values = self.fn(pos)
    cls = np.where(values.all(1), ALL, np.where(values.any(1), SOME, NONE))
    return cls.reshape(lo.shape)


def keys_where(fn: Callable[[np.ndarray], np.ndarray]) -> TokenPredicate:
  """Predicate on the key position only: allowed(q, k) = fn(k)."""
  return _OneSided(fn, on_query=False)


def queries_where(fn: Callable[[np.ndarray], np.ndarray]) -> TokenPredicate:
  """Predicate on the query position only: allowed(q, k) = fn(q)."""
  return _OneSided(fn, on_query=True)


CAUSAL = Diagonal(0, None)


def from_predicate(predicate: TokenPredicate, *, seq_q: int, block_q: int, seq_kv: int | None = None,
                   block_kv: int | None = None, name: str = "predicate") -> BlockLayout:
  """Layout of a token predicate; only blocks the predicate cannot classify are evaluated per token."""
  seq_kv = seq_q if seq_kv is None else seq_kv
  block_kv = block_q if block_kv is None else block_kv
  for field, value in (("seq_q", seq_q), ("seq_kv", seq_kv), ("block_q", block_q), ("block_kv", block_kv)):
    if int(value) <= 0:
      raise ValueError(f"{field} must be > 0, got {value}")
  nq, nk = math.ceil(seq_q / block_q), math.ceil(seq_kv / block_kv)
  q_lo = (np.arange(nq, dtype=np.int64) * block_q)[:, None]
  k_lo = (np.arange(nk, dtype=np.int64) * block_kv)[None, :]
  q_hi, k_hi = np.minimum(q_lo + block_q, seq_q) - 1, np.minimum(k_lo + block_kv, seq_kv) - 1
  cls = np.broadcast_to(predicate.classify(q_lo, q_hi, k_lo, k_hi), (nq, nk))
  table = np.where(cls == ALL, FULL, EMPTY).astype(np.int64)
  qi, kj = np.nonzero(cls == SOME)
  tiles = np.empty((len(qi), block_q, block_kv), bool)
  step = max(1, (1 << 22) // (block_q * block_kv))  # bounds the temporary position arrays
  for start in range(0, len(qi), step):
    sl = slice(start, start + step)
    q = np.minimum(qi[sl, None, None] * block_q + np.arange(block_q)[None, :, None], seq_q - 1)
    k = kj[sl, None, None] * block_kv + np.arange(block_kv)[None, None, :]
    tiles[sl] = np.broadcast_to(predicate(q, k), tiles[sl].shape)
  table[qi, kj] = np.arange(len(qi))
  if not len(qi):
    tiles = np.ones((1, block_q, block_kv), bool)
  return from_block_table(table, tiles, seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv,
                          name=name)


def _check(**values) -> None:
  for field, (value, minimum) in values.items():
    if value is None or int(value) < minimum:
      raise ValueError(f"{field} must be an int >= {minimum}, got {value}")


# ------------------------------------------------------------------------------- patterns
def dense(seq_q: int, *, block_q: int, causal: bool = True, **geometry) -> BlockLayout:
  """Dense attention (Vaswani et al., 2017, "Attention Is All You Need"): k <= q if causal, else all."""
  predicate = CAUSAL if causal else Diagonal(None, None)
  return from_predicate(predicate, seq_q=seq_q, block_q=block_q, name="causal" if causal else "dense",
                        **geometry)


def sliding_window(seq_q: int, *, block_q: int, left: int, right: int = 0, **geometry) -> BlockLayout:
  """Sliding window: q - left <= k <= q + right (`left` keys before the query, `right` after).

  Local attention of the Image Transformer (Parmar et al., 2018) and Longformer (Beltagy et al.,
  2020); Mistral / Gemma local layers use right = 0 and left = window - 1. Same convention as
  `jax.nn.dot_product_attention(local_window_size=(left, right))` and splash `LocalMask`.
  """
  _check(left=(left, 0), right=(right, 0))
  return from_predicate(Diagonal(-right, left), seq_q=seq_q, block_q=block_q,
                        name=f"window({left},{right})", **geometry)


def dilated_window(seq_q: int, *, block_q: int, left: int, dilation: int, right: int = 0,
                   **geometry) -> BlockLayout:
  """Dilated sliding window (Longformer, Beltagy et al., 2020): keys k = q - i*dilation for
  i in [0, left] and k = q + i*dilation for i in [0, right]; dilation = 1 is `sliding_window`."""
  _check(left=(left, 0), right=(right, 0), dilation=(dilation, 1))
  predicate = Diagonal(-right * dilation, left * dilation) & DiagonalPeriod(dilation)
  return from_predicate(predicate, seq_q=seq_q, block_q=block_q,
                        name=f"dilated({left},{right},d={dilation})", **geometry)


def strided(seq_q: int, *, block_q: int, stride: int, causal: bool = True, **geometry) -> BlockLayout:
  """Sparse Transformer strided pattern (Child et al., 2019), both heads' sets in one layout:
  A1 = {k : 0 <= q - k <= stride} (local), A2 = {k : (q - k) % stride == 0} (strided), k <= q.
  Non-causal: |q - k| <= stride or (q - k) % stride == 0. Split A1/A2 over heads with
  `per_head([strided_local, strided_columns, ...])` via `from_predicate` if wanted."""
  _check(stride=(stride, 1))
  local = Diagonal(0 if causal else -stride, stride)
  columns = DiagonalPeriod(stride) & (CAUSAL if causal else Diagonal(None, None))
  return from_predicate(local | columns, seq_q=seq_q, block_q=block_q,
                        name=f"strided({stride}{'' if causal else ',bidir'})", **geometry)


def fixed(seq_q: int, *, block_q: int, stride: int, summary: int, causal: bool = True,
          **geometry) -> BlockLayout:
  """Sparse Transformer fixed pattern (Child et al., 2019): A1 = {k : k // stride == q // stride}
  and A2 = {k : k % stride >= stride - summary} (the last `summary` tokens of every stride-long
  chunk summarise it); k <= q if causal."""
  _check(stride=(stride, 1), summary=(summary, 1))
  if summary > stride:
    raise ValueError(f"summary ({summary}) must be <= stride ({stride})")
  predicate = SameChunk(stride) | keys_where(lambda k: k % stride >= stride - summary)
  if causal:
    predicate = predicate & CAUSAL
  return from_predicate(predicate, seq_q=seq_q, block_q=block_q,
                        name=f"fixed({stride},{summary})", **geometry)


def _global_predicate(num_global: int, causal: bool) -> TokenPredicate:
  predicate = keys_where(lambda k: k < num_global) | queries_where(lambda q: q < num_global)
  return predicate & CAUSAL if causal else predicate


def global_tokens(seq_q: int, *, block_q: int, num_global: int, causal: bool = True,
                  **geometry) -> BlockLayout:
  """Global tokens (ETC, Ainslie et al., 2020; Longformer; BigBird): the first `num_global`
  tokens attend to all tokens and are attended by all: k < num_global or q < num_global
  (and k <= q if causal, so in a decoder they are simply always-visible prefix keys)."""
  _check(num_global=(num_global, 1))
  return from_predicate(_global_predicate(num_global, causal), seq_q=seq_q, block_q=block_q,
                        name=f"global({num_global})", **geometry)


def longformer(seq_q: int, *, block_q: int, left: int, num_global: int, right: int = 0,
               causal: bool = True, **geometry) -> BlockLayout:
  """Longformer (Beltagy et al., 2020): sliding window (left, right) plus global tokens."""
  _check(left=(left, 0), right=(right, 0), num_global=(num_global, 0))
  if causal and right:
    raise ValueError(f"right must be 0 for a causal longformer layout, got {right}")
  predicate = Diagonal(-right, left)
  if num_global:
    predicate = predicate | _global_predicate(num_global, causal)
  return from_predicate(predicate, seq_q=seq_q, block_q=block_q,
                        name=f"longformer({left},{right},g={num_global})", **geometry)


def bigbird(seq_q: int, *, block_q: int, left: int, num_global: int, num_random_blocks: int,
            seed: int = 0, right: int = 0, causal: bool = True, num_heads: int | None = None,
            **geometry) -> BlockLayout:
  """BigBird (Zaheer et al., 2020): sliding window + global tokens + random key blocks.

  Every query block additionally visits `num_random_blocks` key blocks drawn uniformly (NumPy
  generator seeded by `seed`) among those the window/global part does not touch and, if causal,
  that lie entirely at or before the query block's first token (so they are FULL). Fewer are
  drawn when fewer are eligible. `num_heads` given: independent random blocks per head (Hl = H).
  """
  _check(num_random_blocks=(num_random_blocks, 0), seed=(seed, 0))
  base = longformer(seq_q, block_q=block_q, left=left, right=right, num_global=num_global,
                    causal=causal, **geometry)
  nq, nk = base.num_q_blocks, base.num_kv_blocks
  eligible = base.block_table()[0] == EMPTY
  if causal:
    q_first = np.arange(nq)[:, None] * base.block_q
    k_last = np.minimum((np.arange(nk)[None, :] + 1) * base.block_kv, base.seq_kv) - 1
    eligible &= k_last <= q_first
  rng = np.random.default_rng(seed)
  random_mask = np.zeros((num_heads or 1, nq, nk), bool)
  for h in range(num_heads or 1):
    for i in range(nq):
      candidates = np.flatnonzero(eligible[i])
      take = min(num_random_blocks, len(candidates))
      random_mask[h, i, rng.choice(candidates, size=take, replace=False)] = True
  random_table = np.where(random_mask, FULL, EMPTY)
  random_layout = from_block_table(random_table, np.ones((1, base.block_q, base.block_kv), bool),
                                   **base._geometry())
  return union(base, random_layout,
               name=f"bigbird({left},{right},g={num_global},r={num_random_blocks},seed={seed})")


def chunked(seq_q: int, *, block_q: int, chunk: int, causal: bool = True, **geometry) -> BlockLayout:
  """Chunked attention (Llama 4, Meta 2025): a token sees only its own chunk of `chunk` tokens,
  k // chunk == q // chunk, and k <= q if causal."""
  _check(chunk=(chunk, 1))
  predicate = SameChunk(chunk) & CAUSAL if causal else SameChunk(chunk)
  return from_predicate(predicate, seq_q=seq_q, block_q=block_q, name=f"chunked({chunk})", **geometry)


def sinks(seq_q: int, *, block_q: int, num_sinks: int, left: int, **geometry) -> BlockLayout:
  """Attention sinks + sliding window (StreamingLLM, Xiao et al., 2023), causal: the first
  `num_sinks` tokens are always visible (k < num_sinks, k <= q) plus q - left <= k <= q."""
  _check(num_sinks=(num_sinks, 0), left=(left, 0))
  predicate = Diagonal(0, left) | (keys_where(lambda k: k < num_sinks) & CAUSAL)
  return from_predicate(predicate, seq_q=seq_q, block_q=block_q, name=f"sinks({num_sinks},{left})",
                        **geometry)


__all__ = [
    "TokenPredicate", "Diagonal", "DiagonalPeriod", "SameChunk", "keys_where", "queries_where",
    "CAUSAL", "from_predicate", "dense", "sliding_window", "dilated_window", "strided", "fixed",
    "global_tokens", "longformer", "bigbird", "chunked", "sinks", "per_head", "union",
]
