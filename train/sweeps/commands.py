"""`sparseformer sweep plan | run | status | report`: the sweep subcommands of train/cli.py.

    sparseformer sweep plan --experiment NAME [--set key=value ...]
    sparseformer sweep run --experiment NAME --out DIR [--parallel N] [--engine local|ray] [--ray-address ADDR]
    sparseformer sweep status DIR
    sparseformer sweep report DIR [--target METRIC:VARIANT] [--train-metrics PATTERN[,PATTERN]]
                                  [--frontier-x MODULE:FUNCTION]

Parsing imports nothing heavy; each command imports what it needs when it runs.
"""

import argparse
import os
import shlex
import sys


def _csv(kind):
  def parse(text: str) -> list:
    try:
      return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
      raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from error
  return parse


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--experiment", required=True, help="experiments/<name>.py with a SWEEP, or a path to a .py file")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="applies to every run; on a swept field, restricts that axis to the value")
  parser.add_argument("--variants", type=_csv(str), help="only these variants, e.g. --variants local,global")
  parser.add_argument("--seeds", type=_csv(int), help="only these seeds, e.g. --seeds 0,1")
  parser.add_argument("--learning-rates", type=_csv(float), help="only these learning rates, e.g. 1e-3,3e-3")


def add_parser(commands) -> None:
  """Adds the `sweep` command group to the subparsers `commands` of the main parser."""
  sweep = commands.add_parser("sweep", help="plan, run and report an experiment's SWEEP")
  actions = sweep.add_subparsers(dest="sweep_command", required=True)
  plan = actions.add_parser("plan", help="print the runs of a sweep and their overrides")
  _add_plan_flags(plan)
  run = actions.add_parser("run", help="run (or resume) every run of a sweep under DIR")
  _add_plan_flags(run)
  run.add_argument("--out", required=True, help="sweep directory: sweep.json, runs/<name>/ (a rerun resumes)")
  run.add_argument("--engine", choices=("local", "ray"), default="local")
  run.add_argument("--parallel", type=int, help="runs at once (local: default 1, at most the core count; "
                   "ray: default all the cluster fits)")
  run.add_argument("--ray-address", help="Ray cluster address for ray.init (default: start a local Ray)")
  run.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray resources of each run (num_cpus)")
  run.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray resources of each run (num_gpus)")
  status = actions.add_parser("status", help="counts by status and one line per run")
  status.add_argument("dir")
  report = actions.add_parser("report", help="results.csv, summary.md and plots from the runs' files")
  report.add_argument("dir")
  # Each default: the SWEEP's `report` dict stored in sweep.json (report_options.py); `none` turns it off.
  report.add_argument("--target", metavar="METRIC:VARIANT",
                      help="steps for every variant to reach VARIANT's final METRIC, e.g. eval/loss:dense")
  report.add_argument("--train-metrics", metavar="PATTERN[,PATTERN]",
                      help="tables and curves of logged metrics, e.g. 'train/layer*/moe/max_violation'")
  report.add_argument("--frontier-x", metavar="MODULE:FUNCTION",
                      help="frontier plot of select against FUNCTION(variant, overrides), e.g. "
                      "sparseformer.experiments.sparse_lm:attention_flops_per_token")


def _plan(args):
  from sparseformer.train.sweeps import spec  # pylint: disable=import-outside-toplevel
  return spec.plan(args.experiment, args.overrides, variants=args.variants, seeds=args.seeds,
                   learning_rates=args.learning_rates)


def _write_report(sweep_dir: str, **options) -> dict:
  from sparseformer.train.sweeps import report  # pylint: disable=import-outside-toplevel
  return report.write_report(sweep_dir, **options)


def _print_report(result: dict) -> None:
  for key, value in (result or {}).items():
    print(f"{key}: {value}")


