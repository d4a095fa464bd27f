"""`sparseformer` command line: train, eval, sample, experiments, show-config, sweep, quantize, prune."""

import argparse
import json
import os
import sys

from sparseformer.train import generate_command
from sparseformer.train.compression import prune_command
from sparseformer.train.compression import quantize_command
from sparseformer.train.sweeps import commands as sweep_commands


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process (jax.distributed)")
  group.add_argument("--coordinator", help="HOST:PORT of process 0 (or SPARSEFORMER_COORDINATOR)")
  group.add_argument("--num-processes", type=int, help="processes in the job (or SPARSEFORMER_NUM_PROCESSES)")
  group.add_argument("--process-id", type=int, help="this process's index (or SPARSEFORMER_PROCESS_ID)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="sparseformer", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)

  train = commands.add_parser("train", help="train (or resume) a run")
  train.add_argument("--experiment", default="quickstart", help="experiments/<name>.py (see `experiments`)")
  train.add_argument("--variant", help="a named entry of the experiment's ablation grid (VARIANTS)")
  train.add_argument("--workdir", help="run directory (default: runs/<experiment>[-<variant>]); an existing run "
                     "resumes")
  train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set train.steps=100 --set model.dtype=bfloat16")
  _add_distributed_flags(train)

  evaluate = commands.add_parser("eval", help="validation loss and bits per byte of a run's latest checkpoint")
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="e.g. --set data.num_val_batches=32 (model fields must match the run)")
  passkey = evaluate.add_argument_group("retrieval by generation (--task passkey, train/passkey_eval.py)")
  passkey.add_argument("--task", choices=("passkey",), help="instead of validation loss: passkey accuracy grid")
  passkey.add_argument("--lengths", default="256,512,1024", help="context lengths in bytes, <= max_seq_len")
  passkey.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1]")
  passkey.add_argument("--samples", type=int, default=20, help="examples per (length, depth) cell")
  passkey.add_argument("--out", help="a new directory for passkey.{csv,json,md,png} (default: the workdir)")
  _add_distributed_flags(evaluate)

  sample = commands.add_parser("sample", help="generate text from a run's latest checkpoint (KV cache)")
  generate_command.add_arguments(sample)

  commands.add_parser("experiments", help="list experiments with their commands")

  show = commands.add_parser("show-config", help="print the resolved config of an experiment as JSON")
  show.add_argument("--experiment", default="quickstart")
  show.add_argument("--variant")
  show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

  sweep_commands.add_parser(commands)
  prune_command.add_parser(commands)
  quantize_command.add_parser(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except (ValueError, FileNotFoundError) as error:
    print(f"sparseformer {args.command}: error: {error}", file=sys.stderr)
    return 2
  except RuntimeError as error:  # NonFiniteError, CheckpointError
    print(f"sparseformer {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"sparseformer {args.command}: interrupted.", file=sys.stderr)
    return 130


def _run(args: argparse.Namespace) -> int:
  # Imported after parsing, so `--help` and argument errors answer at once instead of after loading JAX.
  # pylint: disable=import-outside-toplevel
  if args.command == "sweep":
    return sweep_commands.run(args)
  if args.command == "prune":
    return prune_command.run(args)
  if args.command == "quantize":
    return quantize_command.run(args)
  import jax

  from sparseformer import experiments
  from sparseformer.train import distributed, overrides, trainer

  def resolved_config():
    return overrides.apply_overrides(experiments.get(args.experiment, args.variant), args.overrides)

  if args.command == "experiments":
    for name in experiments.names():
      grid = experiments.variants(name)
      listing = f"\nvariants: {', '.join(grid)}" if grid else ""
      size = sweep_commands.sweep_size(name)
      listing += f"\nsweep: {size}" if size else ""
      print(f"== {name}\n{experiments.describe(name)}{listing}\n")
    return 0
  if args.command == "show-config":
    print(json.dumps(overrides.to_dict(resolved_config()), indent=2))
    return 0
  if args.command == "train":
    config = resolved_config()  # errors before any start-up cost
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    default_workdir = os.path.join("runs", args.experiment + (f"-{args.variant}" if args.variant else ""))
    summary = trainer.train(config, args.workdir or default_workdir)
    if distributed.is_multiprocess():  # every process reports, so a launcher can check that they agree
      print(f"[process {jax.process_index()}/{jax.process_count()}] summary {json.dumps(summary)}", flush=True)
    return 0
  if args.command == "eval" and args.task == "passkey":
    from sparseformer.train import passkey_eval
    return passkey_eval.run(args)
  if args.command in ("eval", "sample") and os.path.exists(os.path.join(args.workdir, "quantization.json")):
    from sparseformer.train.compression import quantize_run  # a `sparseformer quantize` workdir
    if args.command == "sample":
      return quantize_run.sample(args)
    config = overrides.apply_overrides(trainer.load_run_config(args.workdir), args.overrides)
    trainer.log(json.dumps(quantize_run.evaluate_workdir(config, args.workdir)))
    return 0
  if args.command == "eval":
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    config = overrides.apply_overrides(trainer.load_run_config(args.workdir), args.overrides)
    result = trainer.evaluate_workdir(config, args.workdir)
    trainer.log(json.dumps(result))
    return 0
  if args.command == "sample":
    return generate_command.run(args)
  raise AssertionError(args.command)


if __name__ == "__main__":
  sys.exit(main())
