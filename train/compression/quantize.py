"""Post-training quantization of a DecoderLM through qwix (PtqProvider), round-to-nearest or GPTQ.

The flow (qwix's offline NNX recipe): an abstract PTQ model, `nnx.eval_shape(qwix.quantize_model(DecoderLM,
PtqProvider(rules), tokens))`, records for every intercepted weight how it is quantized (a `WithAux` holding the
qtype, channel axes and tiles of its einsum); `qwix.quantize_params` then quantizes the float checkpoint into
that structure, and `nnx.merge` gives a model whose einsums run on the quantized arrays. MoE expert stacks are
not reached by interception (layers/moe/layer.py gathers them); they get a WithAux of their own here (scales per
expert and output channel, tiles along the input) and are dequantized where the dispatch reads them.

GPTQ (Frantar et al., 2022, Alg. 1): qwix.contrib.gptq collects H = sum X^T X of every intercepted weight's input
over calibration batches, then quantizes column by column with error compensation (damping 0.01 of mean diag H,
blocks of 128 columns). Weights it cannot calibrate (two contracted axes, e.g. attention's wo [N, H, D]; MoE
stacks) fall back to round-to-nearest; `quantize_model` reports which.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.layers.moe import MoEFeedForward
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train.compression import quantize_config as qc


def _example_tokens(config: ModelConfig, seq_len: int) -> jax.Array:
  return jnp.zeros((1, seq_len), jnp.int32)


def _quantize_moe_stacks(model: nnx.Module, scheme: qc.Scheme) -> None:
  """Puts a WithAux (how to quantize) in place of every MoE expert / shared-expert Param of `model`, in place."""
  from qwix._src.core import qarray  # pylint: disable=import-outside-toplevel
  from qwix._src.providers import ptq  # pylint: disable=import-outside-toplevel
  from qwix._src.utils import flax_util  # pylint: disable=import-outside-toplevel

  for _, module in nnx.iter_graph(model):
    if not isinstance(module, MoEFeedForward):
      continue
    for name in ("w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down"):
      param = getattr(module, name)
      if param is None:
        continue
      ndim = len(param.shape)  # [E, in, out] or [in, out]: channels are every axis but the input one
      contracted = ndim - 2
      tiles = {contracted: scheme.tile_size} if scheme.tile_size else {}
      how = qarray.HowToQuantize(qtype=scheme.weight_qtype, channelwise_axes=tuple(
          axis for axis in range(ndim) if axis != contracted), tiled_axes=tiles)
      quantized = ptq.WithAux(qarray.quantize(param[...], how), how)
      setattr(module, name, jax.tree.map(lambda value, p=param: flax_util.update_boxed(p, value=value), quantized))


def abstract_quantized_model(config: ModelConfig, scheme: qc.Scheme, *, seq_len: int,
                             quantize_embeddings: bool = False) -> nnx.Module:
  """The PTQ model with abstract (ShapeDtypeStruct) leaves: its structure says how each weight is quantized."""
  import qwix  # pylint: disable=import-outside-toplevel

  provider = qwix.PtqProvider(qc.qwix_rules(config, scheme, quantize_embeddings=quantize_embeddings))

  def build():
    model = qwix.quantize_model(DecoderLM(config, rngs=nnx.Rngs(0)), provider, _example_tokens(config, seq_len))
    _quantize_moe_stacks(model, scheme)
    return model

  return nnx.eval_shape(build)


def check_tiles(config: ModelConfig, scheme: qc.Scheme) -> None:
  """Group sizes must divide every contracted width (d_model, head_dim, MLP / expert hidden)."""
  if not scheme.tile_size:
    return
  widths = {"model.d_model": config.d_model, "model.num_heads x head_dim": config.num_heads * config.resolved_head_dim}
  if "dense" in config.ffn_pattern:
    widths["model.mlp_hidden (resolved)"] = config.resolved_mlp_hidden
  if "moe" in config.ffn_pattern:
    widths["model.moe.routed_hidden"] = config.moe.routed_hidden
  for name, width in widths.items():
    if width % scheme.tile_size:
      raise ValueError(f"Group size {scheme.tile_size} does not divide {name}={width}; use a per-channel scheme "
                       "(int8, int4) or a model whose widths are multiples of the group size.")


@dataclasses.dataclass
class Quantized:
  """A quantized model and how it was made."""

  graphdef: nnx.GraphDef
  params: nnx.State  # Params, quantized ones as WithAux(QArray)
  extra: nnx.State  # the non-Param state, copied from the float model
  gptq_weights: list[str]  # weights whose rounding GPTQ chose (empty without GPTQ)
  unquantized: list[str]  # matrix weights the scheme meant to quantize but left float (should be empty)

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params, self.extra)


def gptq_hessians(config: ModelConfig, scheme: qc.Scheme, float_model: nnx.Module, batches, *,
                  quantize_embeddings: bool = False) -> dict:
  """qwix GPTQ statistics (running mean of X^T X per calibrated weight) over calibration `batches` of tokens."""
  import qwix  # pylint: disable=import-outside-toplevel
  from qwix.contrib import gptq  # pylint: disable=import-outside-toplevel

  rules = qc.qwix_rules(config, scheme, quantize_embeddings=quantize_embeddings, rule_type=gptq.GptqRule)
  tokens = [np.asarray(batch, np.int32) for batch in batches]
  if not tokens:
    raise ValueError("GPTQ needs at least one calibration batch; raise --calibration-batches.")
  model = qwix.quantize_model(float_model, gptq.GptqCalibrationProvider(rules), tokens[0][:1],
                              skip_nnx_init=False)
  model.eval()
  for batch in tokens:
    model(jnp.asarray(batch))
  return nnx.to_pure_dict(nnx.state(model, qwix.QuantStat))


def quantize_model(config: ModelConfig, scheme: qc.Scheme, params: nnx.State, extra: nnx.State, *, seq_len: int,
                   calibration=None, quantize_embeddings: bool = False) -> Quantized:
  """Quantizes float `params` (an nnx.State of Params) with `scheme`; `calibration` (token batches) for GPTQ."""
  import qwix  # pylint: disable=import-outside-toplevel

  check_tiles(config, scheme)
  abstract = abstract_quantized_model(config, scheme, seq_len=seq_len, quantize_embeddings=quantize_embeddings)
  float_pure = nnx.to_pure_dict(params)
  gptq_weights = []
  if scheme.gptq:
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))))
    float_model = nnx.merge(graphdef, params, extra)
    stats = gptq_hessians(config, scheme, float_model, calibration, quantize_embeddings=quantize_embeddings)
    gptq_weights = sorted({qc.parameter_path(path[:-2] + (path[-2].removesuffix("_gptq"),))
                           for path in _flat(stats) if str(path[-2]).endswith("_gptq")})
    quantized_pure = _gptq_quantize_params(float_pure, abstract, stats)
  else:
    quantized_pure = qwix.quantize_params(float_pure, abstract)
  graphdef, abstract_params, abstract_extra = nnx.split(abstract, nnx.Param, ...)
  del abstract_extra
  nnx.replace_by_pure_dict(abstract_params, quantized_pure)  # in place: the abstract leaves become arrays
  result = Quantized(graphdef, abstract_params, extra, gptq_weights, [])
  result.unquantized = unquantized_matrices(result, quantize_embeddings=quantize_embeddings)
  return result


def _gptq_quantize_params(float_pure: dict, abstract: nnx.Module, stats: dict) -> dict:
  """qwix.contrib.gptq.quantize_params with our compiled GPTQ loop (gptq.py) for each calibrated weight."""
  from qwix.contrib import calibration as qwix_calibration  # pylint: disable=import-outside-toplevel

  from sparseformer.train.compression import gptq  # pylint: disable=import-outside-toplevel

  def quantize_fn(context):
    hessian = context.calibration_stats["hessian"]
    quantized = gptq.quantize_weight(context.weight, hessian, context.how, damping=0.01)
    return context.abs_w.replace(array=context.restore_shape(quantized))

  return qwix_calibration.quantize_params_with_calibration(float_pure, abstract, stats, "_gptq", quantize_fn)


def _flat(tree: dict, prefix: tuple = ()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def stored_leaves(quantized: Quantized, *, params_only: bool = False) -> dict[str, jax.Array]:
  """{'blocks/0/ffn/w_up/array/qvalue': array, ...}: every array of the quantized params and the extra state."""
  states = (quantized.params,) if params_only else (quantized.params, quantized.extra)
  return {qc.parameter_path(path): value for state in states for path, value in _flat(nnx.to_pure_dict(state)).items()}


def fill(abstract: nnx.State, leaves: dict) -> nnx.State:
  """`abstract` (an nnx.State of ShapeDtypeStructs) with every leaf taken from `leaves` by path, checked."""
  pure = nnx.to_pure_dict(abstract)
  for path, expected in _flat(pure).items():
    name = qc.parameter_path(path)
    if name not in leaves:
      raise ValueError(f"The stored quantized weights lack {name}; the workdir does not match its config.")
    value = leaves[name]
    if tuple(value.shape) != tuple(expected.shape) or value.dtype != expected.dtype:
      raise ValueError(f"Stored {name} is {value.dtype}{list(value.shape)}, the model expects "
                       f"{expected.dtype}{list(expected.shape)}; the workdir does not match its config.")
    node = pure
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  nnx.replace_by_pure_dict(abstract, pure)
  return abstract


def unquantized_matrices(quantized: Quantized, *, quantize_embeddings: bool) -> list[str]:
  """Matrix weights the scheme covers (quantize_config.is_matrix_weight) that are still plain float arrays."""
  left = []
  for path, value in stored_leaves(quantized, params_only=True).items():
    if "/array/" in path or path.endswith(("_scale", "_zero_point")):
      continue
    if qc.is_matrix_weight(path, np.ndim(value), quantize_embeddings=quantize_embeddings):
      left.append(path)
  return sorted(left)


def weight_memory(float_params: nnx.State, leaves: dict, stored: dict) -> dict[str, int]:
  """Bytes of the weights the scheme quantized, in the checkpoint's dtype and as stored (qvalues packed + scales),
  and of the whole model both ways (parameters only; the stored model also holds the small non-Param state)."""
  float_leaves = {qc.parameter_path(path): value for path, value in _flat(nnx.to_pure_dict(float_params)).items()}
  covered = {path.rsplit("/array/", 1)[0] for path in leaves if "/array/" in path}
  covered_stored = [path for path in stored if path.rsplit("/array/", 1)[0] in covered]
  param_paths = [path for path in stored if path in float_leaves or path.rsplit("/array/", 1)[0] in covered]
  nbytes = lambda value: int(np.prod(value.shape, dtype=np.int64)) * np.dtype(value.dtype).itemsize  # noqa: E731
  return {"covered_float_bytes": sum(nbytes(float_leaves[path]) for path in covered),
          "covered_stored_bytes": int(sum(stored[path].nbytes for path in covered_stored)),
          "model_float_bytes": sum(nbytes(value) for value in float_leaves.values()),
          "model_stored_bytes": int(sum(stored[path].nbytes for path in param_paths)),
          "covered_parameters": sum(int(np.prod(float_leaves[path].shape)) for path in covered)}
