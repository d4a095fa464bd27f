"""Sweep throughput: runs per hour of the local engine at `--parallel N` against the same runs one at a time.

    python -m sparseformer.benchmarks.sweep_throughput                         # 8 runs of experiments/mqar.py
    python -m sparseformer.benchmarks.sweep_throughput --experiment mqar --runs 8 --parallel 2 \
        --set train.steps=100 --out /tmp/sweep_bench
    python -m sparseformer.benchmarks.sweep_throughput --experiment quickstart --seeds 0,1 --runs 2 \
        --set train.steps=3 --set data.seq_len=32 ...                           # plumbing check

The first `--runs` runs of the experiment's SWEEP (plan order; `--seeds` replaces its seeds, e.g. to get
enough runs from a study without one) run twice through `sweep run`'s local engine, each time into a fresh
directory and the ordinary trainer subprocesses: `--parallel 1` (one after another, each run on every core)
and `--parallel N` (N at once, each pinned to cores/N). Wall time covers start-up, compilation, training,
evaluation and checkpoints, as a sweep does. The two modes alternate over `--repeats` (the order flips each
repeat) so a drifting machine does not favour one. Goal (issue 11): >= 1.5x runs per hour at N = 2 on 2
cores, where start-up and compilation, mostly serial, overlap. Results: JSON (--json) and a table on stdout.
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time

from sparseformer import experiments
from sparseformer.train.sweeps import local, spec


def _plan(args) -> spec.Plan:
  sweep = dict(experiments.sweep(args.experiment) or {})
  if not sweep and experiments.variants(args.experiment):
    sweep["variants"] = experiments.variants(args.experiment)
  if args.seeds:
    sweep["seeds"] = args.seeds
  plan = spec.expand(experiments.canonical(args.experiment), experiments.get(args.experiment), sweep, args.overrides)
  if len(plan.runs) < args.runs:
    raise ValueError(f"{args.experiment}'s sweep has {len(plan.runs)} runs under these --set options, fewer than "
                     f"--runs {args.runs}; lower --runs or pass --seeds 0,1,... for more.")
  return dataclasses.replace(plan, runs=plan.runs[:args.runs])


def _time_sweep(plan: spec.Plan, directory: str, parallel: int) -> float:
  """Wall seconds of the whole sweep in a fresh `directory`; raises if any run failed."""
  shutil.rmtree(directory, ignore_errors=True)
  start = time.perf_counter()
  counts = local.run_sweep(plan, directory, parallel, log=lambda line: print(f"  [parallel {parallel}] {line}"))
  wall = time.perf_counter() - start
  if counts["failed"] or counts["done"] != len(plan.runs):
    raise RuntimeError(f"parallel {parallel}: {counts}; see {directory}/runs/*/train.log.")
  return wall


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--experiment", default="mqar", help="a registered experiment or a .py path")
  parser.add_argument("--runs", type=int, default=8)
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=1, help="measurements of each mode, alternating")
  parser.add_argument("--seeds", type=lambda text: [int(item) for item in text.split(",")], help="replace SWEEP seeds")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", help="working directory (default: a temporary one, removed at the end)")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  plan = _plan(args)
  local.check_parallel(args.parallel, local.available_cores())
  root = args.out or tempfile.mkdtemp(prefix="sweep_throughput_")
  walls = {1: [], args.parallel: []}
  try:
    for repeat in range(args.repeats):
      order = (1, args.parallel) if repeat % 2 == 0 else (args.parallel, 1)
      for parallel in order:
        walls[parallel].append(_time_sweep(plan, os.path.join(root, f"parallel{parallel}-{repeat}"), parallel))
  finally:
    if not args.out:
      shutil.rmtree(root, ignore_errors=True)
  per_hour = {parallel: len(plan.runs) * 3600 / min(values) for parallel, values in walls.items()}
  result = {"experiment": args.experiment, "runs": len(plan.runs), "overrides": args.overrides,
            "cores": len(local.available_cores()), "parallel": args.parallel, "wall_s": walls,
            "runs_per_hour": per_hour, "ratio": per_hour[args.parallel] / per_hour[1],
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
  print(f"\n| mode | wall (best of {args.repeats}) | runs / hour |\n|---|---|---|")
  for parallel in walls:
    print(f"| --parallel {parallel} | {min(walls[parallel]):.1f} s | {per_hour[parallel]:.0f} |")
  print(f"\n{len(plan.runs)} runs of {args.experiment} on {result['cores']} cores: --parallel {args.parallel} is "
        f"{result['ratio']:.2f}x the runs per hour of --parallel 1.")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as file:
      json.dump(result, file, indent=2)
  return result


if __name__ == "__main__":
  main()
