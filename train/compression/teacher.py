"""The frozen teacher of a distillation run: checked before any work, restored under the student's mesh."""

import dataclasses
import json
import os

import jax
from flax import nnx

from sparseformer.train import checkpoint as checkpoint_lib
from sparseformer.train import optimizer as optimizer_lib
from sparseformer.train import overrides
from sparseformer.train import state as state_lib
from sparseformer.train.compression.distill_config import DistillConfig


@dataclasses.dataclass(frozen=True)
class Distillation:
  """The static half of distillation that the jitted train step closes over (the teacher's arrays are an
  argument of the step, never a constant baked into it)."""

  config: DistillConfig
  graphdef: nnx.GraphDef  # the teacher's
  layer_pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer) of the hidden loss; () when off


@dataclasses.dataclass
class Teacher:
  """A teacher run restored for distillation: graph, frozen variables (params, extra) and their shardings."""

  config: "RunConfig"  # the teacher's own RunConfig (from its workdir's config.json)  # noqa: F821
  workdir: str
  step: int  # the checkpoint's step
  graphdef: nnx.GraphDef
  variables: tuple  # (params, extra): an argument of the jitted step, never in the optimizer state
  shardings: tuple  # NamedShardings of `variables`
  layer_pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer) of the hidden loss; () when off

  def distillation(self, config: DistillConfig) -> Distillation:
    return Distillation(config, self.graphdef, self.layer_pairs)


def check_teacher(config) -> tuple:
  """(teacher RunConfig, latest step, layer pairs) of `config.train.distill.teacher`, or ValueError naming the
  field and the fix: no such run, another vocabulary, no checkpoint, a layer map that does not fit."""
  distill = config.train.distill
  workdir = os.path.abspath(os.path.expanduser(distill.teacher))
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"train.distill.teacher={distill.teacher!r}: {path} not found; point it at the workdir of "
                     "a trained run.")
  with open(path, encoding="utf-8") as file:
    teacher_config = overrides.from_dict(type(config), json.load(file))
  student_vocab, teacher_vocab = config.model.vocab_size, teacher_config.model.vocab_size
  if student_vocab != teacher_vocab:
    raise ValueError(f"train.distill.teacher={distill.teacher!r} has model.vocab_size={teacher_vocab} but the "
                     f"student has model.vocab_size={student_vocab}; distillation needs one vocabulary.")
  if teacher_config.model.max_seq_len < config.data.seq_len:
    raise ValueError(f"train.distill.teacher={distill.teacher!r} has model.max_seq_len="
                     f"{teacher_config.model.max_seq_len}, below the student's data.seq_len={config.data.seq_len}; "
                     "lower data.seq_len or use a teacher trained for longer sequences.")
  checkpoints = os.path.join(workdir, "checkpoints")
  steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()] if os.path.isdir(checkpoints) else []
  if not steps:
    raise ValueError(f"train.distill.teacher={distill.teacher!r} holds no checkpoint in {checkpoints}; train the "
                     "teacher first.")
  layer_pairs = ()
  if distill.hidden_weight > 0:
    student_width, teacher_width = config.model.d_model, teacher_config.model.d_model
    if student_width != teacher_width:
      raise ValueError(f"train.distill.hidden_weight > 0 compares hidden states, but the student's model.d_model="
                       f"{student_width} differs from the teacher's {teacher_width}; use equal widths or set "
                       "train.distill.hidden_weight=0.")
    layer_pairs = distill.resolved_layer_map(config.model.num_layers, teacher_config.model.num_layers)
  return teacher_config, max(steps), layer_pairs


def load_teacher(config, mesh: jax.sharding.Mesh) -> Teacher:
  """Restores the teacher's newest checkpoint onto `mesh` with the teacher's own shardings; drops its optimizer
  state. Nothing is written to the teacher's workdir."""
  teacher_config, _, layer_pairs = check_teacher(config)
  workdir = os.path.abspath(os.path.expanduser(config.train.distill.teacher))
  if "moe" in teacher_config.model.ffn_pattern:
    teacher_config.model.moe.validate_mesh(dict(mesh.shape))
  optimizer = lambda params: optimizer_lib.build_optimizer(teacher_config.train, params,  # noqa: E731
                                                           teacher_config.model)
  with jax.set_mesh(mesh):
    setup = state_lib.setup_model(teacher_config.model, optimizer, mesh, teacher_config.train.seed)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=1_000_000, async_save=False)
    try:
      step = checkpointer.latest_step()
      state, _ = checkpointer.restore(step, setup.abstract_state)
    finally:
      checkpointer.close()
  shardings = (setup.state_shardings.params, setup.state_shardings.extra)
  return Teacher(teacher_config, workdir, int(step), setup.graphdef, (state.params, state.extra), shardings,
                 layer_pairs)


def teacher_forward(graphdef: nnx.GraphDef, variables: tuple, inputs: jax.Array, *, hidden: bool):
  """(logits [B, T, V], hidden states or None) of the frozen teacher in eval mode (no router jitter); its
  variables pass through stop_gradient and any state it writes (MoE load) is dropped."""
  params, extra = jax.lax.stop_gradient(variables)
  model = nnx.merge(graphdef, params, extra, copy=True)
  model.eval()
  if hidden:
    logits, _, states = model(inputs, return_hidden=True)
    return jax.lax.stop_gradient(logits), [jax.lax.stop_gradient(h) for h in states]
  logits, _ = model(inputs)
  return jax.lax.stop_gradient(logits), None
