"""TrainState and its sharded creation under a mesh."""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree, checkpointed as a whole."""

  step: jax.Array  # int32 scalar: optimizer steps taken
  params: nnx.State  # trained variables (nnx.Param)
  opt_state: Any  # optax state, mirroring params
  extra: nnx.State  # non-trained variables (e.g. MoE router bias and load), updated outside the optimizer


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """The static pieces that go with a TrainState."""

  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  state_shardings: TrainState  # NamedSharding per leaf
  abstract_state: TrainState  # ShapeDtypeStruct per leaf, with shardings


def abstract_model(config: ModelConfig, seed: int = 0):
  """(graphdef, abstract params, abstract extra) without allocating anything."""
  model = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(seed)))
  return nnx.split(model, nnx.Param, ...)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedSharding per leaf: variables by their logical axes, anything else (step, counters) replicated."""

  def sharding_of(leaf):
    if isinstance(leaf, nnx.Variable):
      axes = leaf.get_metadata().get("logical_axes") or (None,) * len(leaf.shape)
      spec = sharding_lib.logical_to_spec(tuple(axes), leaf.shape, mesh)
      return leaf.replace(jax.sharding.NamedSharding(mesh, spec))
    return sharding_lib.replicated(mesh)

  return jax.tree.map(sharding_of, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def setup_model(config: ModelConfig, build_optimizer, mesh: jax.sharding.Mesh, seed: int) -> ModelSetup:
  """Builds the graph, optimizer and the sharding of every TrainState leaf, all abstractly."""
  graphdef, params, extra = abstract_model(config, seed)
  optimizer = build_optimizer(params)

  def init_abstract():
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), extra=extra)

  abstract = jax.eval_shape(init_abstract)  # Variable metadata (logical axes) survives into mu / nu
  shardings = tree_shardings(abstract, mesh)
  abstract_with_shardings = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                         abstract, shardings)
  return ModelSetup(graphdef=graphdef, optimizer=optimizer, state_shardings=shardings,
                    abstract_state=abstract_with_shardings)


def init_train_state(config: ModelConfig, setup: ModelSetup, seed: int) -> TrainState:
  """Initialises the parameters directly in their shards (no full copy on any one device)."""

  def init():
    model = DecoderLM(config, rngs=nnx.Rngs(seed))
    _, params, extra = nnx.split(model, nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.optimizer.init(params),
                      extra=extra)

  return jax.jit(init, out_shardings=setup.state_shardings)()
