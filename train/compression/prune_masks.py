"""Pruning masks beside the parameters: stored, loaded, applied after each optimizer step; gradual pruning.

- `sparseformer prune` writes `prune_masks.npz` into its output workdir: one bool keep-mask per pruned
  parameter, named by its path ("blocks/0/attention/wq"). `--set train.prune_masks=DIR` (the workdir or the
  .npz) makes training apply them after every optimizer step (`mask_hook`), so pruned weights stay exactly
  zero through a fine-tune and across resumes (the masks are re-read from disk at every start).
- `train.pruning.*` (`PruningConfig`) prunes during training on Zhu & Gupta's polynomial schedule (2017, "To
  prune, or not to prune", eq. 1): s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3) for t0 <= t <= t1, with
  the masks recomputed from the weight magnitudes (per matrix, per expert) every `every` steps and held in
  between. The masks live in the optimizer state (`with_gradual_pruning`), so checkpoints carry them.

Neither saves compute in JAX: XLA has no sparse matmul, so masked weights are multiplied like any other
(see prune_structured.py for pruning that shrinks the model).
"""

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparseformer.train.compression import prune_scores

MASKS_FILE = "prune_masks.npz"
GRADUAL_METHODS = ("none", "magnitude")


@dataclasses.dataclass(frozen=True)
class PruningConfig:
  """Gradual magnitude pruning during training (Zhu & Gupta 2017); off unless method="magnitude"."""

  method: str = "none"  # none | magnitude (per matrix / per expert, on the projection weights)
  target_sparsity: float = 0.5  # s_f, the share of each pruned matrix that is zero from end_step on
  start_step: int = 0  # t0: first step whose update prunes (sparsity 0 there, rising after)
  end_step: int = 1000  # t1: the target sparsity is reached here and held after
  every: int = 100  # masks are recomputed every this many steps between start_step and end_step

  def __post_init__(self):
    if self.method not in GRADUAL_METHODS:
      raise ValueError(f"train.pruning.method={self.method!r}: choose one of {GRADUAL_METHODS}.")
    if not 0 < self.target_sparsity < 1:
      raise ValueError(f"train.pruning.target_sparsity={self.target_sparsity} must lie in (0, 1).")
    if self.start_step < 0 or self.end_step <= self.start_step:
      raise ValueError(f"train.pruning needs 0 <= start_step < end_step, got start_step={self.start_step}, "
                       f"end_step={self.end_step}.")
    if self.every < 1:
      raise ValueError(f"train.pruning.every={self.every} must be >= 1.")


def polynomial_sparsity(step, config: PruningConfig):
  """Zhu & Gupta's s_t (initial sparsity 0) at optimizer step `step` (after that many updates), cubic."""
  span = config.end_step - config.start_step
  progress = jnp.clip((step - config.start_step) / span, 0.0, 1.0)
  return config.target_sparsity * (1.0 - (1.0 - progress) ** 3)


# ----------------------------------------------------------------------------- names, storage


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def path_name(path) -> str:
  """'blocks/0/attention/wq' from a pytree path (only its dict keys: optimizer wrappers add attributes)."""
  return "/".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def named_params(params: nnx.State) -> dict:
  """{name: Variable} of an nnx.State of parameters."""
  return {path_name(path): leaf for path, leaf in jax.tree.leaves_with_path(params, is_leaf=_is_variable)}


def masks_path(location: str) -> str:
  """The .npz behind `train.prune_masks` (a workdir written by `sparseformer prune`, or the file itself)."""
  location = os.path.abspath(os.path.expanduser(location))
  return os.path.join(location, MASKS_FILE) if os.path.isdir(location) else location


def save_masks(directory: str, masks: dict[str, np.ndarray]) -> str:
  path = os.path.join(directory, MASKS_FILE)
  np.savez_compressed(path, **{name: np.asarray(mask, bool) for name, mask in masks.items()})
  return path


def load_masks(location: str) -> dict[str, np.ndarray]:
  path = masks_path(location)
  if not os.path.isfile(path):
    raise ValueError(f"train.prune_masks={location!r}: no {MASKS_FILE} there; pass the --out workdir of "
                     "`sparseformer prune` (or its prune_masks.npz).")
  with np.load(path) as data:
    return {name: data[name].astype(bool) for name in data.files}


