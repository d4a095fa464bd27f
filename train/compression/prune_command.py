"""`sparseformer prune`: one-shot pruning of a trained workdir into a new one, evaluated beside the original.

    sparseformer prune --workdir DIR --method magnitude|wanda --sparsity 0.5 --out DIR2
    sparseformer prune --workdir DIR --method nm --nm 2:4 [--score wanda|magnitude] --out DIR2
    sparseformer prune --workdir DIR --method wanda --sparsity 0.5 --group per_matrix --out DIR2   # group ablation
    sparseformer prune --workdir DIR --method experts --experts 2 --out DIR2     # MoE: E - 2 experts per layer
    sparseformer prune --workdir DIR --method heads --heads 1 --out DIR2         # num_heads - 1 per layer

DIR2 gets config.json, checkpoints/<step>/ (the pruned state, optimizer state and data position carried
over), prune_masks.npz (unstructured and N:M) and prune_report.json; DIR is only read. Fine-tune with
`sparseformer train ... --workdir DIR2 --set train.steps=N --set train.prune_masks=DIR2` (structured
outputs: also the smaller model fields, e.g. --set model.moe.num_experts=6). Every flag is checked, and DIR2
must not exist, before any work starts. Parsing imports nothing heavy.
"""

import argparse
import json
import os
import shutil

from sparseformer.train.compression import workdirs

METHODS = ("magnitude", "wanda", "nm", "experts", "heads")
SCORES = ("wanda", "magnitude")
GROUPS = ("per_matrix", "per_output")  # = prune_scores.GROUPS (parsing imports nothing heavy)
REPORT_FILE = "prune_report.json"


def add_parser(commands) -> None:
  prune = commands.add_parser("prune", help="prune a run's latest checkpoint into a new workdir (magnitude, "
                              "Wanda, N:M, MoE experts, attention heads)")
  prune.add_argument("--workdir", required=True, help="the trained run (only read)")
  prune.add_argument("--out", required=True, help="new workdir for the pruned run (must not exist)")
  prune.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
  prune.add_argument("--sparsity", type=float, help="magnitude / wanda: share of each weight's comparison group "
                     "set to zero, in (0, 1)")
  prune.add_argument("--nm", help="nm: N:M, N weights kept of every M consecutive inputs, e.g. 2:4")
  prune.add_argument("--score", default="wanda", help="nm: rank by wanda (default) or magnitude")
  prune.add_argument("--group", help="magnitude / wanda: compare scores per_matrix (magnitude's default) or "
                     "per_output (wanda's default: over the inputs of each output)")
  prune.add_argument("--experts", type=int, help="experts: experts dropped per MoE layer")
  prune.add_argument("--heads", type=int, help="heads: query heads dropped per layer")
  prune.add_argument("--calibration-batches", type=int, default=8,
                     help="training batches of the calibration pass (wanda, experts, heads)")


def check_args(args: argparse.Namespace) -> None:
  """Flag checks that need no model: ValueError naming the flag and the fix."""
  if args.method not in METHODS:
    raise ValueError(f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)}.")
  expected = {"magnitude": "sparsity", "wanda": "sparsity", "nm": "nm", "experts": "experts", "heads": "heads"}
  for method, flag in expected.items():
    given = getattr(args, flag) is not None
    if method == args.method and not given:
      raise ValueError(f"--method {method} needs --{flag}.")
  for flag in ("sparsity", "nm", "experts", "heads"):
    if getattr(args, flag) is not None and expected[args.method] != flag:
      raise ValueError(f"--{flag} does not apply to --method {args.method}; drop it.")
  if args.sparsity is not None and not 0 < args.sparsity < 1:
    raise ValueError(f"--sparsity {args.sparsity} must lie strictly between 0 and 1 (e.g. 0.5).")
  if args.nm is not None:
    from sparseformer.train.compression.prune_scores import parse_nm  # pylint: disable=import-outside-toplevel
    parse_nm(args.nm)
  if args.group is not None:
    if args.method not in ("magnitude", "wanda"):
      raise ValueError(f"--group applies to --method magnitude or wanda only, not {args.method}; drop it.")
    if args.group not in GROUPS:
      raise ValueError(f"--group {args.group!r}: choose one of {', '.join(GROUPS)}.")
  if args.score not in SCORES:
    raise ValueError(f"--score {args.score!r}: choose one of {', '.join(SCORES)}.")
  if args.calibration_batches < 1:
    raise ValueError(f"--calibration-batches {args.calibration_batches} must be >= 1.")
  workdirs.check_source_and_out(args.workdir, args.out, "prune")


