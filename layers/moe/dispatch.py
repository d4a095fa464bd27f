"""Dispatch of tokens to experts and combination of their outputs (one device's share).

Two families, both written for the tokens held by one device (the expert-parallel
wrappers in moe_parallel.py swap in the cross-device expert step):

- dropless (`dropless_dispatch`): the N*k (token, expert) pairs (the valid ones) are sorted by
  expert, gathered into rows, run through a grouped SwiGLU `rows_fn(x_sorted,
  group_sizes)` (grouped.py, or `grouped_swiglu_pallas` here), un-sorted and summed with their
  gates. `dropless_dispatch_kept` is the same for a rows_fn that may drop rows (expert-parallel
  receive buffers, parallel.py) and returns which pairs were kept.
- capacity (`token_choice_capacity`, `expert_choice_dispatch`): tokens are split
  into groups of S tokens; each expert has C slots per group. A slot table
  (`slot_token` [G, E, C], S = empty) says which token fills each slot; the
  filled buffer [G, E, C, D] goes through `buffer_fn` (by default every expert's
  SwiGLU on its slots) and is scattered back with the slot gates. Token-choice
  fills slots in token order (token t's picks before token t+1's), so whether a
  token is dropped depends only on earlier tokens of its group: causal.
  `form` = "scatter" builds and reads the buffer by index gather / scatter-add,
  "einsum" by the one-hot dispatch tensor [G, S, E, C] (GShard; kept for TPU parity).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sparseformer.kernels.grouped_matmul import gmm

RowsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_sorted [M, D], group_sizes [E]) -> [M, D]
BufferFn = Callable[[jax.Array], jax.Array]  # [G, E, C, D] -> [G, E, C, D]


def expert_buffer_swiglu(buffer: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                         w_down: jax.Array) -> jax.Array:
  """Each expert's SwiGLU on its slots: buffer [..., E, C, D] -> [..., E, C, D]."""
  gate = jnp.einsum("...ecd,edf->...ecf", buffer, w_gate)
  up = jnp.einsum("...ecd,edf->...ecf", buffer, w_up)
  return jnp.einsum("...ecf,efd->...ecd", jax.nn.silu(gate) * up, w_down)


