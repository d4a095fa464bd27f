"""Block-sparse attention over a `BlockLayout`: dense reference, pure-JAX gather path, dispatch.

    out = attend(q, k, v, layout)    # q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, D]

Backends (all compute the same function, tests hold them equal):
  reference  layout -> dense token mask [Hl, T, S] -> masked softmax, all in f32. O(T*S): tests only.
  xla        per query block, gather the listed key/value blocks and attend. Time and memory
             O(T * max_kv * block_kv); no T x S buffer. Flash-style custom VJP (see the xla section).
             Host layouts run in buckets of similar list length; traced ones at width max_kv.
  pallas     sparseformer.kernels.block_sparse_attention.block_sparse_attention (flash-style).
  auto       pallas on GPU/TPU where the compiled kernel supports the head dim, layout blocks and
             dtype (e.g. TPU needs blocks that are multiples of 128), else xla (`resolve_backend`).

Layouts: a `BlockLayout`, or any object with its contract fields whose lists are jax arrays built
inside jit (content-routed attention, e.g. top-k key blocks per query block). reference and xla
read both through layout_view.py, the pallas kernel through its own layout_to_arrays.

Contract (every backend): GQA with query head h reading kv head h // (H // KVH); softmax
statistics in f32 whatever the input dtype; output in q.dtype; a query row with no visible key
returns zeros (and zero, finite gradients); `scale` defaults to 1 / sqrt(D).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.kernels import block_sparse_attention as pallas_kernel
from sparseformer.layers.attention.config import BACKENDS
from sparseformer.layers.attention.layouts import BlockLayout
from sparseformer.layers.attention.layout_view import (LIST_FIELDS, Geometry, geometry, on_host, tile_ids,
                                                       tile_table, token_mask)

_LOG = logging.getLogger(__name__)
_KERNEL_PLATFORMS = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}  # JAX platform -> kernels
_reported_fallbacks: set[tuple[str, str]] = set()  # (platform, reason) already logged


def resolve_backend(backend: str, q=None, layout=None, *, platform: str | None = None) -> str:
  """Concrete backend name for `backend` on `platform` (a JAX platform name; None: jax.default_backend()).

  "auto" is pallas on GPU/TPU, else xla. Given `q` (anything with .shape [B, T, H, D] and .dtype, e.g. a
  jax.ShapeDtypeStruct) and `layout` (its block_q, block_kv), "auto" is also xla where the compiled kernel
  rejects them (`block_sparse_attention.unsupported_reason`, e.g. TPU layout blocks that are not multiples of
  128, a GPU head dim that is not a power of two >= 16), with one warning per reason on this module's logger.
  Without q and layout it answers for the platform alone. Other names come back as given (an explicit
  "pallas" raises the kernel's ValueError where it is unsupported); a name not in BACKENDS raises ValueError.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  platform = jax.default_backend() if platform is None else platform
  kernel_platform = _KERNEL_PLATFORMS.get(platform)
  if kernel_platform is None:
    return "xla"
  if q is None or layout is None:
    return "pallas"
  reason = pallas_kernel.unsupported_reason(kernel_platform, q.shape[-1], layout.block_q, layout.block_kv,
                                            q.dtype)
  if reason is None:
    return "pallas"
  if (platform, reason) not in _reported_fallbacks:
    _reported_fallbacks.add((platform, reason))
    _LOG.warning("attention backend 'auto' on %s: the Pallas kernel does not support this configuration "
                 "(%s); using the xla backend. Pass backend='xla' to choose it explicitly.", platform, reason)
  return "xla"


def _as_arrays(q, k, v) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v as jax arrays: every backend accepts any array-like (NumPy arrays, nested lists)."""
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _check_shapes(q, k, v, layout) -> Geometry:
  """Checks q, k, v against each other and the layout; returns the layout's static facts."""
  geo = geometry(layout)
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B, T, H, D] and k, v [B, S, KVH, D]; got {q.shape}, {k.shape}, {v.shape}")
  (batch, seq_q, heads, dim), (kv_batch, seq_kv, kv_heads, kv_dim) = q.shape, k.shape
  if batch != kv_batch or dim != kv_dim:
    raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head dim")
  if heads % kv_heads:
    raise ValueError(f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})")
  if (seq_q, seq_kv) != (geo.seq_q, geo.seq_kv):
    raise ValueError(f"layout built for seq {geo.seq_q}x{geo.seq_kv}, inputs have {seq_q}x{seq_kv}; "
                     "build the layout for the actual sequence lengths")
  if geo.num_heads not in (1, heads):
    raise ValueError(f"layout has {geo.num_heads} heads; it must have 1 or num_heads={heads}")
  return geo


