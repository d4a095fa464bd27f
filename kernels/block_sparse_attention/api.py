"""Public entry points of the block-sparse flash attention kernels (custom_vjp over Pallas).

    out = block_sparse_attention(q, k, v, layout)                  # [B, T, H, D]
    out, lse = block_sparse_attention_with_lse(q, k, v, layout)    # lse f32 [B, H, T]

The forward kernel visits, for each (batch, head, query tile), only the key blocks listed by the
layout, with an online softmax; the backward pass is a `delta = rowsum(dO * O) - dlse` pre-pass,
a dQ kernel over the same lists and a dK/dV kernel over the transposed lists. The platform glue
lives in gpu.py (Triton) and tpu.py (Mosaic); the math in common.py, tile sizes in tiles.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from sparseformer.kernels.block_sparse_attention import common, gpu, tiles as tiles_lib, tpu
from sparseformer.kernels.block_sparse_attention.common import LayoutArrays, LayoutMeta
from sparseformer.kernels.block_sparse_attention.tiles import BlockSizes, Tiles


@dataclasses.dataclass(frozen=True)
class _Config:
  meta: LayoutMeta
  tiles: Tiles
  scale: float
  interpret: bool
  platform: str  # "gpu" (Triton kernels; also used in CPU interpret mode) or "tpu" (Mosaic)


def _check_inputs(q, k, v, meta: LayoutMeta) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4: q [B, T, H, D], k/v [B, S, KVH, D]; got "
                     f"{q.shape}, {k.shape}, {v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} must share batch and head_dim.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"num_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]}.")
  if q.shape[1] != meta.seq_q or k.shape[1] != meta.seq_kv:
    raise ValueError(f"sequence lengths (T={q.shape[1]}, S={k.shape[1]}) differ from the layout's "
                     f"(seq_q={meta.seq_q}, seq_kv={meta.seq_kv}); build the layout for them.")
  if not q.dtype == k.dtype == v.dtype:  # which dtypes: tiles.unsupported_reason
    raise ValueError(f"q, k, v dtypes ({q.dtype}, {k.dtype}, {v.dtype}) must be equal.")


def _resolve_platform(platform: str | None) -> str:
  if platform is None:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"platform={platform!r} must be 'gpu', 'tpu' or None (from the backend).")
  return platform


def block_sparse_attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, layout: Any, *,
                                    scale: float | None = None, interpret: bool | None = None,
                                    block_sizes: BlockSizes | None = None,
                                    platform: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention returning (out [B, T, H, D] in q.dtype, lse f32 [B, H, T]).

  Args:
    q: [B, T, H, D]; k, v: [B, S, KVH, D] with H % KVH == 0 (query head h reads kv head
      h // (H // KVH); K/V are never repeated). float32 / bfloat16 / float16, accumulation f32.
    layout: a BlockLayout (host NumPy arrays) or any object with the contract fields; the int
      lists may be traced device arrays (the transposed view is then computed on device).
    scale: logit scale, default 1/sqrt(D).
    interpret: run the Pallas kernels in interpret mode; None = True on the CPU backend.
    block_sizes: kernel tiles / GPU launch knobs (`tiles.BlockSizes`); None = defaults.
    platform: "gpu" (Triton kernels, also the CPU interpret path) or "tpu"; None = from backend.
  Returns:
    out, and lse = log(sum_k exp(scale * q.k)) over visible keys (natural log). A query row with
    no visible key gives out = 0 and lse = -inf (its gradients are 0). Both are differentiable.
  Raises:
    ValueError, naming the argument or field and the fix: shapes that disagree with each other or
    with the layout, a layout missing a contract field or with lists of the wrong shape, unequal
    dtypes, an unknown platform, and what `tiles.unsupported_reason` rejects (dtype, head_dim,
    layout blocks and tiles for the platform, launch knobs).
  """
  q, k, v = (jnp.asarray(x) for x in (q, k, v))  # any array-like (NumPy, lists) from here on
  arrays, meta = common.layout_to_arrays(layout, q.shape[2] if q.ndim == 4 else -1)
  _check_inputs(q, k, v, meta)
  platform = _resolve_platform(platform)
  interpret = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
  tiles = tiles_lib.resolve_tiles(block_sizes, layout_block_q=meta.block_q,
                               layout_block_kv=meta.block_kv, head_dim=q.shape[3],
                               platform=platform, interpret=interpret,
                               itemsize=jnp.dtype(q.dtype).itemsize, dtype=q.dtype)
  scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
  config = _Config(meta=meta, tiles=tiles, scale=scale, interpret=interpret, platform=platform)
  return _attention(config, q, k, v, arrays)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: Any, *,
                           scale: float | None = None, interpret: bool | None = None,
                           block_sizes: BlockSizes | None = None,
                           platform: str | None = None) -> jax.Array:
  """Block-sparse flash attention: q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, D].

  See `block_sparse_attention_with_lse` for the arguments; this drops the log-sum-exp.
  """
  out, _ = block_sparse_attention_with_lse(q, k, v, layout, scale=scale, interpret=interpret,
                                           block_sizes=block_sizes, platform=platform)
  return out


def _pad_seq(x: jax.Array, length: int, axis: int, value: float = 0.0) -> jax.Array:
  if x.shape[axis] == length:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _padded_lengths(meta: LayoutMeta) -> tuple[int, int]:
  return meta.num_q_blocks * meta.block_q, meta.num_kv_blocks * meta.block_kv


def _forward(config: _Config, q, k, v, arrays: LayoutArrays):
  seq_q_pad, seq_kv_pad = _padded_lengths(config.meta)
  qp = _pad_seq(q, seq_q_pad, 1)
  kp, vp = _pad_seq(k, seq_kv_pad, 1), _pad_seq(v, seq_kv_pad, 1)
  impl = gpu if config.platform == "gpu" else tpu
  out, lse = impl.forward(qp, kp, vp, arrays, config.meta, config.tiles, config.scale,
                          config.interpret)
  return out[:, :q.shape[1]], lse[:, :, :q.shape[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config: _Config, q, k, v, arrays: LayoutArrays):
  return _forward(config, q, k, v, arrays)


def _attention_fwd(config: _Config, q, k, v, arrays: LayoutArrays):
  out, lse = _forward(config, q, k, v, arrays)
  return (out, lse), (q, k, v, arrays, out, lse)


def _attention_bwd(config: _Config, residuals, cotangents):
  q, k, v, arrays, out, lse = residuals
  dout, dlse = cotangents
  # d lse / d s = p, so a cotangent on lse folds into delta: ds = p * (dp - (delta - dlse)).
  delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - dlse.astype(jnp.float32)
  seq_q_pad, seq_kv_pad = _padded_lengths(config.meta)
  impl = gpu if config.platform == "gpu" else tpu
  dq, dk, dv = impl.backward(
      _pad_seq(q, seq_q_pad, 1), _pad_seq(k, seq_kv_pad, 1), _pad_seq(v, seq_kv_pad, 1),
      _pad_seq(dout.astype(q.dtype), seq_q_pad, 1),
      _pad_seq(lse, seq_q_pad, 2, -jnp.inf),  # padded query rows: p = 0
      _pad_seq(delta, seq_q_pad, 2), arrays, config.meta, config.tiles, config.scale,
      config.interpret)
  zero_arrays = jax.tree.map(lambda _: None, arrays)
  return (dq[:, :q.shape[1]], dk[:, :k.shape[1]], dv[:, :v.shape[1]], zero_arrays)


_attention.defvjp(_attention_fwd, _attention_bwd)
