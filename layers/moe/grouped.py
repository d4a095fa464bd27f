"""SwiGLU experts applied to rows sorted by expert (the dropless grouped matmul).

Contract shared by every implementation: `x_sorted` [M, D] holds rows grouped
by expert in increasing expert order, `group_sizes` [E] int32 says how many rows
each expert owns (sum <= M); rows past sum(group_sizes) are padding and come out
as zeros. Weights: w_gate, w_up [E, D, F], w_down [E, F, D]. Returns [M, D] in
x's dtype.

- `grouped_swiglu_reference`: runs every expert on every row and masks (O(E*M)); tests only.
- `grouped_swiglu_ragged`: three `jax.lax.ragged_dot` calls, differentiated by JAX.
- `grouped_swiglu_blocked`: pure JAX over blocks of `block_size` rows, each block
  inside one expert's rows (every expert's rows padded up to whole blocks). Two
  schedules of the same computation:
  * "loop" (CPU default): a loop over the blocks in use with a hand-written
    backward (custom_vjp). Only blocks that hold rows are visited (dynamic trip
    count), so cost follows the real rows plus at most one partial block per
    expert, and no padded copy of the rows is made.
  * "batched" (GPU / TPU default): rows gathered into the static worst-case block
    layout [ceil(M / bs) + E, bs, D] and one batched matmul against per-block
    gathered weights; differentiated by JAX. Computes the empty blocks too, but
    as a few large kernels instead of a serial loop of small ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Dense SwiGLU FFN: x [..., D], w_gate / w_up [D, F], w_down [F, D] -> [..., D]."""
  gate = jnp.einsum("...d,df->...f", x, w_gate)
  up = jnp.einsum("...d,df->...f", x, w_up)
  return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down)


