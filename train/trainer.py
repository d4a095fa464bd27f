"""The training loop, in labelled stages: setup, mesh, data, model, restore, compile, loop, finish."""

import dataclasses
import json
import os
import signal
import sys
import time
import typing
from typing import Callable

import jax
import numpy as np
from flax import nnx

from sparseformer.layers import moe
from sparseformer.models import flops as flops_lib
from sparseformer.train import checkpoint as checkpoint_lib
from sparseformer.train import energy as energy_lib
from sparseformer.train import data as data_lib
from sparseformer.train import generate
from sparseformer.train import metrics as metrics_lib
from sparseformer.train import optimizer as optimizer_lib
from sparseformer.train import overrides
from sparseformer.train import sharding as sharding_lib
from sparseformer.train import state as state_lib
from sparseformer.train import step as step_lib
from sparseformer.train.compression import prune_masks
from sparseformer.train.compression import teacher as teacher_lib
from sparseformer.train.tasks import batches as task_batches
from sparseformer.train.config import RunConfig
from sparseformer.train.mesh import make_mesh

# Fields a resumed run may change; any other difference from the stored config.json is an error.
RESUMABLE_CHANGES = ("name", "train.steps", "train.stop_at_step", "train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.progress_bar", "train.peak_flops", "train.sample_prompt",
                     "train.sample_tokens", "data.num_val_batches", "data.cache_dir", "mesh.",
                     "data.mqar.eval_mixes", "data.passkey.eval_mixes",  # evaluation only
                     "model.attention.dsa.stage",  # DSA warm-up -> sparse switch (DeepSeek-V3.2-Exp's two stages)
                     "train.energy.",  # accounting only
                     "train.quantization.",  # QAT fine-tuning of a float run (same parameters)
                     "train.prune_masks")  # pruning masks are re-read at every start (compression/prune_masks.py)


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN/inf; the state was not updated and the last checkpoint is intact."""


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def load_run_config(workdir: str) -> RunConfig:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be the directory of a training run.")
  with open(path, encoding="utf-8") as file:
    return overrides.from_dict(RunConfig, json.load(file))


def _with_defaults(stored: dict, cls: type) -> dict:
  """`stored` (a config.json dict) with every field it lacks set to its dataclass default, as `from_dict` reads
  it: a run written before a field existed compares equal to a config that leaves the field at its default."""
  filled = dict(stored)
  for field in dataclasses.fields(cls):
    annotation = typing.get_type_hints(cls)[field.name]
    if field.name not in filled:
      default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
      filled[field.name] = json.loads(json.dumps(overrides.to_dict(default) if dataclasses.is_dataclass(default)
                                                 else default))
    elif dataclasses.is_dataclass(annotation) and isinstance(filled[field.name], dict):
      filled[field.name] = _with_defaults(filled[field.name], annotation)
  return filled


def _write_config(workdir: str, config: RunConfig) -> None:
  """Writes config.json, refusing to reuse a workdir that holds a different run (fields missing from an older
  config.json count as their defaults)."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(json.dumps(overrides.to_dict(config)))
  if os.path.exists(path):
    with open(path, encoding="utf-8") as file:
      old = _with_defaults(json.load(file), RunConfig)
    old_flat, new_flat = overrides.flatten_dict(old), overrides.flatten_dict(new)
    changed = sorted(key for key in set(old_flat) | set(new_flat) if old_flat.get(key) != new_flat.get(key)
                     and not key.startswith(RESUMABLE_CHANGES))
    if changed:
      raise ValueError(f"{workdir} holds a run with a different config ({', '.join(changed)}); resume it with "
                       "the same settings or use a new --workdir.")
  if jax.process_index() == 0:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
      json.dump(new, file, indent=2)
    os.replace(temporary, path)


def _check_mesh_fits(config: RunConfig, mesh: jax.sharding.Mesh) -> None:
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  micro_batch = config.data.batch_size // config.train.grad_accum_steps
  if micro_batch % batch_ways:
    raise ValueError(f"The micro-batch (data.batch_size / train.grad_accum_steps = {micro_batch}) must divide "
                     f"over mesh.data x mesh.fsdp = {batch_ways} devices; change data.batch_size or the mesh.")
  if "moe" in config.model.ffn_pattern:
    config.model.moe.validate_mesh(dict(mesh.shape))


