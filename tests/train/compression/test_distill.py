"""train/compression/distill.py (+ distill_config.py, teacher.py): losses against NumPy, config and teacher
errors, the distillation term in the train step (exact under accumulation) and a tiny distillation run."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.models.config import ModelConfig
from sparseformer.train import optimizer as optimizer_lib
from sparseformer.train import overrides
from sparseformer.train import state as state_lib
from sparseformer.train import step as step_lib
from sparseformer.train import trainer
from sparseformer.train.compression import distill
from sparseformer.train.compression import teacher as teacher_lib
from sparseformer.train.compression.distill_config import DistillConfig


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_divergence(student, teacher, kind, temperature):
  """The paper's formulas in float64: p = softmax(teacher / T), q = softmax(student / T)."""
  log_q, log_p = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
  p, q = np.exp(log_p), np.exp(log_q)
  if kind == "forward_kl":
    return (p * (log_p - log_q)).sum(-1)
  if kind == "reverse_kl":
    return (q * (log_q - log_p)).sum(-1)
  m = (p + q) / 2
  return 0.5 * (p * (log_p - np.log(m))).sum(-1) + 0.5 * (q * (log_q - np.log(m))).sum(-1)


def _close(got, want, tol=2e-5):
  got = np.asarray(got, np.float64)
  assert not np.isnan(got).any()
  error = np.max(np.abs(got - want) / (np.abs(want) + 1e-3))
  assert error < tol, error


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_soft_loss_matches_numpy_with_temperature_and_mask(kind, seed):
  rng = np.random.default_rng(seed)
  student, teacher = rng.normal(size=(2, 2, 5, 11)) * 3
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  config = DistillConfig(teacher="t", loss=kind, temperature=2.5, alpha=0.7)
  want = 2.5**2 * _np_divergence(student, teacher, kind, 2.5)
  _close(distill.soft_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), config), want)
  sums = distill.distill_sums(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                              jnp.asarray(mask), config)
  _close(sums["soft_sum"], (want * mask).sum())
  _close(sums["kl_sum"], (_np_divergence(student, teacher, "forward_kl", 1.0) * mask).sum())
  assert np.all(want >= 0)
  # Equal distributions: zero divergence; a shift of the logits changes nothing.
  same = distill.divergence(jnp.asarray(student, jnp.float32), jnp.asarray(student + 4.0, jnp.float32), kind=kind,
                            temperature=2.5)
  assert np.max(np.abs(np.asarray(same))) < 1e-5
  # No gradient reaches the teacher's logits.
  grad = jax.grad(lambda t: jnp.sum(distill.soft_loss(jnp.asarray(student, jnp.float32), t, config)))(
      jnp.asarray(teacher, jnp.float32))
  assert np.all(np.asarray(grad) == 0)


def test_hidden_cosine_with_a_layer_map_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  student = [rng.normal(size=(2, 3, 8)) for _ in range(2)]
  teacher = [rng.normal(size=(2, 3, 8)) for _ in range(4)]
  config = DistillConfig(teacher="t", hidden_weight=1.0, layer_map=(3, 1))
  pairs = config.resolved_layer_map(2, 4)
  assert pairs == ((0, 3), (1, 1))
  cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa: E731
  want = ((1 - cos(student[0], teacher[3])) + (1 - cos(student[1], teacher[1]))) / 2
  got = distill.hidden_cosine([jnp.asarray(h, jnp.float32) for h in student],
                              [jnp.asarray(h, jnp.float32) for h in teacher], pairs)
  _close(got, want)
  assert DistillConfig(teacher="t", hidden_weight=1.0).resolved_layer_map(2, 4) == ((0, 1), (1, 3))
  assert DistillConfig(teacher="t", hidden_weight=1.0, layer_map=(-1, 2)).resolved_layer_map(2, 4) == ((1, 2),)


def test_config_errors_name_the_field_and_the_fix():
  with pytest.raises(ValueError, match=r"train.distill.loss='kl' is not one of forward_kl, reverse_kl, jsd"):
    DistillConfig(teacher="t", loss="kl")
  with pytest.raises(ValueError, match=r"train.distill.alpha must lie in \[0, 1\]"):
    DistillConfig(teacher="t", alpha=1.5)
  with pytest.raises(ValueError, match=r"train.distill.temperature must be positive"):
    DistillConfig(teacher="t", temperature=0.0)
  with pytest.raises(ValueError, match=r"train.distill.teacher is empty; set train.distill.teacher=DIR"):
    DistillConfig(alpha=0.9)
  with pytest.raises(ValueError, match=r"layer_map has 3 entries but the student has 2 layers"):
    DistillConfig(teacher="t", hidden_weight=1.0, layer_map=(0, 1, 2)).resolved_layer_map(2, 4)
  with pytest.raises(ValueError, match=r"names teacher layer 4, but the teacher has 4 layers"):
    DistillConfig(teacher="t", hidden_weight=1.0, layer_map=(0, 4)).resolved_layer_map(2, 4)


