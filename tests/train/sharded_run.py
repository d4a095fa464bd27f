"""Run by test_sharded.py in a fresh process with 8 simulated CPU devices (XLA_FLAGS set before JAX starts).

Mode `dense`: trains 3 steps on mesh data=2 x fsdp=2 x tensor=2 and on 1 device; mode `moe`: an MoE model on
expert=2 x data=2 x fsdp=2 and on 1 device; mode `routed`: one layer of each content-routed kind (moba, nsa, dsa,
dsa_block) on data=2 x fsdp=2 x tensor=2 and on 1 device. Prints a JSON report.
"""

import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from sparseformer.layers.attention.config import SparseAttentionConfig  # noqa: E402
from sparseformer.layers.attention.routed.config import DSAConfig, MoBAConfig, NSAConfig  # noqa: E402
from sparseformer.layers.moe import config as moe_config  # noqa: E402
from sparseformer.models.config import ModelConfig  # noqa: E402
from sparseformer.train import metrics as metrics_lib  # noqa: E402
from sparseformer.train import trainer  # noqa: E402
from sparseformer.train.config import RunConfig, TrainConfig  # noqa: E402
from sparseformer.train.data_config import DataConfig  # noqa: E402
from sparseformer.train.mesh import MeshConfig  # noqa: E402


def main(corpus: str, workdir: str, mode: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  base = RunConfig(
      name="sharded",
      model=ModelConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, max_seq_len=32),
      data=DataConfig(path=corpus, seq_len=32, batch_size=8, num_val_batches=1, val_fraction=0.1,
                      cache_dir=os.path.join(workdir, "cache")),
      train=TrainConfig(steps=3, warmup_steps=1, log_every=1, eval_every=0, sample_tokens=0, progress_bar=False,
                        peak_flops=1e11, grad_accum_steps=2))
  sharded = dataclasses.replace(base, mesh=MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
  moe_model = dataclasses.replace(base.model, ffn_pattern=("dense", "moe"),
                                  moe=moe_config.mixtral(num_experts=4, expert_hidden=64, block_size=16))
  moe_single = dataclasses.replace(base, model=moe_model)
  moe_sharded = dataclasses.replace(moe_single, mesh=MeshConfig(data=2, fsdp=2, tensor=1, expert=2))
  # Block sizes 8 on sequences of 32: 4 key blocks, so every kind really selects.
  routed_attention = SparseAttentionConfig(
      block_size=8, moba=MoBAConfig(block_size=8, topk=2, kv_major_tile=8),
      nsa=NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8, gate_hidden=8),
      dsa=DSAConfig(index_heads=2, index_head_dim=8, topk=8, block_size=8, key_chunk=16, query_chunk=16, rope_dim=4))
  routed_model = dataclasses.replace(base.model, num_layers=4, attention=routed_attention,
                                     attention_pattern=("moba", "nsa", "dsa", "dsa_block"))
  routed_single = dataclasses.replace(base, model=routed_model,
                                      train=dataclasses.replace(base.train, steps=2, grad_accum_steps=1))
  routed_sharded = dataclasses.replace(routed_single, mesh=sharded.mesh)
  report = {}
  runs = {"dense": (("sharded", sharded, None), ("single", base, jax.devices()[:1])),
          "moe": (("moe_sharded", moe_sharded, None), ("moe_single", moe_single, jax.devices()[:1])),
          "routed": (("routed_sharded", routed_sharded, None), ("routed_single", routed_single, jax.devices()[:1]))
          }[mode]
  for name, config, devices in runs:
    run_dir = os.path.join(workdir, name)
    report[name] = trainer.train(config, run_dir, devices=devices)
    report[name + "_losses"] = trainer.read_train_losses(run_dir)
    report[name + "_last_record"] = [r for r in metrics_lib.read_metrics(run_dir) if "train/loss" in r][-1]
  if mode in ("moe", "routed"):
    print("REPORT " + json.dumps(report), flush=True)
    return
  run = trainer.open_run(sharded, os.path.join(workdir, "sharded"), require_checkpoint=True)
  params = run.state.params
  examples = {"wq": params["blocks"][0]["attention"]["wq"], "wk": params["blocks"][0]["attention"]["wk"],
              "w_down": params["blocks"][1]["ffn"]["w_down"], "embedding": params["embedding"]["table"],
              "norm": params["final_norm"]["scale"]}
  report["specs"] = {name: [str(axis) for axis in var[...].sharding.spec] for name, var in examples.items()}
  report["shard_shapes"] = {name: list(var[...].addressable_shards[0].data.shape) for name, var in examples.items()}
  report["global_shapes"] = {name: list(var[...].shape) for name, var in examples.items()}
  mu = run.state.opt_state[1][0].mu["blocks"][0]["attention"]["wq"]
  report["adam_mu_spec"] = [str(axis) for axis in mu[...].sharding.spec]
  # The sharded checkpoint restored onto a single device (a different mesh) holds the same values.
  single_view = trainer.open_run(base, os.path.join(workdir, "sharded"), require_checkpoint=True,
                                 devices=jax.devices()[:1])
  report["restored_on_other_mesh_equal"] = all(
      bool((np.asarray(a) == np.asarray(b)).all()) for a, b in
      zip(jax.tree.leaves(run.state), jax.tree.leaves(single_view.state)))
  report["restored_on_other_mesh_devices"] = len(jax.tree.leaves(single_view.state.params)[0].devices())
  single_view.checkpointer.close()
  run.checkpointer.close()
  print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:4])