def _check_nm_fits(params, nm: tuple[int, int], flag: str) -> None:
  from sparseformer.train.compression import prune, prune_masks, prune_scores  # pylint: disable=import-outside-toplevel
  shapes = {name: leaf.shape for name, leaf in prune_masks.named_params(params).items()}
  for name, layout in prune.prunable_names(params).items():
    inputs = prune_scores.canonical_shape(shapes[name], layout)[1]
    if inputs % nm[1]:
      raise ValueError(f"--nm {flag}: the input dimension of {name} ({inputs}) is not a multiple of M={nm[1]}; "
                       "pick an M that divides every projection's input size.")


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  check_args(args)
  from sparseformer.train import state as state_lib
  from sparseformer.train import trainer
  from sparseformer.train.compression import prune_scores, prune_structured

  config = trainer.load_run_config(args.workdir)
  new_model = config.model
  nm = prune_scores.parse_nm(args.nm) if args.nm else None
  if nm is not None:
    _check_nm_fits(state_lib.abstract_model(config.model)[1], nm, args.nm)
  if args.method == "experts":
    new_model = prune_structured.check_expert_pruning(config.model, args.experts)
  elif args.method == "heads":
    new_model = prune_structured.check_head_pruning(config.model, args.heads, config.data.seq_len)
  elif args.method in ("wanda", "nm") and "moe" in config.model.ffn_pattern and config.model.moe.routing != "token_choice":
    raise ValueError(f"--method {args.method}: the calibration pass needs token_choice MoE routing.")

  out = os.path.abspath(args.out)
  partial = f"{out}.partial-{os.getpid()}"  # built aside, renamed into place once complete
  try:
    report = _prune_workdir(config, new_model, args, nm, os.path.abspath(args.workdir), partial, out)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  os.rename(partial, out)
  trainer.log(format_table(report))
  trainer.log(f"Pruned run written to {out} (report: {os.path.join(out, REPORT_FILE)}).")
  return 0