def _with_distill(config, teacher_dir, **changes):
  return dataclasses.replace(config, train=dataclasses.replace(
      config.train, distill=DistillConfig(teacher=str(teacher_dir), **changes)))


def _write_run_config(directory, config):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as file:
    json.dump(overrides.to_dict(config), file)


def test_teacher_errors_before_any_work(tmp_path, tiny_config):
  student = tiny_config()
  with pytest.raises(ValueError, match=r"train.distill.teacher=.*config.json not found"):
    trainer.train(_with_distill(student, tmp_path / "nowhere"), str(tmp_path / "a"))
  other_vocab = dataclasses.replace(student, model=dataclasses.replace(student.model, vocab_size=300))
  _write_run_config(tmp_path / "vocab", other_vocab)
  with pytest.raises(ValueError, match=r"has model.vocab_size=300 but the student has model.vocab_size=259"):
    trainer.train(_with_distill(student, tmp_path / "vocab"), str(tmp_path / "b"))
  short = dataclasses.replace(student, model=dataclasses.replace(student.model, max_seq_len=32),
                              data=dataclasses.replace(student.data, seq_len=32))
  _write_run_config(tmp_path / "short", short)
  with pytest.raises(ValueError, match=r"has model.max_seq_len=32, below the student's data.seq_len=64"):
    trainer.train(_with_distill(student, tmp_path / "short"), str(tmp_path / "e"))
  _write_run_config(tmp_path / "untrained", student)
  with pytest.raises(ValueError, match=r"holds no checkpoint in .*; train the teacher first"):
    trainer.train(_with_distill(student, tmp_path / "untrained"), str(tmp_path / "c"))
  wide = dataclasses.replace(student, model=dataclasses.replace(student.model, d_model=128))
  _write_run_config(tmp_path / "wide", wide)
  os.makedirs(tmp_path / "wide" / "checkpoints" / "4")
  with pytest.raises(ValueError, match=r"student's model.d_model=64 differs from the teacher's 128"):
    trainer.train(_with_distill(student, tmp_path / "wide", hidden_weight=1.0), str(tmp_path / "d"))
  assert not any(os.path.exists(tmp_path / name / "config.json") for name in "abcde")  # nothing written


def _setup(model: ModelConfig, seed: int):
  mesh = jax.make_mesh((1, 1, 1, 1), ("data", "fsdp", "tensor", "expert"))
  build = lambda params: optimizer_lib.build_optimizer(optimizer_lib_config(), params, model)  # noqa: E731
  setup = state_lib.setup_model(model, build, mesh, seed)
  return setup, state_lib.init_train_state(model, setup, seed)


def optimizer_lib_config():
  from sparseformer.train.config import TrainConfig  # pylint: disable=import-outside-toplevel
  return TrainConfig(learning_rate=1e-2, warmup_steps=0)


