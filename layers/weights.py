"""How a layer hands a weight to its matmul, so that post-training quantization (qwix PTQ) can swap it.

qwix PTQ (train/compression/quantize.py) replaces a weight `nnx.Param` with a quantized array (`WithAux` around a
`QArray`: integer values + scales) that the intercepted einsum consumes directly; it has no usable `.astype`. A
layer therefore never casts a raw parameter itself: `for_matmul` casts a float weight to the compute dtype (the
unquantized numerics are unchanged) and passes a quantized one through. `dequantized` is for the few places that
need a float array (an embedding lookup, MoE expert stacks on dispatch paths qwix cannot intercept).
"""

import jax


def is_quantized(value) -> bool:
  """True for a qwix quantized weight (anything array-like that is not a jax.Array)."""
  return not isinstance(value, jax.Array)


def for_matmul(param, dtype):
  """The weight of `param` for an einsum / dot: a float weight cast to `dtype`, a quantized one as it is."""
  value = param[...]
  return value if is_quantized(value) else value.astype(dtype)


def dequantized(param, dtype) -> jax.Array:
  """The weight of `param` as a float array in `dtype` (a quantized weight is dequantized: values x scales)."""
  value = param[...]
  if not is_quantized(value):
    return value.astype(dtype)
  import qwix  # pylint: disable=import-outside-toplevel  (optional extra; only quantized models get here)

  array = getattr(value, "array", value)  # WithAux -> QArray
  return qwix.dequantize(array).astype(dtype)