def attend(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout, *, backend: str = "auto",
           scale: float | None = None) -> jax.Array:
  """Block-sparse attention of q [B, T, H, D] over k, v [B, S, KVH, D] under `layout` -> [B, T, H, D].

  `layout` is a BlockLayout or any object with its contract fields whose lists (kv_index, kv_count,
  kv_mask_id; partial_masks too) may be jax arrays built inside jit (content-routed attention). Such
  lists are not validated: ids must lie in [0, num_kv_blocks) and no row may list a block twice.
  `scale` multiplies the logits (None: 1 / sqrt(D)); `backend` as in `resolve_backend`.

  Raises ValueError on inputs that disagree with each other or with the layout (rank, batch, head
  dim, H % KVH, sequence lengths, layout heads), on a layout missing a contract field or with lists
  of the wrong shape, and on an unknown backend; backend="pallas" adds the kernel's errors.
  """
  q, k, v = _as_arrays(q, k, v)
  geo = _check_shapes(q, k, v, layout)
  backend = resolve_backend(backend, q, geo)
  if backend == "reference":
    return reference_attention(q, k, v, layout, scale=scale)
  if backend == "xla":
    return xla_attention(q, k, v, layout, scale=scale)
  return pallas_kernel.block_sparse_attention(q, k, v, layout, scale=scale)


def _masked_softmax_stats(scores: jax.Array, mask: jax.Array, axes: tuple[int, ...]):
  """(unnormalised probabilities, row max, row sum) of a masked f32 score tensor.

  Masked entries are -inf before the exp (never exp of a large number times a zero cotangent,
  which would be NaN); a row with no visible key gets max 0, probabilities 0 and sum 0.
  """
  row_max = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=axes, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  probs = jnp.exp(jnp.where(mask, scores - row_max, -jnp.inf))
  return probs, row_max, jnp.sum(probs, axis=axes, keepdims=True)


def reference_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None) -> jax.Array:
  """Obvious dense masked attention: `masked_attention` under the layout's token mask (tests only)."""
  q, k, v = _as_arrays(q, k, v)
  geo = _check_shapes(q, k, v, layout)
  mask = layout.to_token_mask() if isinstance(layout, BlockLayout) else token_mask(layout, geo)
  return masked_attention(q, k, v, jnp.asarray(mask), scale=scale)


def masked_attention(q, k, v, mask: jax.Array, *, scale: float | None = None) -> jax.Array:
  """Dense attention in f32 under a token mask bool [Hl, T, S] (Hl = 1 or H); materialises [B, H, T, S].

  q [B, T, H, D], k/v [B, S, KVH, D] (K/V repeated over the GQA group: clarity over memory).
  """
  heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  group = heads // kv_heads
  k32 = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  v32 = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k32) * scale
  probs, _, row_sum = _masked_softmax_stats(scores, mask[None], (-1,))
  out = jnp.einsum("bhts,bshd->bthd", probs / jnp.where(row_sum > 0, row_sum, 1.0), v32)
  return out.astype(q.dtype)


