"""Pruning scores and masks of one weight: magnitude, Wanda, and the comparison groups they are ranked in.

Every prunable weight is viewed as `[G, I, O]`: G independent matrices (MoE experts, else 1), I inputs (the
contracted axes, flattened in order) and O outputs. Our layers store weights input-first (`wq [D, N, H]`,
`wo [N, H, D]`, `w_gate [D, F]`, experts `[E, D, F]`), so the view is a reshape (`canonical`).

- magnitude: score |W|, the lowest `sparsity` share pruned per matrix (layer-wise; per expert for MoE).
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", eq. 1):
  S_ij = |W_ij| * ||X_j||_2, X_j the j-th input feature over the calibration tokens; pruned per output
  (their "per output" comparison group, §3), with no weight update.
- N:M (Mishra et al. 2021; Wanda §4.2): in every group of M consecutive inputs of an output, the N highest
  scores are kept (2:4 keeps half), so the pattern runs along the input dimension.

All mask functions return bool keep-masks of the scores' shape, prune exactly floor(sparsity * count) entries
per comparison group (ties: the lower index is pruned first, a stable sort) and work on NumPy arrays, JAX
arrays (computed in NumPy) and inside `jax.jit` (with a traced sparsity too).
"""

import jax.numpy as jnp
import numpy as np

METHODS = ("magnitude", "wanda", "nm")
GROUPS = ("per_matrix", "per_output")  # comparison groups of magnitude / wanda (--group)
DEFAULT_GROUP = {"magnitude": "per_matrix", "wanda": "per_output"}

# Layer name -> (group axes, input axes) of the weights we prune: attention projections, dense and shared
# SwiGLU, routed experts. Never norms, embeddings / the output head, routers, or routed-attention extras:
# they hold few weights, and Wanda (§4) prunes only the linear layers inside the blocks too.
_ATTENTION = {"wq": (0, 1), "wk": (0, 1), "wv": (0, 1), "wo": (0, 2)}
_FFN_DENSE = {"w_gate": (0, 1), "w_up": (0, 1), "w_down": (0, 1),
              "shared_gate": (0, 1), "shared_up": (0, 1), "shared_down": (0, 1)}


def prunable_layout(name: str, ndim: int) -> tuple[int, int] | None:
  """(group axes, input axes) of parameter `name` ("blocks/0/attention/wq"), or None if it is never pruned."""
  parts = name.split("/")
  if len(parts) != 4 or parts[0] != "blocks":
    return None
  module, leaf = parts[2], parts[3]
  if module == "attention" and leaf in _ATTENTION:
    return _ATTENTION[leaf]
  if module == "ffn" and leaf in _FFN_DENSE:
    # MoE experts carry a leading expert axis (3-D); dense and shared SwiGLU weights are 2-D.
    return (1, 1) if ndim == 3 and leaf in ("w_gate", "w_up", "w_down") else _FFN_DENSE[leaf]
  return None


def canonical_shape(shape: tuple[int, ...], layout: tuple[int, int]) -> tuple[int, int, int]:
  """[G, I, O] sizes of a weight of `shape` under its (group axes, input axes) layout."""
  group_axes, in_axes = layout
  groups = int(np.prod(shape[:group_axes], dtype=np.int64))
  inputs = int(np.prod(shape[group_axes:group_axes + in_axes], dtype=np.int64))
  return groups, inputs, int(np.prod(shape[group_axes + in_axes:], dtype=np.int64))


def canonical(weight, layout: tuple[int, int]):
  """The weight reshaped to [G, I, O] (see the module docstring)."""
  return weight.reshape(canonical_shape(weight.shape, layout))


def magnitude_scores(weight):
  """|W|, any shape."""
  return abs(weight)


def wanda_scores(weight, input_sumsq):
  """|W_ij| * ||X_j||_2 for weight [G, I, O] and input_sumsq [G, I] = sum over tokens of X_j^2."""
  xp = _xp(weight)
  return abs(weight) * xp.sqrt(xp.maximum(input_sumsq, 0.0))[..., None]


def _xp(array):
  """NumPy for NumPy inputs (host-side one-shot pruning, no per-shape compiles), else jax.numpy (inside jit)."""
  return np if isinstance(array, np.ndarray) else jnp


def _keep_lowest_pruned(scores, axis: int, num_pruned):
  """True except for the `num_pruned` lowest scores along `axis` (stable: the lower index goes first)."""
  xp = _xp(scores)
  order = xp.argsort(scores, axis=axis, kind="stable") if xp is np else jnp.argsort(scores, axis=axis, stable=True)
  rank = xp.argsort(order, axis=axis, kind="stable") if xp is np else jnp.argsort(order, axis=axis, stable=True)
  return rank >= num_pruned


def _num_pruned(sparsity, count: int):
  xp = np if isinstance(sparsity, (int, float, np.floating)) else jnp
  return xp.floor(sparsity * count + 1e-6).astype(xp.int32)  # 1e-6: 0.5 * 10 is 5, not 4.999...


def per_matrix_mask(scores, sparsity):
  """Keep-mask of scores [G, I, O] pruning floor(sparsity * I * O) lowest entries of each of the G matrices."""
  groups, inputs, outputs = scores.shape
  flat = scores.reshape(groups, inputs * outputs)
  return _keep_lowest_pruned(flat, 1, _num_pruned(sparsity, inputs * outputs)).reshape(scores.shape)


def per_output_mask(scores, sparsity):
  """Keep-mask of scores [G, I, O] pruning floor(sparsity * I) lowest inputs of every output (g, o)."""
  return _keep_lowest_pruned(scores, 1, _num_pruned(sparsity, scores.shape[1]))


def nm_mask(scores, n: int, m: int):
  """Keep-mask of scores [G, I, O]: in each group of m consecutive inputs of every output, the n best kept."""
  groups, inputs, outputs = scores.shape
  if inputs % m:
    raise ValueError(f"N:M {n}:{m} needs the input dimension ({inputs}) to be a multiple of M={m}.")
  blocks = scores.reshape(groups, inputs // m, m, outputs)
  return _keep_lowest_pruned(blocks, 2, m - n).reshape(scores.shape)


def parse_nm(text: str) -> tuple[int, int]:
  """'2:4' -> (2, 4); raises ValueError naming --nm unless 0 < N < M."""
  try:
    n, m = (int(part) for part in text.split(":"))
  except ValueError:
    raise ValueError(f"--nm {text!r} is not N:M (two integers, e.g. --nm 2:4).") from None
  if not 0 < n < m:
    raise ValueError(f"--nm {text!r}: need 0 < N < M (N weights kept of every M), e.g. --nm 2:4.")
  return n, m
