"""Eval accuracy of finished MQAR runs by pair index: which of the N key-value pairs (keys at 0, 2, .., 2N - 2) a
query asks for. Reads only.

    python docs/results/mqar/by_pair.py WORKDIR [WORKDIR ...]      # 4 validation batches (1,024 queries)
"""
import os
import sys

import numpy as np
from flax import nnx

from sparseformer.train import data as data_lib, overrides, trainer

NUM_VAL_BATCHES = 4


def accuracy_by_pair(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  config = overrides.apply_overrides(trainer.load_run_config(workdir), [f"data.num_val_batches={NUM_VAL_BATCHES}"])
  pairs = config.data.mqar.num_kv_pairs
  run = trainer.open_run(config, workdir, require_checkpoint=True)
  try:
    model = nnx.merge(run.setup.graphdef, run.state.params, run.state.extra, copy=True)
    model.eval()
    right, total = np.zeros(pairs), np.zeros(pairs)
    for batch in data_lib.validation_sets(config.data, None)[""]:
      logits, _ = model(batch["inputs"])
      inputs, mask = np.asarray(batch["inputs"]), np.asarray(batch["loss_mask"]) > 0
      hit = np.argmax(np.asarray(logits), -1) == np.asarray(batch["targets"])
      keys = inputs[:, 0:2 * pairs:2]
      for b, position in zip(*np.nonzero(mask), strict=True):
        (pair,) = np.nonzero(keys[b] == inputs[b, position])[0]  # MQAR keys are distinct: exactly one match
        right[pair] += hit[b, position]
        total[pair] += 1
  finally:
    run.checkpointer.close()
  return right / np.maximum(total, 1), total


def main(workdirs: list[str]) -> None:
  for workdir in workdirs:
    accuracy, total = accuracy_by_pair(workdir)
    print(f"| {os.path.basename(workdir.rstrip('/')).split('__')[0]} | "
          + " | ".join(f"{100 * a:.1f}" for a in accuracy) + f" | {int(total.sum())} |", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