def sweep_size(name: str) -> str | None:
  """'N runs' of experiment `name`'s SWEEP for the `experiments` listing (None without a SWEEP)."""
  from sparseformer import experiments  # pylint: disable=import-outside-toplevel
  from sparseformer.train.sweeps import spec  # pylint: disable=import-outside-toplevel
  if experiments.sweep(name) is None:
    return None
  try:
    return f"{len(spec.plan(name).runs)} runs (sparseformer sweep plan --experiment {name})"
  except ValueError as error:
    return f"invalid SWEEP: {error}"


def _status(sweep_dir: str) -> int:
  from sparseformer.train.sweeps import store  # pylint: disable=import-outside-toplevel
  sweep = store.load_sweep(sweep_dir)
  lines, counts = [], {}
  for run, path in zip(sweep["runs"], store.run_dirs(sweep_dir)):
    status = store.read_status(path)
    state = status["status"] if status else "pending"
    if state == "running" and not store.is_locked(path):
      state = "interrupted"  # its sweep died; the next `sweep run` resumes it
    counts[state] = counts.get(state, 0) + 1
    step = store.last_step(path)
    wall = f"{status['wall_time_s']:.1f} s" if status else "-"
    lines.append(f"{state:<11} step {'-' if step is None else step:>6}  {wall:>10}  {run['name']}")
  order = ("done", "running", "interrupted", "failed", "pending")
  print(f"{sweep_dir}: {len(sweep['runs'])} runs of {sweep['experiment']}: " +
        ", ".join(f"{counts[name]} {name}" for name in order if name in counts))
  print("\n".join(lines))
  return 0


def _run_sweep(args) -> int:
  plan = _plan(args)
  if args.engine == "ray":
    from sparseformer.train.sweeps import ray_engine  # pylint: disable=import-outside-toplevel
    counts = ray_engine.run_sweep(plan, args.out, address=args.ray_address, cpus_per_run=args.cpus_per_run,
                                  gpus_per_run=args.gpus_per_run, max_parallel=args.parallel)
  else:
    from sparseformer.train.sweeps import local  # pylint: disable=import-outside-toplevel
    counts = local.run_sweep(plan, args.out, args.parallel or 1)
  total = len(plan.runs)
  print(f"Sweep {args.out}: {counts['done'] + counts['skipped']} of {total} runs done "
        f"({counts['skipped']} finished earlier), {counts['failed']} failed.")
  try:
    _print_report(_write_report(args.out))
  except Exception as error:  # pylint: disable=broad-except  # the runs succeeded; the report can be redone
    print(f"sweep report failed ({type(error).__name__}: {error}); rerun `sparseformer sweep report {args.out}`.")
  if counts["failed"]:
    print(f"{counts['failed']} of {total} runs failed; see runs/<name>/train.log, `sparseformer sweep status "
          f"{args.out}`, and rerun the same command to retry them.", file=sys.stderr)
    return 1
  return 0


def run(args) -> int:
  """Runs the parsed `sweep` subcommand; returns the exit code."""
  if args.sweep_command == "plan":
    plan = _plan(args)
    for run_ in plan.runs:
      print(f"{run_.name}\n    " + " ".join(f"--set {shlex.quote(item)}" for item in run_.overrides))
    print(f"{len(plan.runs)} runs of {plan.experiment}; select {plan.select} ({plan.select_mode}), compared at equal "
          f"{plan.compare_at}; swept: {', '.join(plan.swept_fields) or 'no grid field'}")
    return 0
  if args.sweep_command == "run":
    return _run_sweep(args)
  if args.sweep_command == "status":
    return _status(args.dir)
  if args.sweep_command == "report":
    if not os.path.isdir(args.dir):
      raise FileNotFoundError(f"{args.dir} is not a directory: pass the --out directory of `sparseformer sweep run`.")
    flags = {"target": args.target, "train_metrics": args.train_metrics, "frontier_x": args.frontier_x}
    _print_report(_write_report(args.dir, **{key: value for key, value in flags.items() if value is not None}))
    return 0
  raise AssertionError(args.sweep_command)
