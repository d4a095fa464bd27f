"""Kernel tile sizes and launch knobs: `BlockSizes` (what a user may set), `Tiles` (what a kernel runs
with), `resolve_tiles` (defaults, shared-memory fitting, validation) and `unsupported_reason`, the one
statement of what the compiled kernels accept (the layer dispatcher asks it before choosing pallas).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


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