class _StopRequest:
  """Turns SIGINT / SIGTERM into a flag the loop checks after each step (then it saves and exits)."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second Ctrl-C aborts at once
      raise KeyboardInterrupt
    self.requested = True
    log(f"\nReceived {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting.")

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


@dataclasses.dataclass
class Run:
  """A model restored or initialised under its mesh, with its jitted steps (shared by train, eval, sample)."""

  config: RunConfig
  workdir: str
  mesh: jax.sharding.Mesh
  setup: state_lib.ModelSetup
  state: state_lib.TrainState
  checkpointer: checkpoint_lib.Checkpointer
  data_state: dict | None
  batch_sharding: jax.sharding.NamedSharding
  eval_step: Callable | None = None  # jitted once, on first use (a fresh jax.jit per call would recompile)

  def model(self) -> nnx.Module:
    return nnx.merge(self.setup.graphdef, self.state.params, self.state.extra)


def open_run(config: RunConfig, workdir: str, *, require_checkpoint: bool = False, devices: list | None = None
             ) -> Run:
  """Stages 1-5: workdir checks, mesh (over `devices`, default all), model + optimizer + shardings, restore or init."""
  workdir = checkpoint_lib.check_workdir(workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  if require_checkpoint and not os.path.isdir(checkpoints):  # before the Checkpointer, which would create it
    raise checkpoint_lib.CheckpointError(f"No checkpoint in {checkpoints}; train first.")
  mesh = make_mesh(config.mesh, devices)
  _check_mesh_fits(config, mesh)
  optimizer = lambda params: prune_masks.with_gradual_pruning(  # noqa: E731  (train.pruning; identity when off)
      optimizer_lib.build_optimizer(config.train, params, config.model), config.train.pruning)
  # Under the mesh context, layers that shard by hand (MoE expert parallelism) see the mesh.
  with jax.set_mesh(mesh):
    setup = state_lib.setup_model(config.model, optimizer, mesh, config.train.seed)
    if config.train.quantization.scheme != "none":  # QAT: the forward pass sees quantized weights
      from sparseformer.train.compression import qat  # pylint: disable=import-outside-toplevel
      setup = qat.wrap_setup(setup, config)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:
      state, data_state = checkpointer.restore(latest, setup.abstract_state)
      log(f"Resumed from step {latest} in {checkpointer.directory}.")
    elif require_checkpoint:
      raise checkpoint_lib.CheckpointError(f"No checkpoint in {checkpointer.directory}; train first.")
    else:
      state, data_state = state_lib.init_train_state(config.model, setup, config.train.seed), None
  return Run(config, workdir, mesh, setup, state, checkpointer, data_state, sharding_lib.batch_sharding(mesh))


def evaluate(run: Run, val_sets: dict[str, list]) -> dict[str, float]:
  """Masked loss, token / example accuracy (and bits per byte for text) of each evaluation set (global arrays):
  the validation set "" as `loss` etc., each extra task mix as `<mix>/loss` etc.; empty sets are skipped."""
  if run.eval_step is None:
    run.eval_step = jax.jit(step_lib.make_eval_step(run.setup))
  bits_per_byte = run.config.data.resolved_source != "task"
  summary = {}
  with jax.set_mesh(run.mesh):
    for name, batches in val_sets.items():
      if batches:
        metrics = step_lib.summarize_eval([run.eval_step(run.state, batch) for batch in batches],
                                          bits_per_byte=bits_per_byte)
        summary.update({(f"{name}/{key}" if name else key): value for key, value in metrics.items()})
  return summary


def _global_val_sets(config: RunConfig, corpus, run: Run) -> dict[str, list]:
  index, count = data_lib.local_batch_shard(run.batch_sharding, config.data)
  return {name: [data_lib.to_global_batch(batch, run.batch_sharding, config.data.batch_size) for batch in batches]
          for name, batches in data_lib.validation_sets(config.data, corpus, index, count).items()}


def evaluate_workdir(config: RunConfig, workdir: str) -> dict:
  """`sparseformer eval`: validation metrics of the latest checkpoint in `workdir` (every task mix too)."""
  corpus = data_lib.load_source(config.data)
  run = open_run(config, workdir, require_checkpoint=True)
  try:
    val_sets = _global_val_sets(config, corpus, run)
    if not val_sets[""]:
      raise ValueError("The validation split holds no full batch; raise data.val_fraction or data.num_val_batches, "
                       "or lower data.batch_size.")
    return {"step": int(run.state.step), **evaluate(run, val_sets)}
  finally:
    run.checkpointer.close()


def _after_optimizer_step_hook(config: RunConfig, masks: dict | None = None):
  """MoE bias balancing, then the pruning masks (train.prune_masks) re-applied; None when neither applies."""
  hooks = ([moe.after_optimizer_step] if "moe" in config.model.ffn_pattern else []) + (
      [prune_masks.mask_hook(masks)] if masks else [])
  if not hooks:
    return None

  def after_optimizer_step(model: nnx.Module) -> None:
    for hook in hooks:
      hook(model)

  return after_optimizer_step


def train(config: RunConfig, workdir: str, *, devices: list | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final summary. See DESIGN.md, "A training run"."""
  # --- Setup: validate everything that can fail before any work is done.
  workdir = checkpoint_lib.check_workdir(workdir)
  if os.path.exists(os.path.join(workdir, "quantization.json")):
    raise ValueError(f"{workdir} holds a post-training-quantized model (`sparseformer quantize`), for eval and "
                     "sample only; train the float run (QAT: --set train.quantization.scheme=int8).")
  if config.train.distill.enabled:
    teacher_lib.check_teacher(config)  # a missing teacher, another vocabulary, no checkpoint: errors now
  corpus = data_lib.load_source(config.data)  # None for a task
  _write_config(workdir, config)

  # --- Mesh, model, optimizer, restore.
  run = open_run(config, workdir, devices=devices)
  index, count = data_lib.local_batch_shard(run.batch_sharding, config.data)
  train_batches = data_lib.make_train_batches(config.data, corpus, index, count)
  if run.data_state is not None:
    train_batches.set_state(run.data_state)
  val_sets = _global_val_sets(config, corpus, run)
  masks = prune_masks.run_masks(config, workdir, run.state.params, log)  # train.prune_masks, checked
  teacher = teacher_lib.load_teacher(config, run.mesh) if config.train.distill.enabled else None

  # --- Compile the steps.
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  train_step = jax.jit(
      step_lib.make_train_step(run.setup, accum_steps=config.train.grad_accum_steps, learning_rate=schedule,
                               after_optimizer_step=_after_optimizer_step_hook(config, masks),
                               distill=teacher.distillation(config.train.distill) if teacher else None),
      in_shardings=(run.setup.state_shardings, run.batch_sharding) + ((teacher.shardings,) if teacher else ()),
      out_shardings=(run.setup.state_shardings, sharding_lib.replicated(run.mesh)), donate_argnums=0)
  teacher_args = (teacher.variables,) if teacher else ()
  tokens_per_step = config.data.batch_size * config.data.seq_len
  flops_per_token = flops_lib.train_flops_per_token(config.model, config.data.seq_len)
  peak_flops = config.train.peak_flops or metrics_lib.measure_matmul_peak(config.model.dtype)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  if teacher is not None:
    _log_teacher_eval(teacher, run, val_sets, writer)
  log(f"Training {config.name}: {_parameter_count(run.state):,} parameters, {jax.device_count()} device(s), "
      f"mesh {dict(run.mesh.shape)}; data: {_describe_data(config, corpus)}")
  log(f"Model FLOPs per token {flops_per_token:.3g}; peak {peak_flops / 1e9:.1f} GFLOP/s "
      f"({'given' if config.train.peak_flops else 'measured matmul'}).")
  if config.model.allow_bidirectional_attention and not config.model.attention.causal:
    log("Warning: model.allow_bidirectional_attention=True and model.attention.causal=False: the sparse attention "
        "layers see future tokens, so this loss is not a causal language-model loss.")

  # --- Loop.
  step = int(run.state.step)
  last_saved, first_session_step = step, step
  meter = energy_lib.EnergyMeter(config.train.energy, backend=jax.default_backend(),
                                 accelerators=jax.local_device_count())
  session_tokens = lambda: (step - first_session_step) * tokens_per_step  # noqa: E731
  progress = _progress_bar(config, step)
  interval_start, interval_steps, first_step = time.perf_counter(), 0, True
  summary, last_loss = {}, float("nan")
  try:
    with _StopRequest() as stop, jax.set_mesh(run.mesh):
      while step < config.train.steps:
        batch = data_lib.to_global_batch(next(train_batches), run.batch_sharding, config.data.batch_size)
        run.state, step_metrics = train_step(run.state, batch, *teacher_args)
        if not bool(step_metrics["finite"]):
          raise NonFiniteError(
              f"Non-finite loss or gradient norm at step {step + 1} (loss={float(step_metrics['total_loss'])}, "
              f"grad_norm={float(step_metrics['grad_norm'])}). Stopped without applying it; the last good "
              f"checkpoint is step {last_saved if last_saved else 'none'} in {run.checkpointer.directory}. "
              "Lower train.learning_rate or raise train.warmup_steps and resume.")
        step += 1
        last_loss = float(step_metrics["loss"])
        if first_step:  # exclude compilation from throughput
          first_step, interval_start = False, time.perf_counter()
        else:
          interval_steps += 1
        if progress is not None:
          progress.update(1)
        if step % config.train.log_every == 0:
          logged = {name: value for name, value in step_metrics.items() if name != "finite"}
          if isinstance(train_batches, data_lib.TrainBatches):
            logged["epoch"] = train_batches.epoch
          if interval_steps:
            tokens_per_second = interval_steps * tokens_per_step / (time.perf_counter() - interval_start)
            logged.update(tokens_per_second=tokens_per_second, mfu=tokens_per_second * flops_per_token / peak_flops)
          logged.update(meter.read(session_tokens()))
          writer.write(step, logged, prefix="train/")
          if progress is not None:
            progress.set_postfix(loss=f"{float(logged['loss']):.3f}",
                                 tok_s=f"{logged.get('tokens_per_second', 0):,.0f}", mfu=f"{logged.get('mfu', 0):.0%}")
          interval_start, interval_steps = time.perf_counter(), 0
        if config.train.eval_every and step % config.train.eval_every == 0 and step < config.train.steps:
          summary = evaluate(run, val_sets)
          if summary:
            writer.write(step, summary, prefix="eval/")
          interval_start, interval_steps = time.perf_counter(), 0
        if step == config.train.stop_at_step:
          stop.requested = True
          log(f"Reached train.stop_at_step={step}.")
        if step % config.train.checkpoint_every == 0 or stop.requested:
          run.checkpointer.save(step, run.state, train_batches.get_state(), wait=stop.requested)
          last_saved = step
        if stop.requested:
          progress = _close(progress)
          log(f"Stopped at step {step}; checkpoint saved in {run.checkpointer.directory}. "
              "Run the same command again to resume.")
          energy = meter.summary(session_tokens())
          if energy:
            writer.write(step, energy)
          return {"step": step, "train_loss": last_loss, "interrupted": True, **energy}

    # --- Finish: final checkpoint, evaluation, sample.
    progress = _close(progress)
    if last_saved != step or run.checkpointer.latest_step() != step:
      run.checkpointer.save(step, run.state, train_batches.get_state())
    summary = evaluate(run, val_sets)
    if summary:
      writer.write(step, summary, prefix="eval/")
      log(f"Validation at step {step}: " + _describe_eval(summary))
    if config.train.sample_tokens and config.data.resolved_source == "task":
      log("No text sample: the model was trained on a task, not on text (train.sample_tokens is ignored).")
    elif config.train.sample_tokens:
      text = sample_text(run, config.train.sample_prompt, config.train.sample_tokens)
      log(f"Sample (prompt {config.train.sample_prompt!r}, temperature 0.8):\n{text}\n")
    energy = meter.summary(session_tokens())
    if energy:
      writer.write(step, energy)
    log(f"Energy of this session: {energy_lib.describe(energy)}.")
  finally:
    meter.close()
    _close(progress)
    run.checkpointer.close()
    writer.close()
  log(f"Logs: {os.path.join(workdir, 'metrics.jsonl')} and {os.path.join(workdir, 'tensorboard')}; "
      f"checkpoints: {run.checkpointer.directory}")
  return {"step": step, "train_loss": last_loss, **summary, **energy}


