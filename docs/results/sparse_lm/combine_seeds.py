"""The sparse_lm sweep (seed 0) and its seed-1 extension in one directory for one report: sweep.json planned from
the experiment's SWEEP (seeds 0 and 1), the finished run directories of both copied in (unfinished ones left out,
so the report lists them as not run)."""
import json, os, shutil, sys
from sparseformer.train.sweeps import spec, store
out = "/work/runs/sweeps/sparse_lm_combined"
assert not os.path.exists(out), out
plan = spec.plan("sparse_lm")
os.makedirs(os.path.join(out, "runs"))
store.write_sweep(out, plan.to_json())
for source in ("/work/runs/sweeps/sparse_lm", "/work/runs/sweeps/sparse_lm_seed1"):
  for name in os.listdir(os.path.join(source, "runs")):
    path = os.path.join(source, "runs", name)
    if (store.read_status(path) or {}).get("status") == "done":
      shutil.copytree(path, os.path.join(out, "runs", name), ignore=shutil.ignore_patterns("checkpoints"))
print(sorted(os.listdir(os.path.join(out, "runs"))))