# ------------------------------------------------------------------------------------- xla
# Design (measured on 2 CPU cores at T=8192, H=8, D=64, block 128, window 512; see
# docs/benchmarks/attention.md): one `lax.map` / `lax.scan` step per query block keeps the
# step's scores [B, H, bq, max_kv * bk] in cache, which ran the forward 2x faster than gathering
# every block at once; a custom VJP that recomputes probabilities from the saved log-sum-exp and
# scatter-adds dK/dV per step ran forward+backward 1.2x faster than autodiff through the same
# scan and 1.7x faster than autodiff through the all-at-once gather (AMD EPYC, 2026-11; re-measured on an
# Intel Xeon 2026-12-01: 1.07x and 1.14x, with 3.5x and 4.5x less memory). Residuals are q, k, v, out
# and the f32 log-sum-exp only (flash-attention style), so memory stays O(T * H * D) plus one
# step's O(B * H * bq * max_kv * bk).


def _bucket_widths(counts: np.ndarray, max_buckets: int = 4, min_gain: float = 0.1) -> np.ndarray:
  """Widths (ascending) that split query blocks by list length: each block goes to the smallest
  width >= its count. Chosen by DP to minimise padded work (sum of widths); a bucket is added only
  while it cuts the padded work by `min_gain` (each bucket is one more loop to compile and run)."""
  values, freq = np.unique(np.maximum(counts, 1), return_counts=True)
  n = len(values)
  prefix = np.concatenate([[0], np.cumsum(freq)])
  # best[b][i]: least padded work covering values[:i + 1] with b buckets, the last of width values[i].
  best = np.full((max_buckets + 1, n), np.inf)
  choice = np.zeros((max_buckets + 1, n), int)
  for i in range(n):
    best[1][i] = values[i] * prefix[i + 1]
  for b in range(2, max_buckets + 1):
    for i in range(1, n):  # the previous bucket ends at values[j], j < i
      cost = best[b - 1][:i] + values[i] * (prefix[i + 1] - prefix[1:i + 1])
      choice[b][i] = int(np.argmin(cost))
      best[b][i] = cost[choice[b][i]]
  buckets = 1
  while buckets < max_buckets and best[buckets + 1][n - 1] < (1 - min_gain) * best[buckets][n - 1]:
    buckets += 1
  widths, i = [], n - 1
  for b in range(buckets, 0, -1):
    widths.append(int(values[i]))
    i = choice[b][i]
  return np.array(sorted(widths))