def _row_group(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """Expert id of each sorted row [M] (E for padding rows past sum(group_sizes))."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def grouped_swiglu_reference(x_sorted, group_sizes, w_gate, w_up, w_down) -> jax.Array:
  """Every expert on every row, masked to its own rows: the obvious (slow) grouped FFN."""
  row_group = _row_group(group_sizes, x_sorted.shape[0])
  out = jnp.zeros(x_sorted.shape, jnp.float32)
  for expert in range(w_gate.shape[0]):
    y = swiglu(x_sorted, w_gate[expert], w_up[expert], w_down[expert])
    out = out + jnp.where((row_group == expert)[:, None], y.astype(jnp.float32), 0.0)
  return out.astype(x_sorted.dtype)


def grouped_swiglu_ragged(x_sorted, group_sizes, w_gate, w_up, w_down) -> jax.Array:
  """SwiGLU through `jax.lax.ragged_dot` (on CPU it expands to a dense [E, M, .] product)."""
  group_sizes = group_sizes.astype(jnp.int32)
  gate = lax.ragged_dot(x_sorted, w_gate, group_sizes)
  up = lax.ragged_dot(x_sorted, w_up, group_sizes)
  y = lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)
  is_row = jnp.arange(x_sorted.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(is_row[:, None], y, 0).astype(x_sorted.dtype)


def _block_schedule(group_sizes: jax.Array, block_size: int, num_rows: int):
  """Blocks of <= block_size rows, each inside one expert's rows, in row order.

  Returns per block (static bound ceil(M / bs) + E entries): expert id, first row,
  number of real rows; and the number of blocks in use (traced).
  """
  num_experts = group_sizes.shape[0]
  max_blocks = -(-num_rows // block_size) + num_experts
  blocks_per_group = (group_sizes + block_size - 1) // block_size
  block_ends = jnp.cumsum(blocks_per_group)
  block = jnp.arange(max_blocks)
  expert = jnp.minimum(jnp.searchsorted(block_ends, block, side="right"), num_experts - 1)
  index_in_group = block - (block_ends - blocks_per_group)[expert]
  group_start = jnp.cumsum(group_sizes) - group_sizes
  row_start = group_start[expert] + index_in_group * block_size
  rows = jnp.clip(group_sizes[expert] - index_in_group * block_size, 0, block_size)
  return expert.astype(jnp.int32), row_start.astype(jnp.int32), rows.astype(jnp.int32), block_ends[-1]


def _grouped_swiglu_batched(x_sorted, group_sizes, w_gate, w_up, w_down, block_size):
  num_rows, dim = x_sorted.shape
  num_experts = group_sizes.shape[0]
  block_expert, _, _, _ = _block_schedule(group_sizes, block_size, num_rows)
  num_slots = block_expert.shape[0] * block_size
  blocks_per_group = (group_sizes + block_size - 1) // block_size
  padded_start = (jnp.cumsum(blocks_per_group) - blocks_per_group) * block_size  # [E]
  group_start = jnp.cumsum(group_sizes) - group_sizes
  row_group = _row_group(group_sizes, num_rows)
  is_row = row_group < num_experts
  safe_group = jnp.minimum(row_group, num_experts - 1)
  # Padded slot of each sorted row; padding rows go to a trash slot past the end.
  slot = jnp.where(is_row, padded_start[safe_group] + jnp.arange(num_rows) - group_start[safe_group], num_slots)
  slot_row = jnp.full((num_slots + 1,), num_rows, jnp.int32).at[slot].set(
      jnp.arange(num_rows, dtype=jnp.int32))[:num_slots]  # source row per slot; num_rows = zero row
  x_blocks = jnp.concatenate([x_sorted, jnp.zeros((1, dim), x_sorted.dtype)])[slot_row]
  x_blocks = x_blocks.reshape(-1, block_size, dim)  # [blocks, bs, D]
  gate = jnp.einsum("bsd,bdf->bsf", x_blocks, w_gate[block_expert])
  up = jnp.einsum("bsd,bdf->bsf", x_blocks, w_up[block_expert])
  y_blocks = jnp.einsum("bsf,bfd->bsd", jax.nn.silu(gate) * up, w_down[block_expert])
  y = y_blocks.reshape(num_slots, dim)[jnp.minimum(slot, num_slots - 1)]
  return jnp.where(is_row[:, None], y, 0).astype(x_sorted.dtype)


def _silu_grad(z):
  s = jax.nn.sigmoid(z)
  return s * (1 + z * (1 - s))


def _varying_like(*arrays):
  """Makes loop-carry initial values vary over the same manual mesh axes as `arrays`.

  Inside `shard_map` a loop carry must keep its set of varying mesh axes; fresh
  zeros vary over none, while the values written into them vary over the axes
  of the inputs. Adding a zero derived from every input gives the initial values
  the union of those axes (zeros_like keeps the varying axes and ignores the
  values, so NaN inputs cannot leak). Outside shard_map this adds a zero.
  """
  anchor = sum(a.reshape(-1)[0].astype(jnp.float32) for a in arrays)
  zero = jnp.zeros_like(anchor)
  return lambda tree: jax.tree.map(lambda value: value + zero.astype(value.dtype), tree)


def _pad_rows(a, block_size):
  return jnp.pad(a, ((0, block_size), (0, 0)))


def _blocked_forward(x_sorted, group_sizes, w_gate, w_up, w_down, block_size):
  num_rows, dim = x_sorted.shape
  hidden = w_gate.shape[-1]
  dtype = x_sorted.dtype
  expert_of, row_start, rows, num_blocks = _block_schedule(group_sizes, block_size, num_rows)
  row_in_block = jnp.arange(block_size)
  # One block of padding at the end so that no dynamic slice is clamped (which would shift it).
  x_pad = _pad_rows(x_sorted, block_size)

  def body(b, carry):
    y, gate_out, up_out = carry
    start, expert, mask = row_start[b], expert_of[b], (row_in_block < rows[b])[:, None]
    xb = lax.dynamic_slice_in_dim(x_pad, start, block_size)
    gate = jnp.dot(xb, w_gate[expert], preferred_element_type=jnp.float32).astype(dtype)
    up = jnp.dot(xb, w_up[expert], preferred_element_type=jnp.float32).astype(dtype)
    yb = jnp.dot(jax.nn.silu(gate) * up, w_down[expert], preferred_element_type=jnp.float32).astype(dtype)

    def write(buffer, block_value):
      old = lax.dynamic_slice_in_dim(buffer, start, block_size)
      return lax.dynamic_update_slice_in_dim(buffer, jnp.where(mask, block_value, old), start, 0)

    return write(y, yb), write(gate_out, gate), write(up_out, up)

  init = (jnp.zeros((num_rows + block_size, dim), dtype),
          jnp.zeros((num_rows + block_size, hidden), dtype),
          jnp.zeros((num_rows + block_size, hidden), dtype))
  init = _varying_like(x_sorted, group_sizes, w_gate, w_up, w_down)(init)
  y, gate_all, up_all = lax.fori_loop(0, num_blocks, body, init)
  return y[:num_rows], (gate_all, up_all)


SCHEDULES = ("auto", "loop", "batched")


def grouped_swiglu_blocked(x_sorted, group_sizes, w_gate, w_up, w_down, block_size: int = 64,
                           schedule: str = "auto"):
  """Grouped SwiGLU over row blocks of one expert each; see the module docstring.

  schedule: "loop" | "batched" | "auto" (loop on CPU, batched elsewhere).
  """
  if schedule == "auto":
    schedule = "loop" if jax.default_backend() == "cpu" else "batched"
  if schedule == "batched":
    return _grouped_swiglu_batched(x_sorted, group_sizes, w_gate, w_up, w_down, block_size)
  if schedule != "loop":
    raise ValueError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
  # Inside shard_map, give every input the same varying mesh axes before the custom_vjp: JAX then
  # differentiates this implicit broadcast itself (summing the weight gradients over the token shards).
  inputs = _varying_like(x_sorted, group_sizes, w_gate, w_up, w_down)(
      (x_sorted, group_sizes, w_gate, w_up, w_down))
  return _grouped_swiglu_blocked(*inputs, block_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _grouped_swiglu_blocked(x_sorted, group_sizes, w_gate, w_up, w_down, block_size):
  return _blocked_forward(x_sorted, group_sizes, w_gate, w_up, w_down, block_size)[0]


def _blocked_fwd(x_sorted, group_sizes, w_gate, w_up, w_down, block_size):
  y, (gate_all, up_all) = _blocked_forward(x_sorted, group_sizes, w_gate, w_up, w_down, block_size)
  return y, (x_sorted, group_sizes, w_gate, w_up, w_down, gate_all, up_all)


def _blocked_bwd(block_size, residuals, dy):
  x_sorted, group_sizes, w_gate, w_up, w_down, gate_all, up_all = residuals
  num_rows = x_sorted.shape[0]
  dtype = x_sorted.dtype
  expert_of, row_start, rows, num_blocks = _block_schedule(group_sizes, block_size, num_rows)
  row_in_block = jnp.arange(block_size)
  x_pad, dy_pad = _pad_rows(x_sorted, block_size), _pad_rows(dy.astype(dtype), block_size)
  f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)

  def body(b, carry):
    dx, dw_gate, dw_up, dw_down = carry
    start, expert, mask = row_start[b], expert_of[b], (row_in_block < rows[b])[:, None]
    take = lambda a: jnp.where(mask, lax.dynamic_slice_in_dim(a, start, block_size), 0)
    xb, dyb, gate, up = take(x_pad), take(dy_pad), take(gate_all), take(up_all)
    act = jax.nn.silu(gate)
    dh = f32(dyb, w_down[expert].T)  # [bs, F]
    d_up = (dh * act).astype(dtype)
    d_gate = (dh * up * _silu_grad(gate.astype(jnp.float32))).astype(dtype)
    dxb = (f32(d_gate, w_gate[expert].T) + f32(d_up, w_up[expert].T)).astype(dtype)
    old = lax.dynamic_slice_in_dim(dx, start, block_size)
    dx = lax.dynamic_update_slice_in_dim(dx, jnp.where(mask, dxb, old), start, 0)
    accumulate = lambda acc, update: lax.dynamic_update_index_in_dim(acc, acc[expert] + update, expert, 0)
    dw_down = accumulate(dw_down, f32((act * up).T, dyb))
    dw_gate = accumulate(dw_gate, f32(xb.T, d_gate))
    dw_up = accumulate(dw_up, f32(xb.T, d_up))
    return dx, dw_gate, dw_up, dw_down

  init = (jnp.zeros(x_pad.shape, dtype), jnp.zeros(w_gate.shape, jnp.float32),
          jnp.zeros(w_up.shape, jnp.float32), jnp.zeros(w_down.shape, jnp.float32))
  init = _varying_like(x_sorted, group_sizes, w_gate, w_up, w_down, dy, gate_all, up_all)(init)
  dx, dw_gate, dw_up, dw_down = lax.fori_loop(0, num_blocks, body, init)
  return (dx[:num_rows], None, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
          dw_down.astype(w_down.dtype))


_grouped_swiglu_blocked.defvjp(_blocked_fwd, _blocked_bwd)

GROUPED_SWIGLU = {
    "dropless_gather": grouped_swiglu_blocked,
    "dropless_ragged_dot": grouped_swiglu_ragged,
}
