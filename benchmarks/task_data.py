"""Task batch generation against the training step it feeds, at the MQAR sizes of experiments/mqar.py.

    python -m sparseformer.benchmarks.task_data                    # (64, 4), (128, 8), (256, 16) at d_model 64
    python -m sparseformer.benchmarks.task_data --d-model 128 --samples 20

For each (seq_len, num_kv_pairs) the experiment's config (global attention) builds its jitted train step and
its TaskBatches; one batch and one step run first and are discarded (compilation, caches), then --samples
rounds alternate: generate the next global batch (host NumPy, as the trainer does), then one train step on
the batch before it (block_until_ready). Printed: the median of each and the ratio generation / step, which
is the share of step time the data would add if it were not overlapped (the goal is < 5 %).
"""

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from sparseformer import experiments
from sparseformer.train import data as data_lib
from sparseformer.train import optimizer as optimizer_lib
from sparseformer.train import overrides
from sparseformer.train import state as state_lib
from sparseformer.train import step as step_lib
from sparseformer.train.mesh import make_mesh

SIZES = ((64, 4), (128, 8), (256, 16))


def measure(seq_len: int, num_kv_pairs: int, d_model: int, samples: int) -> dict:
  config = overrides.apply_overrides(experiments.get("mqar", "global"), [
      f"data.seq_len={seq_len}", f"data.mqar.num_kv_pairs={num_kv_pairs}", f"model.max_seq_len={seq_len}",
      f"model.d_model={d_model}"])
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  setup = state_lib.setup_model(config.model, lambda p: optimizer_lib.build_optimizer(config.train, p, config.model), mesh,
                                config.train.seed)
  state = state_lib.init_train_state(config.model, setup, config.train.seed)
  train_step = jax.jit(step_lib.make_train_step(
      setup, accum_steps=1, learning_rate=optimizer_lib.learning_rate_schedule(config.train)), donate_argnums=0)
  batches = data_lib.make_train_batches(config.data, None, 0, 1)
  batch = jax.tree.map(jax.numpy.asarray, next(batches))
  state, metrics = train_step(state, batch)  # warm-up: compile, discarded
  jax.block_until_ready(metrics)
  generate_times, step_times = [], []
  for _ in range(samples):
    start = time.perf_counter()
    host = next(batches)
    generate_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    step_times.append(time.perf_counter() - start)
    batch = jax.tree.map(jax.numpy.asarray, host)
  generate, step = statistics.median(generate_times), statistics.median(step_times)
  return {"seq_len": seq_len, "num_kv_pairs": num_kv_pairs, "d_model": d_model, "batch_size": config.data.batch_size,
          "generate_ms": 1e3 * generate, "step_ms": 1e3 * step, "ratio": generate / step}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d-model", type=int, default=64)
  parser.add_argument("--samples", type=int, default=10)
  args = parser.parse_args()
  print("| seq_len | kv pairs | d_model | batch | generate (ms) | train step (ms) | generate / step |")
  print("|---|---|---|---|---|---|---|")
  for seq_len, pairs in SIZES:
    row = measure(seq_len, pairs, args.d_model, args.samples)
    print(f"| {row['seq_len']} | {row['num_kv_pairs']} | {row['d_model']} | {row['batch_size']} | "
          f"{row['generate_ms']:.2f} | {row['step_ms']:.1f} | {row['ratio']:.1%} |", flush=True)


if __name__ == "__main__":
  main()
