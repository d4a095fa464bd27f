"""Eval accuracy of each finished MQAR run by query position, and for the kinds whose weights fit dense attention
(no routing parameters) the same weights re-evaluated with dense causal attention. Reads only.

    python docs/results/mqar/by_position.py /work/runs/sweeps/mqar_cpu [num_val_batches]

Query positions are 2N + 2g (8, 10, ..., 62 at T = 64, N = 4); every key sits at 0..7. The buckets split where the
kinds differ: local_w16 reaches a key directly up to position 22, local_w48 up to 55, and MoBA (blocks of 8, top 6)
is exactly dense below 48 (it ranks blocks only when a query has more than 6)."""
import os, sys
import numpy as np
from flax import nnx
from sparseformer.train import data as data_lib, overrides, trainer

BUCKETS = [(8, 22), (24, 46), (48, 54), (56, 62)]
DENSE_SWAP = ("local_w16", "local_w48", "bigbird", "moba")  # no parameters beyond dense attention's


def accuracy_by_bucket(workdir: str, sets: list[str], num_val_batches: int) -> tuple[list[float], list[int], float]:
  config = overrides.apply_overrides(trainer.load_run_config(workdir), sets + [f"data.num_val_batches={num_val_batches}"])
  run = trainer.open_run(config, workdir, require_checkpoint=True)
  try:
    model = nnx.merge(run.setup.graphdef, run.state.params, run.state.extra, copy=True)
    model.eval()
    right, total = np.zeros(64), np.zeros(64)
    for batch in data_lib.validation_sets(config.data, None)[""]:
      logits, _ = model(batch["inputs"])
      mask = np.asarray(batch["loss_mask"]) > 0
      hit = (np.argmax(np.asarray(logits), -1) == np.asarray(batch["targets"])) & mask
      right += hit.sum(0)
      total += mask.sum(0)
  finally:
    run.checkpointer.close()
  buckets = [(right[a:b + 1].sum() / max(total[a:b + 1].sum(), 1), int(total[a:b + 1].sum())) for a, b in BUCKETS]
  return [acc for acc, _ in buckets], [count for _, count in buckets], right.sum() / total.sum()


def main(sweep: str, num_val_batches: int) -> None:
  header = " | ".join(f"{a}-{b}" for a, b in BUCKETS)
  print(f"| run | weights evaluated with | {header} | all |\n|---|---|" + "---:|" * (len(BUCKETS) + 1))
  counts = None
  for name in sorted(os.listdir(os.path.join(sweep, "runs"))):
    workdir, variant = os.path.join(sweep, "runs", name), name.split("__")[0]
    for label, sets in [("its own attention", [])] + (
        [("dense causal", ["model.attention_pattern=('global',)"])] if variant in DENSE_SWAP else []):
      accs, counts, overall = accuracy_by_bucket(workdir, sets, num_val_batches)
      print(f"| {variant} | {label} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + f" | {100 * overall:.1f} |")
  print(f"\nQueries per bucket: {counts} ({num_val_batches} validation batches).")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16)
