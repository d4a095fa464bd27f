"""Running a quantized workdir (written by `sparseformer quantize`): `eval` and `sample` go through here.

Loading re-applies the scheme named in quantization.json: the quantized model's structure is rebuilt abstractly
(quantize.abstract_quantized_model, no weights computed) and filled with the stored arrays, so the model that
runs is the one that was evaluated when it was written. Sampling recomputes the visible window per token through
the model's (qwix-intercepted) forward pass: the KV-cache decode methods are not intercepted by qwix.
"""

import jax
import numpy as np
from flax import nnx

from sparseformer.train import data as data_lib
from sparseformer.train import sharding as sharding_lib
from sparseformer.train import state as state_lib
from sparseformer.train import tokenizer, trainer
from sparseformer.train.compression import quantize, quantize_config, quantize_store
from sparseformer.train.config import RunConfig
from sparseformer.train.mesh import make_mesh
from sparseformer.train.sample import sample_tokens


def open_quantized(config: RunConfig, workdir: str) -> trainer.Run:
  """A trainer.Run (no optimizer, no checkpointer) holding the quantized model of `workdir`."""
  marker, leaves = quantize_store.load(workdir)
  scheme = quantize_config.get_scheme(marker["scheme"], field=f"{quantize_store.MARKER} scheme")
  abstract = quantize.abstract_quantized_model(config.model, scheme, seq_len=config.data.seq_len,
                                               quantize_embeddings=marker.get("quantize_embeddings", False))
  graphdef, params, extra = nnx.split(abstract, nnx.Param, ...)
  params, extra = quantize.fill(params, leaves), quantize.fill(extra, leaves)
  mesh = make_mesh(config.mesh)
  setup = state_lib.ModelSetup(graphdef=graphdef, optimizer=None, state_shardings=None, abstract_state=None)
  state = state_lib.TrainState(step=np.int32(marker["step"]), params=params, opt_state=None, extra=extra)
  return trainer.Run(config, workdir, mesh, setup, state, checkpointer=None, data_state=None,
                     batch_sharding=sharding_lib.batch_sharding(mesh))


def evaluate_workdir(config: RunConfig, workdir: str) -> dict:
  """`sparseformer eval` of a quantized workdir: the validation metrics of its quantized model."""
  corpus = data_lib.load_source(config.data)
  run = open_quantized(config, workdir)
  val_sets = trainer._global_val_sets(config, corpus, run)  # pylint: disable=protected-access
  if not val_sets[""]:
    raise ValueError("The validation split holds no full batch; raise data.val_fraction or data.num_val_batches.")
  return {"step": int(run.state.step), "scheme": quantize_store.read_marker(workdir)["scheme"],
          **trainer.evaluate(run, val_sets)}


def sample(args) -> int:
  """`sparseformer sample` of a quantized workdir (one prompt; --prompts-file and --top-p are not supported)."""
  if getattr(args, "prompts_file", None) or getattr(args, "top_p", 1.0) != 1.0:
    raise ValueError("A quantized workdir samples one --prompt with --temperature / --top-k; drop --prompts-file "
                     "and --top-p.")
  config = trainer.load_run_config(args.workdir)
  run = open_quantized(config, args.workdir)
  with jax.set_mesh(run.mesh):
    ids = sample_tokens(run.model(), tokenizer.encode(args.prompt or ""), num_tokens=args.tokens,
                        window=config.data.seq_len, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
  print(tokenizer.decode(ids))
  return 0