def check_masks(masks: dict[str, np.ndarray], params: nnx.State, location: str) -> None:
  """Raises ValueError (naming train.prune_masks) unless every mask matches a parameter's shape."""
  shapes = {name: tuple(leaf.shape) for name, leaf in named_params(params).items()}
  for name, mask in masks.items():
    if name not in shapes:
      raise ValueError(f"train.prune_masks={location!r} holds a mask for {name!r}, which this model does not "
                       "have; prune this model's run, or train the model the masks were made for.")
    if tuple(mask.shape) != shapes[name]:
      raise ValueError(f"train.prune_masks={location!r}: the mask of {name} has shape {mask.shape}, the "
                       f"parameter {shapes[name]}; the masks belong to another model config.")


def apply_masks(params: nnx.State, masks: dict) -> nnx.State:
  """params with every masked parameter multiplied by its keep-mask (pruned entries exactly zero)."""

  def apply(path, leaf):
    mask = masks.get(path_name(path))
    return leaf if mask is None else leaf.replace(jnp.where(mask, leaf[...], jnp.zeros((), leaf.dtype)))

  return jax.tree.map_with_path(apply, params, is_leaf=_is_variable)


def mask_hook(masks: dict[str, np.ndarray]):
  """An `after_optimizer_step(model)` that zeroes the pruned weights in place (inside the jitted step)."""
  constants = {name: jnp.asarray(mask) for name, mask in masks.items()}

  def hook(model: nnx.Module) -> None:
    nnx.update(model, apply_masks(nnx.state(model, nnx.Param), constants))

  return hook


def run_masks(config, workdir: str, params: nnx.State, log) -> dict[str, np.ndarray] | None:
  """The masks a training run applies (train.prune_masks), checked against its parameters; None without.

  Warns when `workdir` holds masks that the run was not told to keep.
  """
  location = config.train.prune_masks
  if not location:
    if os.path.isfile(os.path.join(workdir, MASKS_FILE)):
      log(f"Warning: {workdir} holds {MASKS_FILE} but train.prune_masks is empty, so the pruned weights will "
          f"grow back; pass --set train.prune_masks={workdir} to keep them zero.")
    return None
  masks = load_masks(location)
  check_masks(masks, params, location)
  kept = sum(int(mask.sum()) for mask in masks.values())
  total = sum(mask.size for mask in masks.values())
  log(f"Pruning masks from {masks_path(location)}: {len(masks)} weights, {1 - kept / max(total, 1):.1%} zero, "
      "re-applied after every optimizer step.")
  return masks


# ----------------------------------------------------------------------------- gradual pruning


class GradualPruningState(NamedTuple):
  inner: optax.OptState
  count: jax.Array  # optimizer steps taken
  masks: nnx.State  # bool keep-masks mirroring the params (all True for weights that are never pruned)


def magnitude_masks(params: nnx.State, sparsity) -> nnx.State:
  """Keep-masks pruning floor(sparsity * size) smallest |w| of every prunable matrix (per expert)."""

  def mask_of(path, leaf):
    layout = prune_scores.prunable_layout(path_name(path), leaf.ndim)
    if layout is None:
      return leaf.replace(jnp.ones(leaf.shape, bool))
    scores = prune_scores.canonical(jnp.abs(leaf[...]), layout)
    return leaf.replace(prune_scores.per_matrix_mask(scores, sparsity).reshape(leaf.shape))

  return jax.tree.map_with_path(mask_of, params, is_leaf=_is_variable)


def with_gradual_pruning(inner: optax.GradientTransformation, config: PruningConfig
                         ) -> optax.GradientTransformation:
  """`inner` followed by gradual magnitude pruning: after update t (t = 1, 2, ...), where t0 <= t <= t1 and
  (t - t0) % every == 0, the masks are recomputed at sparsity s_t from the updated weights; every update
  leaves the masked weights exactly zero. `inner` itself when config.method == "none"."""
  if config.method == "none":
    return inner

  def init(params):
    masks = jax.tree.map(lambda leaf: leaf.replace(jnp.ones(leaf.shape, bool)), params, is_leaf=_is_variable)
    return GradualPruningState(inner.init(params), jnp.zeros((), jnp.int32), masks)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("train.pruning needs the parameters in the optimizer update.")
    updates, inner_state = inner.update(grads, state.inner, params)
    step = state.count + 1
    new_params = optax.apply_updates(params, updates)
    due = (step >= config.start_step) & (step <= config.end_step) & ((step - config.start_step) % config.every == 0)
    masks = jax.lax.cond(due, lambda: magnitude_masks(new_params, polynomial_sparsity(step, config)),
                         lambda: state.masks)
    # new = where(mask, p + u, 0) exactly: the update of a pruned weight is -p.
    updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
    return updates, GradualPruningState(inner_state, step, masks)

  return optax.GradientTransformation(init, update)
