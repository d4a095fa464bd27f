"""The MQAR CPU run was four sweeps, two at a time, one per core (`taskset -c 0` / `-c 1`, `--parallel 1` each), so
each ~3x-slower dsa run could share a core's time with short runs instead of starting last; this puts the parts in
one directory for one report: sweep.json planned from the same command (every kind), the finished runs copied in."""
import os, shutil
from sparseformer.train.sweeps import spec, store
SETS = ["model.d_model=64", "data.seq_len=64", "train.steps=4000", "model.attention.backend=reference"]
out = "/work/runs/sweeps/mqar_cpu"
assert not os.path.exists(out), out
plan = spec.plan("mqar", SETS, seeds=[0], learning_rates=[2.2e-3])
os.makedirs(os.path.join(out, "runs"))
store.write_sweep(out, plan.to_json())
for source in ("a", "b", "c", "d"):
  for name in os.listdir(f"/work/runs/sweeps/mqar_{source}/runs"):
    path = f"/work/runs/sweeps/mqar_{source}/runs/{name}"
    if (store.read_status(path) or {}).get("status") == "done":
      shutil.copytree(path, os.path.join(out, "runs", name), ignore=shutil.ignore_patterns("checkpoints"))
print(sorted(os.listdir(os.path.join(out, "runs"))))