def _log_teacher_eval(teacher: teacher_lib.Teacher, run: Run, val_sets: dict, writer) -> None:
  """The frozen teacher's validation metrics on the student's validation batches, once at the start."""
  state = state_lib.TrainState(step=jax.numpy.asarray(teacher.step), params=teacher.variables[0], opt_state=(),
                               extra=teacher.variables[1])
  setup = dataclasses.replace(run.setup, graphdef=teacher.graphdef)
  teacher_run = Run(run.config, teacher.workdir, run.mesh, setup, state, run.checkpointer, None, run.batch_sharding)
  summary = evaluate(teacher_run, val_sets)
  if summary:
    writer.write(int(run.state.step), summary, prefix="distill/teacher_eval/")
    log(f"Teacher {teacher.workdir} (step {teacher.step}): " + _describe_eval(summary))


def sample_text(run: Run, prompt: str, num_tokens: int, *, temperature: float = 0.8, top_k: int = 0,
                seed: int = 0) -> str:
  """The prompt and its continuation over the KV cache (train/generate.py); a continuation that would not fit
  model.max_seq_len is cut to fit, and the log says so (the end-of-run sample must not fail a finished run)."""
  fits = run.config.model.max_seq_len - max(len(generate.prompt_ids(prompt)), 1) + 1
  if num_tokens > fits:
    log(f"Sample cut to {max(fits, 0)} tokens: {num_tokens} after the prompt exceed model.max_seq_len="
        f"{run.config.model.max_seq_len}.")
    num_tokens = fits
  if num_tokens < 1:
    return prompt
  with jax.set_mesh(run.mesh):
    return generate.generate_text(run.model(), [prompt], max_new_tokens=num_tokens, temperature=temperature,
                                  top_k=top_k, seed=seed)[0]