def _combine_pairs(y_pairs: jax.Array, gates: jax.Array, dtype) -> jax.Array:
  """sum_k gates[n, k] * y_pairs[n, k, :] in float32: [N, k, D], [N, k] -> [N, D]."""
  return jnp.einsum("nkd,nk->nd", y_pairs.astype(jnp.float32), gates.astype(jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------- dropless


def sort_by_expert(expert_index: jax.Array, num_experts: int, valid: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Stable sort of the flattened (token, pick) pairs by expert.

  expert_index [N, k] -> order [N*k] (pair id at each sorted position) and
  group_sizes [E] int32 (pairs per expert). Pairs with `valid` [N, k] False sort
  last and are in no group: padding rows of the grouped SwiGLU.
  """
  flat = expert_index.reshape(-1)
  if valid is not None:
    flat = jnp.where(valid.reshape(-1), flat, num_experts)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  return order, group_sizes


def inverse_permutation(order: jax.Array) -> jax.Array:
  """inverse[order[i]] = i, so that sorted[inverse] restores the original order."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def dropless_dispatch(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int,
                      rows_fn: RowsFn, valid: jax.Array | None = None) -> jax.Array:
  """Every valid pair computed: x [N, D], expert_index / gates / valid [N, k] -> y [N, D] in x's dtype.

  Pairs with `valid` False are left out (padding rows, output 0).
  """
  keep_all = lambda x_sorted, sizes: (rows_fn(x_sorted, sizes), None)
  return dropless_dispatch_kept(x, expert_index, gates, num_experts, keep_all, valid)[0]


def dropless_dispatch_kept(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int,
                           rows_fn: Callable, valid: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array | None]:
  """`dropless_dispatch` for a rows_fn returning (y_sorted [M, D], row_kept [M] bool or None).

  Returns y [N, D] and kept [N, k] (valid and not dropped by rows_fn; None when row_kept is None).
  A dropped row's output must be 0.
  """
  num_tokens, k = expert_index.shape
  order, group_sizes = sort_by_expert(expert_index, num_experts, valid)
  x_sorted = x[order // k]  # [N*k, D]
  y_sorted, row_kept = rows_fn(x_sorted, group_sizes)
  inverse = inverse_permutation(order)
  y_pairs = y_sorted[inverse].reshape(num_tokens, k, -1)
  kept = None
  if row_kept is not None:
    kept = row_kept[inverse].reshape(num_tokens, k)
    kept = kept if valid is None else kept & valid
  return _combine_pairs(y_pairs, gates, x.dtype), kept


def grouped_swiglu_pallas(x_sorted: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                          w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """The grouped SwiGLU (grouped.py's contract) through the Pallas grouped matmul `gmm`.

  Gate and up projections run as one gmm over [E, D, 2F]; rows past sum(group_sizes) come out
  of gmm as zeros, so silu(0) * 0 keeps them zero. Interpret mode on the CPU backend.
  """
  hidden = w_gate.shape[-1]
  gate_up = gmm(x_sorted, jnp.concatenate([w_gate, w_up], axis=-1), group_sizes)
  act = jax.nn.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
  return gmm(act, w_down, group_sizes)


# ----------------------------------------------------------------------------- capacity


def capacity_slots(expert_index: jax.Array, num_experts: int, capacity: int, valid: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Token-choice slot assignment with dropping.

  expert_index [G, S, k] -> slot_pair [G, E, C] int32 (index t*k + j of the
  pair filling the slot, S*k when empty) and kept [G, S, k] bool. Pairs take
  slots in token-major order; a pair whose expert already has C pairs is dropped.
  A pair with `valid` [G, S, k] False takes no slot (and is not kept).
  """
  groups, group_size, k = expert_index.shape
  num_pairs = group_size * k
  valid = jnp.ones(expert_index.shape, bool) if valid is None else valid

  def one_group(flat, flat_valid):  # [S*k] -> slot_pair [E*C], kept [S*k]
    flat = jnp.where(flat_valid, flat, num_experts)  # invalid pairs queue at a phantom expert E
    order = jnp.argsort(flat, stable=True)
    sorted_expert = flat[order]
    counts = jnp.bincount(flat, length=num_experts + 1)
    rank = jnp.arange(num_pairs) - (jnp.cumsum(counts) - counts)[sorted_expert]
    position = jnp.zeros_like(rank).at[order].set(rank)
    kept = flat_valid & (position < capacity)
    slot = jnp.where(kept, flat * capacity + position, num_experts * capacity)  # last = trash
    slot_pair = jnp.full((num_experts * capacity + 1,), num_pairs, jnp.int32)
    slot_pair = slot_pair.at[slot].set(jnp.arange(num_pairs, dtype=jnp.int32), mode="drop")
    return slot_pair[:-1], kept

  slot_pair, kept = jax.vmap(one_group)(expert_index.reshape(groups, num_pairs), valid.reshape(groups, num_pairs))
  return slot_pair.reshape(groups, num_experts, capacity), kept.reshape(groups, group_size, k)


def slot_dispatch(x: jax.Array, slot_token: jax.Array, form: str) -> jax.Array:
  """Fills expert slots: x [G, S, D], slot_token [G, E, C] (S = empty) -> buffer [G, E, C, D]."""
  groups, group_size, dim = x.shape
  if form == "einsum":
    dispatch = jax.nn.one_hot(slot_token, group_size, dtype=x.dtype)  # [G, E, C, S]; empty -> 0
    return jnp.einsum("gecs,gsd->gecd", dispatch, x)
  x_padded = jnp.concatenate([x, jnp.zeros((groups, 1, dim), x.dtype)], axis=1)
  return jax.vmap(lambda xg, tg: xg[tg])(x_padded, slot_token)


def slot_combine(out: jax.Array, slot_token: jax.Array, slot_gate: jax.Array, group_size: int,
                 form: str) -> jax.Array:
  """sum over slots of gate * out back onto tokens: out [G, E, C, D] -> [G, S, D] (float32)."""
  weighted = out.astype(jnp.float32) * slot_gate[..., None].astype(jnp.float32)
  if form == "einsum":
    combine = jax.nn.one_hot(slot_token, group_size, dtype=jnp.float32)  # [G, E, C, S]
    return jnp.einsum("gecs,gecd->gsd", combine, weighted)
  groups, _, _, dim = out.shape
  add = lambda wg, tg: jnp.zeros((group_size + 1, dim), jnp.float32).at[tg].add(wg)
  return jax.vmap(add)(weighted.reshape(groups, -1, dim), slot_token.reshape(groups, -1))[:, :group_size]


def _groups(num_tokens: int, group_size: int) -> int:
  if num_tokens % group_size:
    raise ValueError(f"capacity dispatch: {num_tokens} tokens do not split into groups of "
                     f"{group_size}; make MoEConfig.capacity_group_size divide the tokens per device")
  return num_tokens // group_size


def token_choice_capacity(x: jax.Array, expert_index: jax.Array, gates: jax.Array, num_experts: int,
                          *, group_size: int, capacity: int, form: str, buffer_fn: BufferFn,
                          valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Capacity-limited token choice: x [N, D], expert_index / gates / valid [N, k] -> y [N, D], kept [N, k].

  Pairs with `valid` False (filler picks) take no slot and are not kept.
  """
  num_tokens, k = expert_index.shape
  groups = _groups(num_tokens, group_size)
  valid_groups = None if valid is None else valid.reshape(groups, group_size, k)
  slot_pair, kept = capacity_slots(expert_index.reshape(groups, group_size, k), num_experts, capacity, valid_groups)
  gates_padded = jnp.pad(gates.reshape(groups, group_size * k), ((0, 0), (0, 1)))  # empty slot -> 0
  slot_gate = jax.vmap(lambda gg, pg: gg[pg])(gates_padded, slot_pair)
  slot_token = slot_pair // k  # empty (S*k) -> S
  x_groups = x.reshape(groups, group_size, -1)
  out = buffer_fn(slot_dispatch(x_groups, slot_token, form))
  y = slot_combine(out, slot_token, slot_gate, group_size, form)
  return y.reshape(num_tokens, -1).astype(x.dtype), kept.reshape(num_tokens, k)


def expert_choice_dispatch(x: jax.Array, slot_token: jax.Array, slot_gate: jax.Array, *, form: str,
                           buffer_fn: BufferFn) -> jax.Array:
  """Expert choice: x [N, D], slot_token / slot_gate [G, E, C] (positions within groups) -> y [N, D]."""
  num_tokens = x.shape[0]
  groups = slot_token.shape[0]
  group_size = num_tokens // groups
  x_groups = x.reshape(groups, group_size, -1)
  out = buffer_fn(slot_dispatch(x_groups, slot_token, form))
  y = slot_combine(out, slot_token, slot_gate, group_size, form)
  return y.reshape(num_tokens, -1).astype(x.dtype)
