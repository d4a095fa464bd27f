"""Device mesh from config: axes data, fsdp, tensor, expert."""

import dataclasses
import math

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; exactly one may be -1, meaning all remaining devices."""

  data: int = 1  # pure data parallelism (parameters replicated)
  fsdp: int = -1  # data parallelism with parameters sharded along `embed` (ZeRO-3 style)
  tensor: int = 1  # tensor parallelism over heads / mlp / vocab
  expert: int = 1  # expert parallelism over MoE experts

  def __post_init__(self):
    sizes = self.sizes()
    if sum(size == -1 for size in sizes) > 1:
      raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    for name, size in zip(MESH_AXES, sizes):
      if size == 0 or size < -1:
        raise ValueError(f"mesh.{name} must be a positive size or -1, got {size}.")

  def sizes(self) -> tuple[int, ...]:
    return tuple(getattr(self, name) for name in MESH_AXES)

  def resolve(self, num_devices: int) -> tuple[int, ...]:
    """Concrete axis sizes for `num_devices`, or a ValueError naming the sizes and the device count."""
    sizes = list(self.sizes())
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} cannot use {num_devices} devices: the fixed axes "
                         f"multiply to {known}, which does not divide {num_devices}. Change the --set mesh.* sizes.")
      sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
      raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices but {num_devices} are available; "
                       "set one axis to -1 or change the --set mesh.* sizes.")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: list | None = None) -> jax.sharding.Mesh:
  """A Mesh over `devices` (default: all devices of all processes) with axes MESH_AXES."""
  devices = jax.devices() if devices is None else devices
  sizes = config.resolve(len(devices))
  # Auto axes: the compiler propagates shardings from the explicit in/out shardings of the jitted step.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == jax.devices():
    return jax.make_mesh(sizes, MESH_AXES, axis_types, devices=devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)