def read_train_losses(workdir: str) -> dict[int, float]:
  """{step: training loss} from a run's metrics.jsonl."""
  return {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(workdir) if "train/loss" in r}


def _describe_eval(summary: dict) -> str:
  """'loss 1.2345 nats/token, 2.7000 bits per byte' (text) or loss and accuracies per task mix."""
  if "bits_per_byte" in summary:
    return f"loss {summary['loss']:.4f} nats/token, {summary['bits_per_byte']:.4f} bits per byte."
  mixes = [""] + sorted({key.rsplit("/", 1)[0] for key in summary if "/" in key})
  parts = []
  for mix in mixes:
    prefix = f"{mix}/" if mix else ""
    parts.append(f"{mix or 'validation'}: loss {summary[prefix + 'loss']:.4f}, token accuracy "
                 f"{summary[prefix + 'token_accuracy']:.1%}, example accuracy {summary[prefix + 'example_accuracy']:.1%}")
  return "; ".join(parts) + "."


def _describe_data(config: RunConfig, corpus) -> str:
  if corpus is None:
    return task_batches.describe(config.data)
  meta = corpus.metadata
  source = meta.get("source", "?")
  if "python_version" in meta:
    source += f" (Python {meta['python_version']})"
  return f"{source}, {corpus.train_tokens.size:,} train / {corpus.val_tokens.size:,} validation tokens"


def _parameter_count(state: state_lib.TrainState) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state.params))


def _close(progress) -> None:
  """Closes a progress bar (so later lines start on their own line); returns None to clear the reference."""
  if progress is not None:
    progress.close()
  return None


def _progress_bar(config: RunConfig, step: int):
  if not config.train.progress_bar or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=config.train.steps, initial=step, desc="train", unit="step", file=sys.stdout,
              dynamic_ncols=True)
