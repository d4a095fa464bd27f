"""Logical axis names -> mesh axes: one rules table for parameters, activations and batches."""

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# Logical name -> mesh axis (or tuple of axes). Names missing here are replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "experts": "expert",
    "head_dim": None,
}


def logical_to_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh,
                    rules: dict | None = None) -> PartitionSpec:
  """PartitionSpec for an array with the given logical axes.

  A dimension stays replicated when its mesh axes are already used by an earlier dimension or do not divide
  its size (e.g. 2 kv heads on a tensor axis of 4), so every rule is safe on every mesh.
  """
  rules = LOGICAL_RULES if rules is None else rules
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    target = rules.get(name) if name else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(axis for axis in axes if axis not in used and mesh.shape[axis] > 1)
    ways = 1
    for axis in axes:
      ways *= mesh.shape[axis]
    if not axes or size % ways:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
  """NamedSharding per variable of an (abstract) nnx.State, from each variable's `logical_axes` metadata."""

  def sharding_of(variable):
    logical_axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
    return variable.replace(NamedSharding(mesh, logical_to_spec(tuple(logical_axes), variable.shape, mesh)))

  return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a [B, T] batch: rows over data and fsdp."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
