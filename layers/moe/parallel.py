"""Expert parallelism: the MoE dispatch inside `shard_map`, tokens exchanged by all-to-all.

Which mesh: the one passed to `MoEFeedForward(..., mesh=...)`, else the mesh
made current by `jax.set_mesh(mesh)` / `jax.sharding.use_mesh(mesh)`
(`jax.sharding.get_abstract_mesh()`). With no mesh, or one whose `data`, `fsdp`,
`expert` and `tensor` axes all have size 1, the layer runs the plain local path.

Layout inside the shard_map (mesh axes `data`, `fsdp`, `expert`, `tensor`):
- tokens [N, D] (the batch flattened) are split over (`data`, `fsdp`, `expert`):
  the batch arrives split over data/fsdp and each expert shard takes its own
  slice of it, so N must divide by the product of those axis sizes;
- expert weights [E, D, F] / [E, F, D] are split over `expert` on E and over
  `tensor` on F (their `fsdp` split of D is gathered on entry, as FSDP does);
- capacity path: each device fills its [G, E, C, D] slot buffer, an all-to-all
  over `expert` sends every expert's slots to the shard that holds it, the
  experts run, and the reverse all-to-all brings the outputs home;
- dropless path: each device sorts its pairs by expert, so the rows for each
  expert shard are contiguous; they go out in a fixed-size buffer per
  destination of R = ceil(ep_buffer_factor * N*k / n) rows (the balanced share
  times MoEConfig.ep_buffer_factor, capped at the worst case N*k, all of this
  device's rows to one shard; a factor >= n, the `expert` axis size, never
  drops). Rows past R of a destination are dropped: output 0, counted in the
  layer's dropped_fraction. On arrival they are re-sorted by local expert and
  run through the grouped SwiGLU, which only visits the rows that arrived
  (dropless_gather, dropless_pallas), then travel back;
- with a `tensor` axis each device computes a slice of the hidden units and
  the expert outputs are summed over `tensor`.
Routing, losses and statistics stay outside the shard_map, in the global view,
so they are global-batch statistics by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sparseformer.layers.moe import dispatch as moe_dispatch
from sparseformer.layers.moe.grouped import GROUPED_SWIGLU

# Grouped SwiGLU of each dropless dispatch (the Pallas one lives beside the dispatch, not in grouped.py).
_GROUPED = GROUPED_SWIGLU | {"dropless_pallas": moe_dispatch.grouped_swiglu_pallas}
EP_OPTIONS = ("ep_buffer_factor",)  # grouped_options read here, not by the grouped SwiGLU

TOKEN_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class ExpertParallelPlan:
  """How the MoE dispatch is split over a mesh (axes of size 1 are left out)."""

  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
  token_axes: tuple[str, ...]  # mesh axes splitting the flattened tokens
  expert_axis: str | None  # mesh axis splitting the experts (all-to-all), if any
  tensor_axis: str | None  # mesh axis splitting the expert hidden units, if any

  @property
  def token_shards(self) -> int:
    return math.prod(int(self.mesh.shape[a]) for a in self.token_axes)

  @property
  def expert_shards(self) -> int:
    return int(self.mesh.shape[self.expert_axis]) if self.expert_axis else 1


def current_mesh(mesh=None):
  """The explicit mesh if given, else the current abstract mesh, else None."""
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract is None or abstract.empty else abstract


def make_plan(mesh) -> ExpertParallelPlan | None:
  """The split plan for `mesh`, or None when the local path should run."""
  if mesh is None:
    return None
  sizes = dict(mesh.shape)
  token_axes = tuple(a for a in TOKEN_AXES if sizes.get(a, 1) > 1)
  expert_axis = EXPERT_AXIS if sizes.get(EXPERT_AXIS, 1) > 1 else None
  tensor_axis = TENSOR_AXIS if sizes.get(TENSOR_AXIS, 1) > 1 else None
  if not token_axes and tensor_axis is None:
    return None
  return ExpertParallelPlan(mesh, token_axes, expert_axis, tensor_axis)


# ----------------------------------------------------------------------------- per-device expert steps


def _sum_over_tensor(y, plan):
  return y if plan is None or plan.tensor_axis is None else jax.lax.psum(y, plan.tensor_axis)


def local_buffer_fn(weights, plan=None):
  """Slot buffer [G, E, C, D] through the (local) experts; sums the tensor split."""
  return lambda buffer: _sum_over_tensor(moe_dispatch.expert_buffer_swiglu(buffer, *weights), plan)


def expert_parallel_buffer_fn(weights, plan: ExpertParallelPlan):
  """Slot buffer [G, E, C, D] -> all-to-all -> local experts [E/n] -> all-to-all back."""
  shards, axis = plan.expert_shards, plan.expert_axis

  def buffer_fn(buffer):
    groups, num_experts, capacity, dim = buffer.shape
    per_shard = buffer.reshape(groups, shards, num_experts // shards, capacity, dim).swapaxes(0, 1)
    received = jax.lax.all_to_all(per_shard, axis, 0, 0, tiled=True)  # [src shard, G, E/n, C, D]
    out = _sum_over_tensor(moe_dispatch.expert_buffer_swiglu(received, *weights), plan)
    back = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)  # [expert shard, G, E/n, C, D]
    return back.swapaxes(0, 1).reshape(groups, num_experts, capacity, dim)

  return buffer_fn


def local_rows_fn(weights, dispatch: str, grouped_options: dict, plan=None):
  """Sorted rows through the grouped SwiGLU of the (local) experts; sums the tensor split.

  grouped_options: keyword arguments of the dispatch's grouped SwiGLU (dropless_gather:
  block_size and schedule).
  """
  options = {k: v for k, v in grouped_options.items() if k not in EP_OPTIONS}
  grouped = functools.partial(_GROUPED[dispatch], **options)
  return lambda x_sorted, sizes: _sum_over_tensor(grouped(x_sorted, sizes, *weights), plan)


def receive_buffer_rows(num_rows: int, shards: int, buffer_factor: float | None) -> int:
  """Rows per destination shard of the dropless all-to-all: ceil(factor * num_rows / shards),
  between 1 and num_rows (the worst case: every row to one shard; None = the worst case)."""
  if buffer_factor is None:
    return num_rows
  return max(1, min(num_rows, math.ceil(buffer_factor * num_rows / shards)))


def expert_parallel_rows_fn(weights, dispatch: str, grouped_options: dict, plan: ExpertParallelPlan):
  """Rows sorted by (global) expert -> their expert shards -> grouped SwiGLU -> back, in place.

  The returned rows_fn gives (y_sorted [M, D], kept [M]): each destination shard receives at most
  `receive_buffer_rows` rows per source (grouped_options["ep_buffer_factor"]; absent: the worst
  case); a source's rows past that for one destination (its highest experts' last rows) are
  dropped, with output 0 and kept False.
  """
  shards, axis = plan.expert_shards, plan.expert_axis
  local = local_rows_fn(weights, dispatch, grouped_options, plan)
  factor = grouped_options.get("ep_buffer_factor")

  def rows_fn(x_sorted, group_sizes):
    num_rows, dim = x_sorted.shape
    buffer_rows = receive_buffer_rows(num_rows, shards, factor)
    experts_per_shard = group_sizes.shape[0] // shards
    sizes = group_sizes.reshape(shards, experts_per_shard)
    dest_counts = sizes.sum(1)
    dest_start = jnp.cumsum(dest_counts) - dest_counts
    slot = jnp.arange(buffer_rows)
    # Destination d gets rows dest_start[d] + slot for slot < dest_counts[d]; the rest is zero padding.
    source_row = jnp.minimum(dest_start[:, None] + slot[None, :], num_rows - 1)
    is_row = slot[None, :] < dest_counts[:, None]
    send = jnp.where(is_row[..., None], x_sorted[source_row], 0)  # [dest shard, R, D]
    received = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [src shard, R, D]
    # Rows per expert that fit: the first R rows of each destination, in expert order.
    ends = jnp.cumsum(sizes, axis=1)
    sent_sizes = jnp.clip(jnp.minimum(ends, buffer_rows) - (ends - sizes), 0)
    received_counts = jax.lax.all_to_all(sent_sizes, axis, 0, 0, tiled=True)  # [src shard, E/n]
    # Each source's rows are sorted by expert; merge the sources into one local expert order.
    local_expert = jax.vmap(lambda ends: jnp.searchsorted(ends, slot, side="right"))(
        jnp.cumsum(received_counts, axis=1))  # [src, R]; E/n marks padding
    order = jnp.argsort(local_expert.reshape(-1), stable=True)
    y_local = local(received.reshape(-1, dim)[order], received_counts.sum(0).astype(jnp.int32))
    y_received = y_local[moe_dispatch.inverse_permutation(order)].reshape(shards, buffer_rows, dim)
    back = jax.lax.all_to_all(y_received, axis, 0, 0, tiled=True)  # [dest shard, R, D]
    row = jnp.arange(num_rows)
    dest = jnp.minimum(jnp.searchsorted(jnp.cumsum(dest_counts), row, side="right"), shards - 1)
    position = row - dest_start[dest]
    kept = (position < buffer_rows) & (row < dest_counts.sum())
    y = back[dest, jnp.minimum(position, buffer_rows - 1)]
    return jnp.where(kept[:, None], y, 0), kept

  return rows_fn


# ----------------------------------------------------------------------------- sharded entry points


def _weight_specs(plan: ExpertParallelPlan):
  e, t = plan.expert_axis, plan.tensor_axis
  return (P(e, None, t), P(e, None, t), P(e, t, None))


def _to_specs(arrays, specs, plan):
  """On a mesh with Explicit axes shard_map needs inputs already laid out as in_specs; reshard them.

  On Auto axes shard_map reshards by itself (XLA slices or gathers as needed).
  """
  explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(plan.mesh, "axis_types", ()))
  if not explicit:
    return arrays
  return tuple(jax.sharding.reshard(a, spec) for a, spec in zip(arrays, specs))


def _check_tokens(num, plan, what):
  if num % plan.token_shards:
    raise ValueError(f"expert-parallel MoE: {num} {what} do not split over the mesh axes "
                     f"{plan.token_axes} (product {plan.token_shards}); use a batch divisible by it")


def sharded_token_choice(x, expert_index, gates, weights, *, plan: ExpertParallelPlan, num_experts: int,
                         dispatch: str, grouped_options: dict, group_size: int, capacity: int, valid=None):
  """Token-choice dispatch of x [N, D] under `plan`: returns y [N, D] and kept [N, k] (dropless: valid,
  less the pairs an expert-parallel receive buffer had no room for).

  valid [N, k] bool (default all True): pairs with valid False get no slot and no output.
  """
  _check_tokens(x.shape[0], plan, "tokens")
  tokens = P(plan.token_axes or None, None)
  valid = jnp.ones(expert_index.shape, bool) if valid is None else valid

  def local(x, expert_index, gates, valid, *weights):
    if dispatch.startswith("dropless") and plan.expert_axis:
      rows_fn = expert_parallel_rows_fn(weights, dispatch, grouped_options, plan)
      return moe_dispatch.dropless_dispatch_kept(x, expert_index, gates, num_experts, rows_fn, valid)
    if dispatch.startswith("dropless"):
      rows_fn = local_rows_fn(weights, dispatch, grouped_options, plan)
      return moe_dispatch.dropless_dispatch(x, expert_index, gates, num_experts, rows_fn, valid), valid
    make = expert_parallel_buffer_fn if plan.expert_axis else local_buffer_fn
    return moe_dispatch.token_choice_capacity(
        x, expert_index, gates, num_experts, group_size=group_size, capacity=capacity,
        form=dispatch.removeprefix("capacity_"), buffer_fn=make(weights, plan), valid=valid)

  specs = (tokens, tokens, tokens, tokens, *_weight_specs(plan))
  args = _to_specs((x, expert_index, gates, valid, *weights), specs, plan)
  # A pallas_call in interpret mode runs its kernel body as ordinary JAX, whose constants vary over no mesh
  # axis, and fails shard_map's varying-axes check; the Pallas dispatch runs unchecked on every backend, so
  # the path tested on CPU is the one a GPU runs.
  check_vma = dispatch != "dropless_pallas"
  return jax.shard_map(local, mesh=plan.mesh, in_specs=specs, out_specs=(tokens, tokens),
                       check_vma=check_vma)(*args)


def sharded_expert_choice(x, slot_token, slot_gate, weights, *, plan: ExpertParallelPlan, form: str):
  """Expert-choice dispatch under `plan`: x [N, D], slot tables [G, E, C] split over groups."""
  _check_tokens(slot_token.shape[0], plan, "capacity groups")
  tokens, groups = P(plan.token_axes or None, None), P(plan.token_axes or None, None, None)

  def local(x, slot_token, slot_gate, *weights):
    make = expert_parallel_buffer_fn if plan.expert_axis else local_buffer_fn
    return moe_dispatch.expert_choice_dispatch(x, slot_token, slot_gate, form=form,
                                               buffer_fn=make(weights, plan))

  specs = (tokens, groups, groups, *_weight_specs(plan))
  args = _to_specs((x, slot_token, slot_gate, *weights), specs, plan)
  return jax.shard_map(local, mesh=plan.mesh, in_specs=specs, out_specs=tokens)(*args)


def local_token_choice(x, expert_index, gates, weights, *, num_experts: int, dispatch: str,
                       grouped_options: dict, group_size: int, capacity: int, valid=None):
  """The same dispatch on one device (no mesh): y [N, D], kept [N, k] (valid as in sharded_token_choice)."""
  valid = jnp.ones(expert_index.shape, bool) if valid is None else valid
  if dispatch.startswith("dropless"):
    rows_fn = local_rows_fn(weights, dispatch, grouped_options)
    return moe_dispatch.dropless_dispatch(x, expert_index, gates, num_experts, rows_fn, valid), valid
  return moe_dispatch.token_choice_capacity(
      x, expert_index, gates, num_experts, group_size=group_size, capacity=capacity,
      form=dispatch.removeprefix("capacity_"), buffer_fn=local_buffer_fn(weights), valid=valid)


def local_expert_choice(x, slot_token, slot_gate, weights, *, form: str):
  return moe_dispatch.expert_choice_dispatch(x, slot_token, slot_gate, form=form,
                                             buffer_fn=local_buffer_fn(weights))

