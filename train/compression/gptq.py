"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For a weight W [rows, cols] applied as W @ x and inputs X [cols, n], GPTQ rounds W one input column at a time
and spreads each column's rounding error over the columns not yet rounded, minimising ||W X - Q X||^2 (Alg. 1):

    H = X X^T + damp * mean(diag H) * I            (damping, damp = 0.01)
    U = upper Cholesky factor of H^-1              (H^-1 = U^T U)
    for i in 0..cols-1:
      if i is the first column of a group: scale = absmax(W[:, group]) / qmax   (from the updated W)
      q_i = round(W[:, i] / scale) * scale
      e = (W[:, i] - q_i) / U[i, i]
      W[:, i:] -= e U[i, i:]

`quantize_weight` is that loop compiled (lax.fori_loop over columns; the lazy batch updates of the paper's
implementation only reorder the same arithmetic). It plugs into qwix.contrib's calibration framework in place
of qwix's own eager GPTQ loop (`qwix.contrib.gptq_core.quantize_weight`, which is correct but dispatches every
column's operations one by one: minutes per layer on CPU). Hessians come from qwix's GptqCalibrationProvider.
"""

import functools

import jax
import jax.numpy as jnp


def _upper_cholesky_of_inverse(hessian: jax.Array, damping: float) -> jax.Array:
  columns = hessian.shape[0]
  diag = jnp.diag(hessian)
  dead = diag == 0  # inputs that are always zero: any value works, GPTQ pins them to 0
  hessian = jnp.where(dead[:, None] & jnp.eye(columns, dtype=bool), 1.0, hessian)
  hessian = hessian + damping * jnp.mean(diag) * jnp.eye(columns, dtype=hessian.dtype)
  inverse = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(hessian), True), jnp.eye(columns, dtype=hessian.dtype))
  return jnp.linalg.cholesky(inverse, upper=True), dead


def _absmax_scale(block: jax.Array, qtype: str) -> jax.Array:
  """Per-row scale [rows, 1] of a block [rows, group] (qwix's absmax: absmax / symmetric bound)."""
  from qwix._src.core import qarray  # pylint: disable=import-outside-toplevel

  how = qarray.HowToQuantize(qtype=qtype, channelwise_axes=(0,))
  scale, _ = qarray.compute_scale_zero_point(qarray.calibrate(block, how), qtype)
  return scale


def _round(w: jax.Array, scale: jax.Array, qtype: str):
  """(stored values, dequantized) of w [rows, 1] on the grid `scale` [rows, 1] (qwix's rounding)."""
  from qwix._src.core import qarray  # pylint: disable=import-outside-toplevel

  quantized = qarray.quantize_with_scale_zero_point(w, qtype, scale, None)
  return quantized.qvalue, qarray.dequantize(quantized)


@functools.partial(jax.jit, static_argnames=("group_size", "qtype", "damping"))
def gptq_columns(weight: jax.Array, hessian: jax.Array, *, group_size: int, qtype: str, damping: float = 0.01):
  """The GPTQ loop on weight [rows, cols] (computed in f32) with H [cols, cols], symmetric absmax grids of
  `group_size` inputs. Returns (q [rows, cols] in qwix's storage type of `qtype`, scales [rows, cols // group])."""
  rows, columns = weight.shape
  upper, dead = _upper_cholesky_of_inverse(hessian.astype(jnp.float32), damping)
  weight = jnp.where(dead[None, :], 0.0, weight.astype(jnp.float32))
  q_probe, _ = _round(weight[:, :1], jnp.ones((rows, 1), jnp.float32), qtype)
  index = jnp.arange(columns)

  def column(i, carry):
    weight, q_all, scales = carry
    group = i // group_size
    scale = jax.lax.cond(i % group_size == 0,
                         lambda: _absmax_scale(jax.lax.dynamic_slice_in_dim(weight, group * group_size, group_size,
                                                                            1), qtype),
                         lambda: jax.lax.dynamic_slice_in_dim(scales, group, 1, 1))
    scales = jax.lax.dynamic_update_slice_in_dim(scales, scale, group, 1)
    w = jax.lax.dynamic_slice_in_dim(weight, i, 1, 1)  # [rows, 1]
    q, dequantized = _round(w, scale, qtype)
    q_all = jax.lax.dynamic_update_slice_in_dim(q_all, q, i, 1)
    error = (w - dequantized)[:, 0] / upper[i, i]
    weight = weight - jnp.outer(error, jnp.where(index >= i, upper[i], 0.0))
    return weight, q_all, scales

  init = (weight, jnp.zeros((rows, columns), q_probe.dtype), jnp.zeros((rows, columns // group_size), jnp.float32))
  _, q_all, scales = jax.lax.fori_loop(0, columns, column, init)
  return q_all, scales


def quantize_weight(weight: jax.Array, hessian: jax.Array, how, *, damping: float = 0.01):
  """Drop-in for qwix.contrib.gptq_core.quantize_weight's first output: weight [rows, cols], `how` a qwix
  HowToQuantize with channelwise_axes [0] and tiled_axes {} or {1: group}; symmetric (absmax) only.
  Returns a qwix QArray (qvalue [rows, cols], scale [rows, groups] in the weight's dtype)."""
  from qwix._src.core import qarray  # pylint: disable=import-outside-toplevel

  if how.calibration_method != "absmax":
    raise ValueError(f"GPTQ here supports absmax calibration, got {how.calibration_method!r}.")
  columns = weight.shape[1]
  group_size = int(how.tiled_axes.get(1, columns))
  if columns % group_size:
    raise ValueError(f"GPTQ group size {group_size} does not divide the {columns} inputs of a weight.")
  q, scales = gptq_columns(weight, hessian, group_size=group_size, qtype=str(how.qtype), damping=float(damping))
  return qarray.QArray(q, scales.astype(weight.dtype), None, qtype=how.qtype)
