"""Grouped matmuls for dropless MoE (MegaBlocks' grouped GEMM, Gale et al. 2022, sec. 5;
megablox's gmm / tgmm), as Pallas kernels with a custom VJP.

    out = gmm(lhs, rhs, group_sizes)       # [M, K] x [G, K, N] -> [M, N]
    d_rhs = tgmm(lhs, grad, group_sizes)   # [M, K] x [M, N]   -> [G, K, N]

Rows of lhs are sorted by group: group g owns rows [offsets[g], offsets[g + 1]) with
offsets = [0, cumsum(group_sizes)], so `out[r] = lhs[r] @ rhs[g(r)]`; rows past
sum(group_sizes) belong to no group and come out as zeros (unlike megablox, whose kernel leaves
them unwritten). The VJP of gmm is d lhs = gmm(d out, rhs^T) and d rhs = tgmm(lhs, d out).
The platform glue is in gpu.py (Triton; also the CPU interpret path) and tpu.py (Mosaic).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sparseformer.kernels.grouped_matmul import gpu, metadata, tpu
from sparseformer.kernels.grouped_matmul.metadata import Tiling

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class _Config:
  platform: str  # "gpu" (Triton; also CPU interpret) or "tpu" (Mosaic)
  interpret: bool
  tiling: Tiling | None
  out_dtype: jnp.dtype


def _resolve(platform: str | None, interpret: bool | None) -> tuple[str, bool]:
  if platform is None:
    platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"platform={platform!r} must be 'gpu', 'tpu' or None (from the backend).")
  interpret = jax.default_backend() == "cpu" if interpret is None else bool(interpret)
  return platform, interpret


def _check(name: str, a, b, group_sizes, platform: str, interpret: bool) -> None:
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"{name}: group_sizes must be a 1-D integer array [G]; got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}.")
  if a.dtype != b.dtype or jnp.dtype(a.dtype) not in FLOAT_DTYPES:
    raise ValueError(f"{name}: operands must share one dtype of float32 / bfloat16 / float16; got "
                     f"{a.dtype} and {b.dtype}; cast them.")
  if platform == "tpu" and not interpret and a.dtype == jnp.float16:
    raise ValueError(f"{name}: the TPU kernels take float32 or bfloat16, not float16; cast.")


def _same_varying_axes(*arrays):
  """Inside shard_map, makes every operand vary over the union of their mesh axes (a pallas_call
  takes operands of one variance) by adding a zero derived from each; JAX then differentiates the
  implicit broadcast itself (summing e.g. weight gradients over token shards). No-op elsewhere."""
  axes = [metadata.varying_axes(a) for a in arrays]
  if all(a == axes[0] for a in axes):
    return arrays
  zero = jnp.zeros_like(sum(a.reshape(-1)[0].astype(jnp.float32) for a in arrays))
  return tuple(a + zero.astype(a.dtype) for a in arrays)


def _pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
  pads = [(0, -(-d // m) * m - d) for d, m in zip(x.shape, multiples)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type=None, tiling: Tiling | None = None,
        interpret: bool | None = None, platform: str | None = None) -> jax.Array:
  """Grouped matmul: lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes int [G] -> [M, N].

  Args:
    preferred_element_type: output dtype (default lhs.dtype); accumulation is always f32.
    tiling: tile sizes (`metadata.Tiling`); None: min(128, next power of two of each dim).
    interpret: run the Pallas kernels in interpret mode; None = True on the CPU backend.
    platform: "gpu" (Triton; also the CPU interpret path) or "tpu" (Mosaic); None = backend.
  Returns:
    out[r] = lhs[r] @ rhs[g(r)]; zeros for rows past sum(group_sizes). Groups are cut at M when
    sum(group_sizes) > M. Differentiable in lhs and rhs (custom VJP through gmm / tgmm).
  Raises:
    ValueError naming the argument and the fix for mismatched shapes or dtypes, an unknown
    platform, or tiles the compiled kernels cannot take (`metadata.resolve_tiling`).
  """
  lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"gmm: expected lhs [M, K] and rhs [G, K, N]; got {lhs.shape}, {rhs.shape}.")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"gmm: group_sizes {group_sizes.shape} must be [G] with G = rhs.shape[0] "
                     f"= {rhs.shape[0]}.")
  platform, interpret = _resolve(platform, interpret)
  _check("gmm", lhs, rhs, group_sizes, platform, interpret)
  metadata.resolve_tiling(tiling, lhs.shape[0], lhs.shape[1], rhs.shape[2], platform=platform,
                          interpret=interpret, dtype=lhs.dtype)
  config = _Config(platform, interpret, tiling, jnp.dtype(preferred_element_type or lhs.dtype))
  return _gmm(config, *_same_varying_axes(lhs, rhs, group_sizes))


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
         preferred_element_type=None, tiling: Tiling | None = None,
         interpret: bool | None = None, platform: str | None = None) -> jax.Array:
  """Transposed grouped matmul (gmm's weight gradient): lhs [M, K], grad [M, N] -> [G, K, N].

  out[g] = lhs[rows of g]^T @ grad[rows of g]; zeros for an empty group. `num_groups` must equal
  len(group_sizes) when given. Other arguments as `gmm` (tiling over M, K, N). Not differentiable.
  """
  lhs, grad, group_sizes = jnp.asarray(lhs), jnp.asarray(grad), jnp.asarray(group_sizes)
  if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
    raise ValueError(f"tgmm: expected lhs [M, K] and grad [M, N]; got {lhs.shape}, {grad.shape}.")
  if num_groups is not None and group_sizes.shape != (num_groups,):
    raise ValueError(f"tgmm: group_sizes {group_sizes.shape} must be [num_groups={num_groups}].")
  platform, interpret = _resolve(platform, interpret)
  _check("tgmm", lhs, grad, group_sizes, platform, interpret)
  metadata.resolve_tiling(tiling, lhs.shape[0], lhs.shape[1], grad.shape[1], platform=platform,
                          interpret=interpret, dtype=lhs.dtype)
  config = _Config(platform, interpret, tiling, jnp.dtype(preferred_element_type or lhs.dtype))
  return _tgmm(config, *_same_varying_axes(lhs, grad, group_sizes))


def _offsets(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  return jnp.minimum(metadata.group_offsets(group_sizes), num_rows)


def _tiles(config: _Config, m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
  return metadata.resolve_tiling(config.tiling, m, k, n, platform=config.platform,
                                 interpret=config.interpret, dtype=dtype)


def _gmm_forward(config: _Config, lhs, rhs, group_sizes):
  (m, k), n = lhs.shape, rhs.shape[2]
  tiles = _tiles(config, m, k, n, lhs.dtype)
  tm, tk, tn = tiles
  impl = gpu if config.platform == "gpu" else tpu
  out = impl.gmm(_pad_to(lhs, (tm, tk)), _pad_to(rhs, (1, tk, tn)), _offsets(group_sizes, m),
                 tiles=tiles, out_dtype=config.out_dtype, interpret=config.interpret)
  return out[:m, :n]


def _tgmm(config: _Config, lhs, grad, group_sizes):
  (m, k), n = lhs.shape, grad.shape[1]
  tiles = _tiles(config, m, k, n, lhs.dtype)
  tm, tk, tn = tiles
  impl = gpu if config.platform == "gpu" else tpu
  out = impl.tgmm(_pad_to(lhs, (tm, tk)), _pad_to(grad, (tm, tn)), _offsets(group_sizes, m),
                  tiles=tiles, out_dtype=config.out_dtype, interpret=config.interpret)
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(config: _Config, lhs, rhs, group_sizes):
  return _gmm_forward(config, lhs, rhs, group_sizes)


def _gmm_fwd(config: _Config, lhs, rhs, group_sizes):
  return _gmm_forward(config, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(config: _Config, residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_out = d_out.astype(lhs.dtype)
  d_lhs = _gmm_forward(dataclasses.replace(config, out_dtype=lhs.dtype), d_out,
                       jnp.swapaxes(rhs, 1, 2), group_sizes)
  d_rhs = _tgmm(dataclasses.replace(config, out_dtype=rhs.dtype), lhs, d_out, group_sizes)
  return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
