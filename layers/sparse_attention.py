"""Block-sparse attention over a `BlockLayout`: dense reference, pure-JAX gather path, dispatch.

    out = attend(q, k, v, layout)    # q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, D]

Backends (all compute the same function, tests hold them equal):
  reference  layout -> dense token mask [Hl, T, S] -> masked softmax, all in f32. O(T*S): tests only.
  xla        per query block, gather the listed key/value blocks and attend. Time and memory
             O(T * max_kv * block_kv); no T x S buffer. Differentiable (see `_xla_attention`).
  pallas     sparseformer.kernels.block_sparse_attention.block_sparse_attention (flash-style).
  auto       pallas on GPU/TPU when the kernel package provides it, else xla.

Contract (every backend): GQA with query head h reading kv head h // (H // KVH); softmax
statistics in f32 whatever the input dtype; output in q.dtype; a query row with no visible key
returns zeros (and zero, finite gradients); `scale` defaults to 1 / sqrt(D).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.layers.layouts import FULL, BlockLayout

BACKENDS = ("auto", "reference", "xla", "pallas")


@functools.lru_cache(maxsize=None)
def _pallas_kernel():
  """The Pallas kernel function, or None when the kernel package does not provide one yet."""
  try:
    from sparseformer.kernels import block_sparse_attention as kernel_module
  except ImportError:
    return None
  return getattr(kernel_module, "block_sparse_attention", None)


def resolve_backend(backend: str) -> str:
  """Concrete backend name for `backend` on the current default JAX platform."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    on_accelerator = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
    return "pallas" if on_accelerator and _pallas_kernel() is not None else "xla"
  if backend == "pallas" and _pallas_kernel() is None:
    raise ValueError("backend='pallas' but sparseformer.kernels.block_sparse_attention provides no "
                     "`block_sparse_attention`; use backend='xla' or 'auto'")
  return backend


def _check_shapes(q, k, v, layout: BlockLayout) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"expected q [B, T, H, D] and k, v [B, S, KVH, D]; got {q.shape}, {k.shape}, {v.shape}")
  (batch, seq_q, heads, dim), (kv_batch, seq_kv, kv_heads, kv_dim) = q.shape, k.shape
  if batch != kv_batch or dim != kv_dim:
    raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head dim")
  if heads % kv_heads:
    raise ValueError(f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})")
  if (seq_q, seq_kv) != (layout.seq_q, layout.seq_kv):
    raise ValueError(f"layout built for seq {layout.seq_q}x{layout.seq_kv}, inputs have {seq_q}x{seq_kv}; "
                     "build the layout for the actual sequence lengths")
  if layout.num_heads not in (1, heads):
    raise ValueError(f"layout has {layout.num_heads} heads; it must have 1 or num_heads={heads}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout, *, backend: str = "auto",
           scale: float | None = None) -> jax.Array:
  """Block-sparse attention of q [B, T, H, D] over k, v [B, S, KVH, D] under `layout` -> [B, T, H, D]."""
  _check_shapes(q, k, v, layout)
  backend = resolve_backend(backend)
  if backend == "reference":
    return reference_attention(q, k, v, layout, scale=scale)
  if backend == "xla":
    return xla_attention(q, k, v, layout, scale=scale)
  return _pallas_kernel()(q, k, v, layout, scale=scale)


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
  """Obvious dense masked attention: `masked_attention` under `layout.to_token_mask()` (tests only)."""
  _check_shapes(q, k, v, layout)
  return masked_attention(q, k, v, jnp.asarray(layout.to_token_mask()), scale=scale)


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
def _block_masks(layout: BlockLayout) -> tuple[np.ndarray, np.ndarray]:
  """(tiles bool [P + 2, bq, bk], tile id int32 [Hl, nq, max_kv]) with FULL -> P, padding -> P + 1."""
  p = len(layout.partial_masks)
  tiles = np.concatenate([layout.partial_masks, np.ones((1, layout.block_q, layout.block_kv), bool),
                          np.zeros((1, layout.block_q, layout.block_kv), bool)])
  valid = np.arange(layout.max_kv) < layout.kv_count[..., None]
  tile_id = np.where(~valid, p + 1, np.where(layout.kv_mask_id == FULL, p, layout.kv_mask_id))
  return tiles, tile_id.astype(np.int32)


def _gather_blocks(x: jax.Array, layout: BlockLayout, num_heads: int) -> jax.Array:
  """K or V [B, Sp, KVH, D] -> listed blocks [B, Gr, nq, max_kv, bk, D].

  Gr = KVH for a shared layout (GQA: the group's query heads share the gathered blocks, nothing is
  repeated) and Gr = H for a per-head layout (each head gathers its own blocks).
  """
  batch, _, kv_heads, dim = x.shape
  blocks = x.reshape(batch, layout.num_kv_blocks, layout.block_kv, kv_heads, dim).transpose(0, 3, 1, 2, 4)
  if layout.num_heads == 1:
    return blocks[:, :, layout.kv_index[0]]
  group = num_heads // kv_heads
  flat = blocks.reshape(batch, kv_heads * layout.num_kv_blocks, layout.block_kv, dim)
  kv_head = (np.arange(num_heads) // group)[:, None, None]
  return flat[:, kv_head * layout.num_kv_blocks + layout.kv_index]


def _pad_to(x: jax.Array, length: int) -> jax.Array:
  return x if x.shape[1] == length else jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def xla_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None) -> jax.Array:
  """Gather-based block-sparse attention (pure JAX; see module docstring for the contract).

  Shapes inside: queries [B, Gr, nq, bq, R, D] (R query heads per gather group), gathered keys
  and values [B, Gr, nq, max_kv, bk, D], scores f32 [B, Gr, nq, bq, R, max_kv, bk].
  """
  _check_shapes(q, k, v, layout)
  batch, seq_q, heads, dim = q.shape
  scale = 1.0 / math.sqrt(dim) if scale is None else scale
  nq, bq = layout.num_q_blocks, layout.block_q
  q = _pad_to(q, layout.padded_seq_q)
  k, v = _pad_to(k, layout.padded_seq_kv), _pad_to(v, layout.padded_seq_kv)
  groups = k.shape[2] if layout.num_heads == 1 else heads
  # [B, Tp, H, D] -> [B, Gr, nq, bq, R, D]
  q_blocks = q.reshape(batch, nq, bq, groups, heads // groups, dim).transpose(0, 3, 1, 2, 4, 5)
  q_blocks = q_blocks * jnp.asarray(scale, q.dtype)
  k_blocks, v_blocks = _gather_blocks(k, layout, heads), _gather_blocks(v, layout, heads)
  tiles, tile_id = _block_masks(layout)
  mask = jnp.asarray(tiles)[tile_id]  # [Hl, nq, max_kv, bq, bk]
  mask = mask.transpose(0, 1, 3, 2, 4)[None, :, :, :, None]  # [1, Hl, nq, bq, 1, max_kv, bk]
  scores = jnp.einsum("bgnqrd,bgnmkd->bgnqrmk", q_blocks, k_blocks,
                      preferred_element_type=jnp.float32)
  probs, _, row_sum = _masked_softmax_stats(scores, mask, (-2, -1))
  out = jnp.einsum("bgnqrmk,bgnmkd->bgnqrd", probs.astype(v.dtype), v_blocks,
                   preferred_element_type=jnp.float32)
  out = out / jnp.where(row_sum > 0, row_sum, 1.0)[..., 0]
  out = out.transpose(0, 2, 3, 1, 4, 5).reshape(batch, layout.padded_seq_q, heads, dim)
  return out[:, :seq_q].astype(q.dtype)