class _Plan:
  """Host-side constants of one (layout, head configuration): gather indices, mask tiles, buckets.

  Query blocks are grouped into a few buckets of similar list length (`_bucket_widths`), each run as
  its own loop with its own width, so one long row (a global query, a late strided row) does not
  pad every row to `max_kv`. Outputs are put back in query-block order by a static permutation.
  The forward and backward take the bucket arrays from `unpack(lists)`; a host plan's `lists` is ().
  """

  def __init__(self, layout: BlockLayout, num_heads: int, kv_heads: int, dim: int):
    self._init_heads(layout, num_heads, kv_heads, dim)
    self.tiles = tile_table(np, layout.partial_masks)
    tile_id = tile_ids(np, layout.kv_count, layout.kv_mask_id, self.layout.num_partial)
    tile_id = tile_id.transpose(1, 0, 2)  # [nq, Hl, max_kv]
    index = self.gather_index(np, layout.kv_index)
    counts = layout.kv_count.max(axis=0)  # [nq]: a step serves every head of its query block
    widths = _bucket_widths(counts)
    bucket_of = np.searchsorted(widths, np.maximum(counts, 1))
    # (query block ids, index [n, Hl|H, width], tile ids [n, Hl, width]) per bucket. Lists are padded
    # with their last valid id (contract), so truncating to width >= count keeps them valid.
    self.buckets = []
    for b, width in enumerate(widths):
      steps = np.flatnonzero(bucket_of == b)
      self.buckets.append((steps, index[steps, :, :width].astype(np.int32), tile_id[steps, :, :width]))
    order = np.concatenate([steps for steps, _, _ in self.buckets])
    self.inverse = None if (order == np.arange(len(order))).all() else np.argsort(order)

  def _init_heads(self, layout, num_heads: int, kv_heads: int, dim: int):
    self.layout, self.num_heads, self.kv_heads, self.dim = geometry(layout), num_heads, kv_heads, dim
    self.shared = self.layout.num_heads == 1
    # Gather groups: a shared layout gathers once per kv head and its GQA group of R query heads
    # reuses the blocks (K/V are never repeated); a per-head layout gathers per query head.
    self.groups = kv_heads if self.shared else num_heads
    self.heads_per_group = num_heads // self.groups

  def gather_index(self, xp, kv_index):
    """Per query block, the rows of `kv_blocks` to gather: [nq, 1, max_kv] into [B, KVH, nk, ...]
    (shared layout) or [nq, H, max_kv] into the flattened [B, KVH * nk, ...] (per head)."""
    if self.shared:
      return kv_index.transpose(1, 0, 2)
    kv_head = (xp.arange(self.num_heads) // (self.num_heads // self.kv_heads))[:, None, None]
    return (kv_head * self.layout.num_kv_blocks + kv_index).transpose(1, 0, 2)

  def unpack(self, lists: tuple):
    """(tile table, [(query block ids, gather index, tile ids)] per bucket) from the plan operands."""
    del lists  # a host plan's arrays are its own constants
    return jnp.asarray(self.tiles), [(steps, jnp.asarray(index), jnp.asarray(tile_id))
                                     for steps, index, tile_id in self.buckets]

  def kv_blocks(self, x: jax.Array) -> jax.Array:
    """[B, Sp, KVH, D] -> [B, KVH, nk, bk, D] (shared) or [B, KVH * nk, bk, D] (per head)."""
    lay = self.layout
    x = x.reshape(x.shape[0], lay.num_kv_blocks, lay.block_kv, self.kv_heads, self.dim).transpose(0, 3, 1, 2, 4)
    return x if self.shared else x.reshape(x.shape[0], -1, lay.block_kv, self.dim)

  def kv_unblocks(self, x: jax.Array) -> jax.Array:
    lay = self.layout
    x = x.reshape(x.shape[0], self.kv_heads, lay.num_kv_blocks, lay.block_kv, self.dim)
    return x.transpose(0, 2, 3, 1, 4).reshape(x.shape[0], lay.padded_seq_kv, self.kv_heads, self.dim)

  def gather(self, blocks: jax.Array, index: jax.Array) -> jax.Array:
    """One query block's listed key blocks: index [Hl, width] -> [B, Gr, width, bk, D]."""
    return blocks[:, :, index[0]] if self.shared else blocks[:, index]

  def scatter_add(self, acc: jax.Array, index: jax.Array, update: jax.Array) -> jax.Array:
    return acc.at[:, :, index[0]].add(update) if self.shared else acc.at[:, index].add(update)

  def mask(self, tiles: jax.Array, tile_id: jax.Array) -> jax.Array:
    """[Hl, width] tile ids -> bool [1, Hl, bq, 1, width, bk], broadcastable to the scores."""
    return tiles[tile_id].transpose(0, 2, 1, 3)[None, :, :, None]

  def q_steps(self, x: jax.Array) -> jax.Array:
    """[B, Tp, H, F] -> [nq, B, Gr, bq, R, F] (one loop step per query block)."""
    lay = self.layout
    x = x.reshape(x.shape[0], lay.num_q_blocks, lay.block_q, self.groups, self.heads_per_group, x.shape[-1])
    return x.transpose(1, 0, 3, 2, 4, 5)

  def q_unsteps(self, x: jax.Array) -> jax.Array:
    return x.transpose(1, 0, 3, 2, 4, 5).reshape(x.shape[1], self.layout.padded_seq_q, self.num_heads, -1)

  def select(self, x: jax.Array, steps: np.ndarray | None) -> jax.Array:
    """Rows `steps` of a per-query-block array [nq, ...] (no gather with a single bucket)."""
    return x if steps is None or len(self.buckets) == 1 else x[steps]

  def merge(self, parts: list[jax.Array]) -> jax.Array:
    """Per-bucket results [n_b, ...] -> [nq, ...] in query-block order."""
    merged = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return merged if self.inverse is None else merged[self.inverse]


class _TracedPlan(_Plan):
  """`_Plan` of a layout whose lists are jax arrays (maybe traced, e.g. top-k routed inside jit).

  One bucket of the static width max_kv (no host view of the list lengths); gather indices and tile
  ids are computed with jnp by `operands` and passed to the custom VJP as operands, since a
  custom_vjp takes no tracers among its static arguments.
  """

  def __init__(self, layout, num_heads: int, kv_heads: int, dim: int):
    self._init_heads(layout, num_heads, kv_heads, dim)
    self.buckets, self.inverse = None, None  # one bucket, in query-block order

  def operands(self, layout) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tile table [P + 2, bq, bk], gather index [nq, Hl|H, max_kv], tile ids [nq, Hl, max_kv])."""
    lay = self.layout
    kv_index, kv_count, kv_mask_id = (jnp.asarray(getattr(layout, name), jnp.int32) for name in LIST_FIELDS)
    kv_index = jnp.clip(kv_index, 0, lay.num_kv_blocks - 1)  # an out-of-range id must not read another head
    tile_id = tile_ids(jnp, kv_count, kv_mask_id, lay.num_partial).transpose(1, 0, 2)
    tiles = tile_table(jnp, jnp.asarray(layout.partial_masks, bool))
    return tiles, self.gather_index(jnp, kv_index), tile_id

  def unpack(self, lists: tuple):
    tiles, index, tile_id = lists
    return tiles, [(None, index, tile_id)]


def _scores(plan: _Plan, tiles, q_step, k_step, tile_id):
  """f32 scores [B, Gr, bq, R, width, bk] of one query block, masked entries -inf."""
  scores = jnp.einsum("bgqrd,bgmkd->bgqrmk", q_step, k_step, preferred_element_type=jnp.float32)
  return jnp.where(plan.mask(tiles, tile_id), scores, -jnp.inf)


def _xla_forward(plan: _Plan, q, k, v, lists: tuple = ()):
  """(out [B, Tp, H, D] in q.dtype, lse f32 [nq, B, Gr, bq, R]) for pre-scaled, padded q."""
  tiles, buckets = plan.unpack(lists)
  k_blocks, v_blocks = plan.kv_blocks(k), plan.kv_blocks(v)

  def step(args):
    q_step, index, tile_id = args
    scores = _scores(plan, tiles, q_step, plan.gather(k_blocks, index), tile_id)
    row_max = jnp.max(scores, axis=(-2, -1), keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # no visible key: probabilities 0, not NaN
    probs = jnp.exp(scores - row_max)
    row_sum = jnp.sum(probs, axis=(-2, -1))
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)
    out = jnp.einsum("bgqrmk,bgmkd->bgqrd", probs.astype(v.dtype), plan.gather(v_blocks, index),
                     preferred_element_type=jnp.float32)
    return (out / safe_sum[..., None]).astype(q.dtype), row_max[..., 0, 0] + jnp.log(safe_sum)

  q_steps, outs, lses = plan.q_steps(q), [], []
  for steps, index, tile_id in buckets:
    out, lse = jax.lax.map(step, (plan.select(q_steps, steps), index, tile_id))
    outs.append(out)
    lses.append(lse)
  return plan.q_unsteps(plan.merge(outs)), plan.merge(lses)


# `lists` (a traced plan's index arrays; () for a host plan) are operands with no cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xla_core(plan: _Plan, q, k, v, lists: tuple):
  return _xla_forward(plan, q, k, v, lists)[0]


def _xla_core_fwd(plan: _Plan, q, k, v, lists: tuple):
  out, lse = _xla_forward(plan, q, k, v, lists)
  return out, (q, k, v, out, lse, lists)


def _xla_core_bwd(plan: _Plan, residuals, d_out):
  """Flash-style backward, one scan step per query block: recompute p from lse, dq for the block,
  scatter-add dk/dv of its listed key blocks into f32 accumulators."""
  q, k, v, out, lse, lists = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  tiles, buckets = plan.unpack(lists)
  k_blocks, v_blocks = plan.kv_blocks(k), plan.kv_blocks(v)

  def step(carry, args):
    dk_acc, dv_acc = carry
    q_step, do_step, lse_step, delta_step, index, tile_id = args
    k_step, v_step = plan.gather(k_blocks, index), plan.gather(v_blocks, index)
    probs = jnp.exp(_scores(plan, tiles, q_step, k_step, tile_id) - lse_step[..., None, None])
    d_probs = jnp.einsum("bgqrd,bgmkd->bgqrmk", do_step, v_step, preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - delta_step[..., 0, None, None])).astype(q.dtype)
    dq = jnp.einsum("bgqrmk,bgmkd->bgqrd", d_scores, k_step, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bgqrmk,bgqrd->bgmkd", d_scores, q_step, preferred_element_type=jnp.float32)
    dv = jnp.einsum("bgqrmk,bgqrd->bgmkd", probs.astype(do_step.dtype), do_step,
                    preferred_element_type=jnp.float32)
    return (plan.scatter_add(dk_acc, index, dk), plan.scatter_add(dv_acc, index, dv)), dq.astype(q.dtype)

  q_steps, do_steps, delta_steps = plan.q_steps(q), plan.q_steps(d_out.astype(q.dtype)), plan.q_steps(delta)
  carry, dqs = (jnp.zeros(k_blocks.shape, jnp.float32),) * 2, []
  for steps, index, tile_id in buckets:  # dk/dv accumulate across buckets through the carry
    xs = (plan.select(q_steps, steps), plan.select(do_steps, steps), plan.select(lse, steps),
          plan.select(delta_steps, steps), index, tile_id)
    carry, dq = jax.lax.scan(step, carry, xs)
    dqs.append(dq)
  dk, dv = carry
  return (plan.q_unsteps(plan.merge(dqs)), plan.kv_unblocks(dk).astype(k.dtype),
          plan.kv_unblocks(dv).astype(v.dtype), None)


_xla_core.defvjp(_xla_core_fwd, _xla_core_bwd)


def _pad_to(x: jax.Array, length: int) -> jax.Array:
  return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def xla_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None) -> jax.Array:
  """Gather-based block-sparse attention in pure JAX (contract in the module docstring).

  Per query block: gather its listed K/V blocks [B, Gr, max_kv, bk, D] (Gr = KVH for a shared
  layout, H for a per-head one), f32 scores [B, Gr, bq, R, max_kv, bk] (R = H / Gr query heads
  per group), masked softmax, and the value product. Sequences are padded to whole blocks.
  Host (NumPy) layouts run query blocks in buckets of similar list length; jax (maybe traced)
  lists run every query block at width max_kv.
  """
  q, k, v = _as_arrays(q, k, v)
  geo = _check_shapes(q, k, v, layout)
  batch, seq_q, heads, dim = q.shape
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  if on_host(layout):
    plan, lists = _Plan(layout, heads, k.shape[2], dim), ()
  else:
    plan = _TracedPlan(layout, heads, k.shape[2], dim)
    lists = plan.operands(layout)
  # Scaling q once (in f32, one rounding) is cheaper than scaling every score.
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  q = _pad_to(q, geo.padded_seq_q)
  k, v = _pad_to(k, geo.padded_seq_kv), _pad_to(v, geo.padded_seq_kv)
  return _xla_core(plan, q, k, v, lists)[:, :seq_q]