def _prune_workdir(config, new_model, args, nm, source: str, partial: str, out: str) -> dict:
  """Calibrates, prunes, writes the new workdir into `partial` and evaluates both models; returns the report."""
  # pylint: disable=import-outside-toplevel,protected-access
  import dataclasses
  import platform

  import jax
  import numpy as np

  from sparseformer.models import flops as flops_lib
  from sparseformer.train import checkpoint as checkpoint_lib
  from sparseformer.train import data as data_lib
  from sparseformer.train import overrides, trainer
  from sparseformer.train.compression import prune, prune_masks, prune_scores, prune_structured

  corpus = data_lib.load_source(config.data)
  run = trainer.open_run(config, source, require_checkpoint=True)
  try:
    val_sets = trainer._global_val_sets(config, corpus, run)
    if not val_sets[""]:
      raise ValueError("The validation split holds no full batch; the pruned model cannot be evaluated.")
    stats = None
    if args.method in ("wanda", "experts", "heads") or (args.method == "nm" and args.score == "wanda"):
      index, count = data_lib.local_batch_shard(run.batch_sharding, config.data)
      batches = data_lib.make_train_batches(config.data, corpus, index, count)
      calibration = [data_lib.to_global_batch(next(batches), run.batch_sharding, config.data.batch_size)
                     for _ in range(args.calibration_batches)]
      stats = prune.calibration_stats(run, calibration)
    step = int(run.state.step)
    masks, dropped = None, {}
    if args.method in ("magnitude", "wanda", "nm"):
      masks = prune.one_shot_masks(run.state.params, args.method, sparsity=args.sparsity, nm=nm, score=args.score,
                                   stats=stats, group=args.group)
      state = dataclasses.replace(run.state, params=prune_masks.apply_masks(run.state.params, masks))
      new_config = dataclasses.replace(config, train=dataclasses.replace(config.train, prune_masks=out))
    else:
      if args.method == "experts":
        slices = prune_structured.expert_slices(stats, config.model, args.experts)
        kept_key = "router/weight"
      else:
        slices = prune_structured.head_slices(stats, config.model, args.heads)
        kept_key = "wq"
      sizes = {name: leaf.shape for name, leaf in prune_masks.named_params(run.state.params).items()}
      dropped = {name.removesuffix("/" + kept_key): sorted(set(range(sizes[name][axis])) - set(keep.tolist()))
                 for name, (axis, keep) in slices.items() if name.endswith("/" + kept_key)}
      state = prune_structured.slice_tree(jax.device_get(run.state), slices)
      new_config = dataclasses.replace(config, model=new_model,
                                       train=dataclasses.replace(config.train, prune_masks=""))
    original = trainer.evaluate(run, val_sets)
    tokens = val_sets[""][0]["inputs"]
    original_model = (run.setup.graphdef, run.state.params, run.state.extra)
    original_params = trainer._parameter_count(run.state)
    data_state = run.data_state
  finally:
    run.checkpointer.close()

  os.makedirs(partial)
  with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as file:
    json.dump(overrides.to_dict(new_config), file, indent=2)
  writer = checkpoint_lib.Checkpointer(partial, keep=config.train.keep_checkpoints)
  writer.save(step, state, data_state, wait=True)
  writer.close()
  if masks is not None:
    prune_masks.save_masks(partial, masks)

  pruned_run = trainer.open_run(new_config, partial, require_checkpoint=True)  # reads back what was written
  try:
    pruned = trainer.evaluate(pruned_run, val_sets)
    original_seconds, pruned_seconds = prune_structured.forward_seconds(
        [original_model, (pruned_run.setup.graphdef, pruned_run.state.params, pruned_run.state.extra)], tokens)
    pruned_params = trainer._parameter_count(pruned_run.state)
  finally:
    pruned_run.checkpointer.close()

  seq_len = config.data.seq_len
  flops = {"original": flops_lib.train_flops_per_token(config.model, seq_len) / 3,
           "pruned": flops_lib.train_flops_per_token(new_model, seq_len) / 3}
  report = {
      "method": args.method, "sparsity": args.sparsity, "nm": args.nm,
      "score": args.score if args.method == "nm" else None,
      "group": (args.group or prune_scores.DEFAULT_GROUP[args.method]) if args.method in prune_scores.DEFAULT_GROUP
               else None,
      "experts_dropped": args.experts,
      "heads_dropped": args.heads, "calibration_batches": args.calibration_batches if stats is not None else 0,
      "source": source, "out": out, "step": step,
      "zero_share_of_pruned_weights": (None if masks is None else
                                       1.0 - sum(int(m.sum()) for m in masks.values()) /
                                       sum(m.size for m in masks.values())),
      "dropped": dropped,
      "original": {**original, "parameters": original_params, "forward_flops_per_token": flops["original"],
                   "forward_seconds": original_seconds},
      "pruned": {**pruned, "parameters": pruned_params, "forward_flops_per_token": flops["pruned"],
                 "forward_seconds": pruned_seconds},
      "timing": f"median of 7 jitted eval forward passes on one validation batch {tuple(np.shape(tokens))}, "
                f"{jax.default_backend()} ({platform.processor() or platform.machine()}, "
                f"{jax.device_count()} device(s))",
  }
  for key in ("loss", "bits_per_byte"):
    if key in original:
      report[f"delta_{key}"] = pruned[key] - original[key]
  with open(os.path.join(partial, REPORT_FILE), "w", encoding="utf-8") as file:
    json.dump(report, file, indent=2)
  return report


def format_table(report: dict) -> str:
  """The report as a small text table: original and pruned side by side."""
  metric = "bits_per_byte" if "bits_per_byte" in report["original"] else "loss"
  lines = [f"{'model':<10} {'loss':>8} {metric:>14} {'delta':>8} {'params':>10} {'fwd MFLOP/tok':>14} {'fwd ms':>8}"]
  for row in ("original", "pruned"):
    values = report[row]
    delta = values[metric] - report["original"][metric]
    lines.append(f"{row:<10} {values['loss']:>8.4f} {values[metric]:>14.4f} {delta:>+8.4f} "
                 f"{values['parameters']:>10,} {values['forward_flops_per_token'] / 1e6:>14.3f} "
                 f"{values['forward_seconds'] * 1e3:>8.1f}")
  if report["zero_share_of_pruned_weights"] is not None:
    lines.append(f"zero share of the pruned projection weights: {report['zero_share_of_pruned_weights']:.2%} "
                 "(masks save no compute in JAX: the forward FLOPs and time do not change)")
  if report["dropped"]:
    lines.append("dropped: " + "; ".join(f"{name} {ids}" for name, ids in report["dropped"].items()))
  return "\n".join(lines)