@pytest.mark.slow  # two compiles of the distillation step: ~30 s on a loaded 2-core machine
def test_distill_step_is_exact_under_accumulation_and_matches_the_formula(seed):
  """A 1-layer 32-wide student and a 2-layer 32-wide teacher (hidden loss with a map): the step with 2
  micro-batches equals the step with one, and the objective equals the formula on a NumPy recomputation."""
  student_model = ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, max_seq_len=16)
  teacher_model = dataclasses.replace(student_model, num_layers=2)
  setup, state = _setup(student_model, seed)
  teacher_setup, teacher_state = _setup(teacher_model, seed + 1)
  config = DistillConfig(teacher="t", alpha=0.6, temperature=2.0, loss="jsd", hidden_weight=0.5, layer_map=(1,))
  distillation = teacher_lib.Distillation(config, teacher_setup.graphdef, config.resolved_layer_map(1, 2))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 259, size=(4, 17))
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
           "loss_mask": jnp.asarray(rng.random((4, 16)) > 0.4, jnp.float32)}
  teacher_variables = (teacher_state.params, teacher_state.extra)
  outs = {}
  for accum in (1, 2):
    step = jax.jit(step_lib.make_train_step(setup, accum_steps=accum, learning_rate=lambda s: 1e-2,
                                            distill=distillation))
    outs[accum] = step(state, batch, teacher_variables)
  (new1, m1), (new2, m2) = outs[1], outs[2]
  for name in ("total_loss", "loss", "grad_norm", "distill/kl", "distill/soft_loss", "distill/hidden_loss"):
    np.testing.assert_allclose(float(m2[name]), float(m1[name]), rtol=2e-5, err_msg=name)
  del new1, new2  # Adam's first update is ~lr * sign(grad): equal grads are checked through grad_norm
  # The objective against NumPy from the two models' outputs.
  mask = np.asarray(batch["loss_mask"])
  student_logits, _, student_hidden = nnx.merge(setup.graphdef, state.params, state.extra)(batch["inputs"],
                                                                                          return_hidden=True)
  teacher_net = nnx.merge(teacher_setup.graphdef, *teacher_variables)
  teacher_net.eval()
  teacher_logits, _, teacher_hidden = teacher_net(batch["inputs"], return_hidden=True)
  s, t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)
  nll = -np.take_along_axis(_log_softmax(s), tokens[:, 1:, None], -1)[..., 0]
  soft = 4.0 * _np_divergence(s, t, "jsd", 2.0)
  hs, ht = np.asarray(student_hidden[0], np.float64), np.asarray(teacher_hidden[1], np.float64)
  hidden = 1 - (hs * ht).sum(-1) / np.linalg.norm(hs, axis=-1) / np.linalg.norm(ht, axis=-1)
  want = ((0.4 * nll + 0.6 * soft + 0.5 * hidden) * mask).sum() / mask.sum()
  _close(float(m1["total_loss"]), want, tol=1e-4)
  _close(float(m1["distill/hard_loss"]), (nll * mask).sum() / mask.sum(), tol=1e-4)




def test_a_tiny_distillation_run_trains_and_leaves_the_teacher_unchanged(tmp_path, tiny_config, tree_digest):
  """The teacher (another depth and head count, saved untrained to spare a compile) is read, never written; the
  student's metrics.jsonl holds the distill/* and energy lines."""
  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  base = tiny_config(steps=2, log_every=1)
  base = dataclasses.replace(base, model=dataclasses.replace(base.model, num_layers=1))
  teacher_config = dataclasses.replace(base, model=dataclasses.replace(base.model, num_layers=2, num_heads=2,
                                                                         num_kv_heads=1))
  _write_run_config(teacher_dir, teacher_config)
  teacher_run = trainer.open_run(teacher_config, teacher_dir)
  teacher_run.checkpointer.save(0, teacher_run.state, {}, wait=True)
  teacher_run.checkpointer.close()
  before = tree_digest(teacher_dir)
  summary = trainer.train(_with_distill(base, teacher_dir, alpha=0.5, temperature=2.0), student_dir)
  assert tree_digest(teacher_dir) == before
  records = [json.loads(line) for line in open(os.path.join(student_dir, "metrics.jsonl"), encoding="utf-8")]
  teacher_eval = [r for r in records if "distill/teacher_eval/loss" in r]
  assert len(teacher_eval) == 1  # an untrained teacher: about ln(259) = 5.56 nats
  assert abs(teacher_eval[0]["distill/teacher_eval/loss"] - np.log(259)) < 0.5
  train_lines = [r for r in records if "train/loss" in r]
  assert len(train_lines) == 2
  for r in train_lines:
    assert r["train/distill/hard_loss"] == pytest.approx(r["train/loss"])
    assert r["train/distill/kl"] >= 0 and r["train/distill/soft_loss"] >= 0
    assert r["train/total_loss"] == pytest.approx(0.5 * r["train/loss"] + 0.5 * r["train/distill/soft_loss"],
                                                  rel=1e-5)
    assert r["train/energy/method"] in ("measured:rapl", "estimated:tdp")
  final = [r for r in records if "energy/joules" in r]
  assert len(final) == 1 and final[0]["step"] == 2
  assert set(final[0]) >= {"energy/joules", "energy/kwh", "energy/facility_kwh", "energy/co2e_g", "energy/method",
                           "energy/joules_per_token"}
  assert final[0]["energy/joules"] > 0 and final[0]["energy/joules"] >= train_lines[-1]["train/energy/joules"]
  assert summary["energy/method"] == final[0]["energy/method"] and np.isfinite(summary["loss"])
