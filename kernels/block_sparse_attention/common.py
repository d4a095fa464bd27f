"""Shared pieces of the block-sparse flash attention kernels (GPU Triton and TPU Mosaic).

Everything here is platform neutral:
  * `BlockSizes` (kernel tile sizes + GPU launch knobs) and their validation against a layout;
  * `LayoutArrays` / `LayoutMeta`: the BlockLayout contract (see notes/layout_contract.md) turned
    into device arrays + static metadata, including the transposed view computed on device when
    the forward lists are traced (content-routed layouts);
  * the flash-attention math on one (query tile, key tile) pair, written once and called from the
    kernels of both platforms. Scores live in the base-2 domain (`s = q.k * scale * log2(e)`) so the
    exponentials are `exp2`; the log-sum-exp leaves the kernels in natural-log units.

Conventions inside the math: a score tile `s` is [rows, cols]; per-row statistics are kept 2-D
with a broadcastable singleton axis, `[tq, 1]` in the forward / dQ orientation (queries on rows)
and `[1, tq]` in the dK/dV orientation (keys on rows, `sT = k @ q^T`), so the same functions
serve both orientations on both platforms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b^T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b
TN_DIMS = (((0,), (0,)), ((), ()))  # a^T @ b
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------------------------
# Tile sizes
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Kernel tile sizes and GPU launch parameters; None picks a per-platform default.

  A tile never spans two layout blocks: every tile size must divide the matching layout block
  size (`layout.block_q` for query tiles, `layout.block_kv` for key tiles). On GPU the tiles may
  be smaller than the layout blocks (the kernels loop over sub-tiles of each listed block); on TPU
  the tiles are the layout blocks themselves.
  """

  block_q: int | None = None  # forward: query rows per program
  block_kv: int | None = None  # forward: key rows per inner-loop step
  block_q_dq: int | None = None  # dQ kernel: query rows per program
  block_kv_dq: int | None = None  # dQ kernel: key rows per inner-loop step
  block_q_dkv: int | None = None  # dK/dV kernel: query rows per inner-loop step
  block_kv_dkv: int | None = None  # dK/dV kernel: key rows per program
  num_warps: int | None = None  # GPU forward warps (None: 4 if tile*head_dim small else 8)
  num_stages: int | None = None  # GPU forward pipelining stages (None: 3 for 16-bit inputs, else 2)
  num_warps_bwd: int | None = None  # GPU dK/dV kernel warps (None: 4)
  num_stages_bwd: int = 2  # GPU dK/dV kernel pipelining stages
  num_warps_dq: int | None = None  # GPU dQ kernel warps (None: num_warps_bwd)
  num_stages_dq: int | None = None  # GPU dQ kernel pipelining stages (None: num_stages_bwd)
  # GPU: accumulate dQ inside the dK/dV kernel with f32 atomic adds instead of a separate dQ
  # kernel (5 instead of 7 matmuls per visited block pair; summation order nondeterministic).
  # None: the platform default (False on TPU, which has no atomics; the block_*_dq fields are
  # then unused).
  fused_dq: bool | None = None
  # GPU: visit each row's FULL blocks in a loop with no mask code, then its PARTIAL blocks in a
  # masked loop; False: one loop that branches on every block's kind. Forward (None: False) and
  # backward (dQ and dK/dV kernels; None: True) apart: on an H200 the split loops made the dQ and
  # dK/dV kernels 14 % faster and the forward 12 % slower (docs/benchmarks.md, issue 4).
  separate_partial: bool | None = None
  separate_partial_bwd: bool | None = None


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Concrete tile sizes after defaults and validation (hashable: a static kernel argument)."""

  fwd_q: int
  fwd_kv: int
  dq_q: int
  dq_kv: int
  dkv_q: int
  dkv_kv: int
  num_warps: int
  num_stages: int
  num_warps_bwd: int
  num_stages_bwd: int
  num_warps_dq: int
  num_stages_dq: int
  fused_dq: bool
  separate_partial: bool  # forward
  separate_partial_bwd: bool  # dQ and dK/dV


def div(x, n: int):
  """x // n for a non-negative traced int and a static n (lax.div: jnp's floor semantics emit a
  sign op that the Triton and Mosaic lowerings reject or do not need)."""
  return x if n == 1 else lax.div(x, n)


def rem(x, n: int):
  """x % n for a non-negative traced int and a static n (see `div`)."""
  return 0 if n == 1 else lax.rem(x, n)


def _is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


# Largest dynamic shared memory of one thread block, bytes, by CUDA compute capability.
_SHARED_MEMORY_BYTES = {"7.0": 98304, "7.5": 65536, "8.0": 166912, "8.6": 101376, "8.7": 166912,
                        "8.9": 101376, "9.0": 232448, "10.0": 232448, "12.0": 101376}


def gpu_shared_memory_bytes() -> int:
  """Per-block shared memory of the first GPU; an H100's when none is attached (lowering on CPU),
  the listed value of the same major version for an unlisted minor one ("10.3" -> "10.0"), else
  99 KiB."""
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError:
    return _SHARED_MEMORY_BYTES["9.0"]
  capability = str(getattr(device, "compute_capability", ""))
  return _SHARED_MEMORY_BYTES.get(
      capability, _SHARED_MEMORY_BYTES.get(capability.split(".")[0] + ".0", 101376))


def _fit_pipeline(tile: int, tile_is_default: bool, stages: int, stages_is_default: bool,
                  head_dim: int, itemsize: int, budget: int) -> tuple[int, int]:
  """(tile, stages) of a kernel's streamed pair of tiles (K and V, or Q and dO) whose Triton
  pipeline buffers, stages x 2 x tile x head_dim x itemsize bytes, fit `budget`: drops default
  stages to 2, then halves a default tile (down to 16). Explicit values are kept as given.

  The formula is the request Triton made on an H100 for f32, D = 128, 128-row K/V tiles,
  2 stages: 262,148 > 232,448 bytes (docs/benchmarks.md, issue 4).
  """
  while stages * 2 * tile * head_dim * itemsize > budget:
    if stages_is_default and stages > 2:
      stages -= 1
    elif tile_is_default and tile > 16:
      tile //= 2
    else:
      break
  return tile, stages


def _default_tiles(sizes: BlockSizes, layout_block_q: int, layout_block_kv: int,
                   platform: str) -> dict[str, int]:
  """Each tile field of `sizes` (block_q ... block_kv_dkv), its platform default where None."""
  if platform == "tpu":
    defaults = dict(block_q=layout_block_q, block_kv=layout_block_kv,
                    block_q_dq=layout_block_q, block_kv_dq=layout_block_kv,
                    block_q_dkv=layout_block_q, block_kv_dkv=layout_block_kv)
  else:
    # The winners of the H200 tile sweep at D=128 bf16 (docs/benchmarks/attention_gpu.md).
    defaults = dict(block_q=min(layout_block_q, 128), block_kv=min(layout_block_kv, 128),
                    block_q_dq=min(layout_block_q, 64), block_kv_dq=min(layout_block_kv, 64),
                    block_q_dkv=min(layout_block_q, 64), block_kv_dkv=min(layout_block_kv, 64))
  return {f: d if getattr(sizes, f) is None else getattr(sizes, f) for f, d in defaults.items()}


def unsupported_reason(platform: str, head_dim: int, block_q: int, block_kv: int, dtype: Any = None,
                       *, block_sizes: BlockSizes | None = None,
                       interpret: bool = False) -> str | None:
  """Why the kernels cannot run this configuration (naming the field and the fix), or None.

  The one list of the kernels' constraints: `resolve_tiles` raises it as a ValueError, and
  `backend="auto"` of `layers.attention.backends.attend` falls back to xla on it.

  Args: `platform` "gpu" or "tpu" (kernel family); `head_dim`; the layout's `block_q` /
  `block_kv`; the input `dtype` (None: not checked); `block_sizes` (None: the defaults);
  `interpret` (interpret mode lifts the compiled-only constraints: GPU tiles and head_dim powers
  of two >= 16, TPU layout blocks multiples of 128).
  """
  if dtype is not None and jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return (f"dtype={jnp.dtype(dtype).name}: the kernels take float32, bfloat16 or float16; "
            "cast q, k and v.")
  sizes = block_sizes or BlockSizes()
  compiled_gpu = platform == "gpu" and not interpret
  compiled_tpu = platform == "tpu" and not interpret
  for field, value in _default_tiles(sizes, block_q, block_kv, platform).items():
    layout_block = block_q if "_q" in field else block_kv
    layout_name = "layout.block_q" if "_q" in field else "layout.block_kv"
    default = "" if getattr(sizes, field) is not None else " (default)"
    tile = f"BlockSizes.{field}={value}{default}"
    if value <= 0 or layout_block % value:
      return (f"{tile} must be a positive divisor of {layout_name}={layout_block}; pick a "
              "divisor or rebuild the layout.")
    if platform == "tpu" and value != layout_block:
      return (f"{tile}: the TPU kernels use the layout blocks as tiles; set it to "
              f"{layout_name}={layout_block} (or leave it None).")
    if compiled_gpu and (not _is_pow2(value) or value < 16):
      return (f"{tile}: Triton tiles must be powers of two >= 16 (tl.dot minimum); use 16, 32, "
              "64 or 128, or rebuild the layout with such blocks.")
  if compiled_gpu and (not _is_pow2(head_dim) or head_dim < 16):
    return (f"head_dim={head_dim}: the GPU kernel needs a power of two >= 16 (e.g. 64 or 128); "
            "pad the head dimension.")
  if compiled_tpu and (block_q % 128 or block_kv % 128):
    return (f"layout block sizes ({block_q}, {block_kv}): the TPU kernels need multiples of 128 "
            "(lane tiling); rebuild the layout.")
  for field in ("num_warps", "num_warps_bwd", "num_warps_dq"):  # defaults (4 or 8) are valid
    value = getattr(sizes, field)
    if value is not None and (not _is_pow2(value) or value > 16):
      return f"BlockSizes.{field}={value} must be 1, 2, 4, 8 or 16."
  for field in ("num_stages", "num_stages_bwd", "num_stages_dq"):
    value = getattr(sizes, field)
    if value is not None and value < 1:
      return f"BlockSizes.{field}={value} must be >= 1."
  if sizes.fused_dq and platform == "tpu":
    return ("BlockSizes.fused_dq=True needs atomic adds, which the TPU kernels do not use; leave "
            "it None or False on TPU.")
  return None


def resolve_tiles(sizes: BlockSizes | None, *, layout_block_q: int, layout_block_kv: int,
                  head_dim: int, platform: str, interpret: bool, itemsize: int = 2,
                  shared_memory_bytes: int | None = None, dtype: Any = None) -> Tiles:
  """Fills defaults and checks the constraints (`unsupported_reason`, with `dtype` None: not
  checked); raises its ValueError, which names the field and the fix.

  `itemsize` (bytes per input element) picks the GPU forward pipelining depth (three stages in
  16-bit, two in f32); compiled GPU defaults then shrink until each kernel's K/V (or Q/dO)
  pipeline fits `shared_memory_bytes` (None: `gpu_shared_memory_bytes()`), e.g. f32 with
  D = 128 gets 64-row forward K/V tiles.
  """
  reason = unsupported_reason(platform, head_dim, layout_block_q, layout_block_kv, dtype,
                              block_sizes=sizes, interpret=interpret)
  if reason is not None:
    raise ValueError(reason)
  sizes = sizes or BlockSizes()
  values = _default_tiles(sizes, layout_block_q, layout_block_kv, platform)
  num_warps = sizes.num_warps
  if num_warps is None:
    num_warps = 4 if values["block_q"] * head_dim < 128 * 128 else 8
  num_warps_bwd = sizes.num_warps_bwd if sizes.num_warps_bwd is not None else 4
  num_warps_dq = sizes.num_warps_dq if sizes.num_warps_dq is not None else num_warps_bwd
  num_stages = sizes.num_stages
  if num_stages is None:
    num_stages = 3 if itemsize <= 2 else 2
  num_stages_dq = sizes.num_stages_dq if sizes.num_stages_dq is not None else sizes.num_stages_bwd
  if platform == "gpu" and not interpret:
    budget = gpu_shared_memory_bytes() if shared_memory_bytes is None else shared_memory_bytes
    fit = functools.partial(_fit_pipeline, head_dim=head_dim, itemsize=itemsize, budget=budget)
    values["block_kv"], num_stages = fit(values["block_kv"], sizes.block_kv is None, num_stages,
                                         sizes.num_stages is None)
    values["block_kv_dq"], num_stages_dq = fit(values["block_kv_dq"], sizes.block_kv_dq is None,
                                               num_stages_dq, sizes.num_stages_dq is None)
    values["block_q_dkv"], _ = fit(values["block_q_dkv"], sizes.block_q_dkv is None,
                                   sizes.num_stages_bwd, False)
  fused_dq = bool(sizes.fused_dq)
  return Tiles(fwd_q=values["block_q"], fwd_kv=values["block_kv"], dq_q=values["block_q_dq"],
               dq_kv=values["block_kv_dq"], dkv_q=values["block_q_dkv"],
               dkv_kv=values["block_kv_dkv"], num_warps=num_warps, num_stages=num_stages,
               num_warps_bwd=num_warps_bwd, num_stages_bwd=sizes.num_stages_bwd,
               num_warps_dq=num_warps_dq, num_stages_dq=num_stages_dq, fused_dq=fused_dq,
               separate_partial=bool(sizes.separate_partial),
               separate_partial_bwd=sizes.separate_partial_bwd is not False)


# ----------------------------------------------------------------------------------------------
# Layout arrays
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayoutMeta:
  """Static facts about a layout (hashable: part of the kernels' static configuration)."""

  seq_q: int
  seq_kv: int
  block_q: int
  block_kv: int
  num_q_blocks: int
  num_kv_blocks: int
  layout_heads: int  # Hl: 1 (shared by all heads) or num_heads
  max_kv: int
  max_q: int


class LayoutArrays(NamedTuple):
  """The contract arrays as jnp arrays (host constants or traced); shapes as in the contract."""

  kv_index: jax.Array  # int32 [Hl, nq, max_kv]; per row FULL blocks first, then PARTIAL
  kv_count: jax.Array  # int32 [Hl, nq]
  kv_mask_id: jax.Array  # int32 [Hl, nq, max_kv]; -1 FULL, >= 0 PARTIAL
  q_index: jax.Array  # int32 [Hl, nk, max_q]; same order rule
  q_count: jax.Array  # int32 [Hl, nk]
  q_mask_id: jax.Array  # int32 [Hl, nk, max_q]
  partial_masks: jax.Array  # bool [P, block_q, block_kv]
  kv_full_count: jax.Array  # int32 [Hl, nq]: the first kv_full_count listed blocks are FULL
  q_full_count: jax.Array  # int32 [Hl, nk]


def transpose_block_lists(kv_index: jax.Array, kv_count: jax.Array, kv_mask_id: jax.Array,
                          num_kv_blocks: int, max_q: int | None = None):
  """Builds the transposed view (per key block, the query blocks that visit it) on device.

  Args: forward lists `kv_index`, `kv_mask_id` int32 [Hl, nq, max_kv] and `kv_count` [Hl, nq],
  possibly traced. `max_q` (static) bounds the per-key-block lists; default nq (always enough).
  Returns (q_index, q_count, q_mask_id) with [Hl, nk, max_q] / [Hl, nk], query block ids
  ascending, padding entries repeating the last valid entry (or 0 when the count is 0).
  """
  hl, nq, max_kv = kv_index.shape
  max_q = nq if max_q is None else max_q
  valid = jnp.arange(max_kv)[None, None, :] < kv_count[..., None]
  # table[h, i, j] = mask_id + 2 where block (i, j) is listed, 0 where it is not.
  code = jnp.where(valid, kv_mask_id + 2, 0).astype(jnp.int32)
  h_idx = jnp.broadcast_to(jnp.arange(hl)[:, None, None], kv_index.shape)
  i_idx = jnp.broadcast_to(jnp.arange(nq)[None, :, None], kv_index.shape)
  table = jnp.zeros((hl, nq, num_kv_blocks), jnp.int32)
  table = table.at[h_idx, i_idx, jnp.clip(kv_index, 0, num_kv_blocks - 1)].max(code)
  table_t = jnp.swapaxes(table, 1, 2)  # [Hl, nk, nq]
  listed = table_t > 0
  q_count = jnp.minimum(listed.sum(-1), max_q).astype(jnp.int32)
  order = jnp.argsort(jnp.logical_not(listed), axis=-1, stable=True)[..., :max_q]  # listed first
  last = jnp.take_along_axis(order, jnp.maximum(q_count - 1, 0)[..., None], axis=-1)
  pos = jnp.arange(max_q)[None, None, :]
  q_index = jnp.where(pos < q_count[..., None], order, jnp.where(q_count[..., None] > 0, last, 0))
  q_mask_id = jnp.take_along_axis(table_t, q_index, axis=-1) - 2
  q_mask_id = jnp.where(q_mask_id < -1, -1, q_mask_id)
  return q_index.astype(jnp.int32), q_count, q_mask_id.astype(jnp.int32)


def full_blocks_first(index, count, mask_id):
  """Reorders each row's listed blocks FULL first, then PARTIAL (both stable), so a kernel can
  visit the FULL blocks in a loop without any mask code and the PARTIAL ones in a masked loop.

  Works on host NumPy lists (the usual case, no device work) and on traced jax arrays alike.
  Args: index, mask_id int32 [Hl, n, width], count [Hl, n]. Returns (index, mask_id, full_count
  [Hl, n]); padding entries past the count repeat the last valid entry of the new order (0 when
  the count is 0), so a TPU pipeline never re-fetches a block for them.
  """
  xp = np if all(isinstance(a, np.ndarray) for a in (index, count, mask_id)) else jnp
  listed = xp.arange(index.shape[-1]) < count[..., None]
  full_count = xp.sum(listed & (mask_id < 0), axis=-1).astype(np.int32)
  rank = xp.where(listed, (mask_id >= 0).astype(np.int32), 2)
  order = xp.argsort(rank, axis=-1, stable=True)
  index = xp.take_along_axis(index, order, axis=-1)
  mask_id = xp.take_along_axis(mask_id, order, axis=-1)
  last = xp.maximum(count - 1, 0)[..., None]
  index = xp.where(listed, index, xp.take_along_axis(index, last, axis=-1))
  mask_id = xp.where(listed, mask_id, xp.take_along_axis(mask_id, last, axis=-1))
  return index, mask_id, full_count


def _int32(x):
  """int32 lists: NumPy stays on the host (reordered there), jax arrays (maybe traced) stay jax."""
  return x.astype(jnp.int32) if isinstance(x, jax.Array) else np.asarray(x, np.int32)


def layout_to_arrays(layout: Any, num_heads: int) -> tuple[LayoutArrays, LayoutMeta]:
  """Reads a BlockLayout (host NumPy) or any object with the contract fields (possibly traced).

  The transposed view is taken from the layout when present (`q_index`, `q_count`, `q_mask_id`
  not None) and computed on device from the forward lists otherwise. Both views come back with
  each row's FULL blocks first (`full_blocks_first`); host lists are reordered on the host.
  """
  for name in ("kv_index", "kv_count", "kv_mask_id", "partial_masks", "seq_q", "seq_kv",
               "block_q", "block_kv"):
    if getattr(layout, name, None) is None:
      raise ValueError(f"layout is missing field {name!r} required by the BlockLayout contract.")
  seq_q, seq_kv = int(layout.seq_q), int(layout.seq_kv)
  block_q, block_kv = int(layout.block_q), int(layout.block_kv)
  nq, nk = -(-seq_q // block_q), -(-seq_kv // block_kv)
  kv_index, kv_count, kv_mask_id = (_int32(getattr(layout, name))
                                    for name in ("kv_index", "kv_count", "kv_mask_id"))
  partial_masks = jnp.asarray(layout.partial_masks, jnp.bool_)
  hl = kv_index.shape[0]
  if kv_index.ndim != 3 or kv_index.shape[1] != nq or kv_count.shape != (hl, nq):
    raise ValueError(f"layout.kv_index {kv_index.shape} / kv_count {kv_count.shape} do not match "
                     f"num_q_blocks={nq} (seq_q={seq_q}, block_q={block_q}).")
  if kv_mask_id.shape != kv_index.shape:
    raise ValueError(f"layout.kv_mask_id {kv_mask_id.shape} must match kv_index {kv_index.shape}.")
  if hl not in (1, num_heads):
    raise ValueError(f"layout has {hl} head rows; it must have 1 (shared) or "
                     f"num_heads={num_heads}.")
  if partial_masks.ndim != 3 or partial_masks.shape[1:] != (block_q, block_kv):
    raise ValueError(f"layout.partial_masks {partial_masks.shape} must be [P, {block_q}, "
                     f"{block_kv}].")
  if getattr(layout, "q_index", None) is not None:
    q_index, q_count, q_mask_id = (_int32(getattr(layout, name))
                                   for name in ("q_index", "q_count", "q_mask_id"))
    if q_index.shape[:2] != (hl, nk) or q_count.shape != (hl, nk):
      raise ValueError(f"layout.q_index {q_index.shape} does not match [Hl={hl}, nk={nk}, max_q].")
  else:
    q_index, q_count, q_mask_id = transpose_block_lists(kv_index, kv_count, kv_mask_id, nk)
  kv_index, kv_mask_id, kv_full_count = full_blocks_first(kv_index, kv_count, kv_mask_id)
  q_index, q_mask_id, q_full_count = full_blocks_first(q_index, q_count, q_mask_id)
  meta = LayoutMeta(seq_q=seq_q, seq_kv=seq_kv, block_q=block_q, block_kv=block_kv,
                    num_q_blocks=nq, num_kv_blocks=nk, layout_heads=hl,
                    max_kv=kv_index.shape[2], max_q=q_index.shape[2])
  arrays = LayoutArrays(*(jnp.asarray(x) for x in (
      kv_index, kv_count, kv_mask_id, q_index, q_count, q_mask_id, partial_masks,
      kv_full_count, q_full_count)))
  return arrays, meta


# ----------------------------------------------------------------------------------------------
# Flash-attention math on one tile pair (shared by the GPU and TPU kernels)
# ----------------------------------------------------------------------------------------------


def scores(a: jax.Array, b: jax.Array, scale_log2: float) -> jax.Array:
  """f32 `a @ b^T * scale * log2(e)`: [rows, D] x [cols, D] -> [rows, cols] (base-2 logits)."""
  s = lax.dot_general(a, b, NT_DIMS, preferred_element_type=jnp.float32)
  return s * scale_log2


def mask_partial(s: jax.Array, mask_id: jax.Array, load_mask: Callable[[jax.Array], jax.Array]):
  """Applies the token predicate only on PARTIAL blocks (mask_id >= 0): disallowed -> -inf.

  `load_mask(mask_id)` reads the bool tile of `partial_masks` aligned with `s`; it runs only in
  the PARTIAL branch, so FULL blocks cost neither the load nor the select.
  """
  return lax.cond(mask_id >= 0,
                  lambda x: jnp.where(load_mask(mask_id), x, -jnp.inf),
                  lambda x: x, s)


def apply_mask(s: jax.Array, mask_id: jax.Array, load_mask: Callable[[jax.Array], jax.Array],
               masked: bool | None) -> jax.Array:
  """Masking for a block whose kind is known statically (False: FULL, s unchanged; True:
  PARTIAL, predicate applied unconditionally) or only at run time (None: `mask_partial`)."""
  if masked is None:
    return mask_partial(s, mask_id, load_mask)
  return jnp.where(load_mask(mask_id), s, -jnp.inf) if masked else s


def softmax_init(rows: int, head_dim: int):
  """Initial (acc [rows, D], m [rows, 1], l [rows, 1]) of the online softmax, all f32."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows, 1), -jnp.inf, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32))


def softmax_step(carry, s: jax.Array, v: jax.Array):
  """One online-softmax update with base-2 scores `s` [tq, tk] and values `v` [tk, D].

  Rows that have seen only masked keys keep m = -inf; `m_safe` turns their shift into 0 so
  exp2(-inf - 0) = 0 instead of NaN (no per-element select on FULL blocks).
  """
  acc, m_prev, l_prev = carry
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  p = jnp.exp2(s - m_safe)
  alpha = jnp.exp2(m_prev - m_safe)
  l_next = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  pv = lax.dot_general(p.astype(v.dtype), v, NN_DIMS, preferred_element_type=jnp.float32)
  return alpha * acc + pv, m_next, l_next


def softmax_finalize(carry):
  """(out [tq, D] f32, lse [tq, 1] natural log); rows with no visible key: out 0, lse -inf."""
  acc, m, l = carry
  empty = l == 0.0
  out = acc / jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)
  return out, lse


def lse_to_base2(lse: jax.Array) -> jax.Array:
  """Natural-log LSE -> base-2 shift for `exp2(s - shift)`; empty rows (-inf) -> +inf so p = 0."""
  return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)


def dq_step(dq: jax.Array, s: jax.Array, lse2: jax.Array, delta: jax.Array, do: jax.Array,
            k: jax.Array, v: jax.Array) -> jax.Array:
  """dQ accumulation (unscaled) for one tile pair, queries on rows.

  s [tq, tk] base-2 logits (masked: -inf), lse2/delta [tq, 1], do [tq, D], k/v [tk, D].
  """
  p = jnp.exp2(s - lse2)
  dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  return dq + lax.dot_general(ds.astype(k.dtype), k, NN_DIMS, preferred_element_type=jnp.float32)


def _dkv_parts(s_t, lse2_row, delta_row, do, v):
  """p^T [tk, tq] and dS^T [tk, tq] (both f32) of one tile pair, keys on rows."""
  p_t = jnp.exp2(s_t - lse2_row)
  dp_t = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
  return p_t, p_t * (dp_t - delta_row)


def dkv_step(carry, s_t: jax.Array, lse2_row: jax.Array, delta_row: jax.Array, q: jax.Array,
             do: jax.Array, v: jax.Array):
  """dK (unscaled) / dV accumulation for one tile pair, keys on rows (`s_t = k @ q^T`).

  s_t [tk, tq] base-2 logits (masked: -inf), lse2_row/delta_row [1, tq], q/do [tq, D], v [tk, D].
  """
  dk, dv = carry
  p_t, ds_t = _dkv_parts(s_t, lse2_row, delta_row, do, v)
  dv = dv + lax.dot_general(p_t.astype(do.dtype), do, NN_DIMS, preferred_element_type=jnp.float32)
  dk = dk + lax.dot_general(ds_t.astype(q.dtype), q, NN_DIMS, preferred_element_type=jnp.float32)
  return dk, dv


def dkv_dq_step(carry, s_t: jax.Array, lse2_row: jax.Array, delta_row: jax.Array, q: jax.Array,
                do: jax.Array, k: jax.Array, v: jax.Array):
  """`dkv_step` that also returns this pair's dQ contribution (unscaled) `dS @ k` [tq, D] f32.

  Used by the fused GPU backward (dQ summed over key tiles with atomic adds); k [tk, D].
  """
  dk, dv = carry
  p_t, ds_t = _dkv_parts(s_t, lse2_row, delta_row, do, v)
  ds_t = ds_t.astype(q.dtype)
  dv = dv + lax.dot_general(p_t.astype(do.dtype), do, NN_DIMS, preferred_element_type=jnp.float32)
  dk = dk + lax.dot_general(ds_t, q, NN_DIMS, preferred_element_type=jnp.float32)
  dq = lax.dot_general(ds_t, k, TN_DIMS, preferred_element_type=jnp.float32)
  return (dk, dv), dq
