"""A quantized workdir on disk: `quantization.json` (the marker: scheme, source, step) + `quantized/weights.npz`.

Every array of the quantized model's state is stored flat under its path ('blocks/0/ffn/w_up/array/qvalue'); a
sub-byte integer array (int4, uint4 for nf4, int2) is bit-packed, two or four values per byte (an int4 container
whose values fit in 2 bits, as qwix's emulated int2, at four per byte), so the file holds the weights at their real width and `stored_bytes` is what they cost. Loading rebuilds the quantized model's
structure from the config and scheme (quantize.abstract_quantized_model) and fills it with these arrays.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np

MARKER = "quantization.json"
WEIGHTS = os.path.join("quantized", "weights.npz")
_SUB_BYTE = {"int4": (4, True), "uint4": (4, False), "int2": (2, True), "uint2": (2, False)}


def is_quantized_workdir(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, MARKER))


def read_marker(workdir: str) -> dict:
  with open(os.path.join(workdir, MARKER), encoding="utf-8") as file:
    return json.load(file)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
  """Integer values (any sign, fitting in `bits`) -> uint8 [ceil(n * bits / 8)], little end first."""
  per_byte = 8 // bits
  flat = values.astype(np.int64).reshape(-1) & ((1 << bits) - 1)
  flat = np.pad(flat, (0, -flat.size % per_byte)).reshape(-1, per_byte)
  shifts = np.arange(per_byte, dtype=np.int64) * bits
  return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, signed: bool, count: int) -> np.ndarray:
  """Inverse of `pack`: int64 [count], sign-extended when `signed`."""
  per_byte = 8 // bits
  shifts = np.arange(per_byte, dtype=np.int64) * bits
  values = ((packed.astype(np.int64)[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
  if signed:
    values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
  return values


def encode(leaves: dict) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
  """{path: array} -> (npz arrays, {path: {dtype, shape}}); sub-byte arrays packed."""
  arrays, layout = {}, {}
  for path, value in leaves.items():
    dtype = str(value.dtype)
    host = np.asarray(value)
    layout[path] = {"dtype": dtype, "shape": list(host.shape)}
    if dtype in _SUB_BYTE:
      # qwix emulates int2 in an int4 container: pack at the narrowest width that holds the values (lossless).
      bits, signed = _SUB_BYTE[dtype]
      narrow = host.size and (-2 <= host.min() and host.max() <= 1 if signed else host.max() <= 3)
      layout[path]["bits"] = bits = 2 if narrow else bits
      arrays[path] = pack(host.astype(np.int8), bits)
    elif dtype == "bfloat16" or dtype.startswith("float8"):
      arrays[path] = host.view(np.uint16 if dtype == "bfloat16" else np.uint8)
    else:
      arrays[path] = host
  return arrays, layout


def decode(arrays, layout: dict) -> dict:
  """Inverse of `encode`: {path: jax array of the stored dtype and shape}."""
  out = {}
  for path, entry in layout.items():
    dtype, shape = entry["dtype"], tuple(entry["shape"])
    stored = arrays[path]
    if dtype in _SUB_BYTE:
      bits, signed = entry.get("bits", _SUB_BYTE[dtype][0]), _SUB_BYTE[dtype][1]
      values = unpack(stored, bits, signed, int(np.prod(shape, dtype=np.int64)))
      out[path] = jnp.asarray(values.astype(np.int8).reshape(shape).astype(getattr(ml_dtypes, dtype)))
    elif dtype == "bfloat16" or dtype.startswith("float8"):
      out[path] = jnp.asarray(stored.view(getattr(ml_dtypes, dtype)).reshape(shape))
    else:
      out[path] = jnp.asarray(stored.reshape(shape))
  return out


def stored_bytes(arrays: dict[str, np.ndarray], paths) -> int:
  return int(sum(arrays[path].nbytes for path in paths))


def save(out: str, leaves: dict, marker: dict) -> dict[str, np.ndarray]:
  """Writes the weights and then the marker (a crash leaves no marker, so no half-written workdir loads)."""
  arrays, layout = encode(leaves)
  os.makedirs(os.path.join(out, "quantized"), exist_ok=True)
  with open(os.path.join(out, WEIGHTS), "wb") as file:
    np.savez(file, **arrays)
  with open(os.path.join(out, MARKER), "w", encoding="utf-8") as file:
    json.dump({**marker, "layout": layout}, file, indent=2)
  return arrays


def load(workdir: str) -> tuple[dict, dict]:
  """(marker, {path: array}) of a quantized workdir."""
  marker = read_marker(workdir)
  with np.load(os.path.join(workdir, WEIGHTS)) as arrays:
    leaves = decode({name: arrays[name] for name in arrays.files}, marker["layout"])
  return marker, leaves
