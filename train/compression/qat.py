"""Quantization-aware training: `--set train.quantization.scheme=int8|int4|int4-g128` (qwix QtProvider).

The run's graph becomes `qwix.quantize_model(DecoderLM, QtProvider(rules))`: every intercepted einsum quantizes
its weight on the fly (symmetric absmax, the scheme's granularity) and runs on the fake-quantized values; the
backward pass is straight through (bwd_qtype=None: the gradient of round() is taken as 1, Bengio et al., 2013),
so the float parameters, optimizer and checkpoint are unchanged and a float checkpoint can be fine-tuned. The
same rules as PTQ (quantize_config.qwix_rules): MoE layers (their experts and routers) stay float in QAT.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.models.decoder import DecoderLM
from sparseformer.train.compression import quantize_config as qc
from sparseformer.train.config import RunConfig
from sparseformer.train.state import ModelSetup


def qat_rules(config: RunConfig):
  import qwix  # pylint: disable=import-outside-toplevel

  scheme = qc.get_scheme(config.train.quantization.scheme, field="train.quantization.scheme")
  return qc.qwix_rules(config.model, scheme, quantize_embeddings=config.train.quantization.quantize_embeddings,
                       rule_type=qwix.QtRule)


def wrap_setup(setup: ModelSetup, config: RunConfig) -> ModelSetup:
  """`setup` with the graph of the QAT model (same parameters, same state: checked)."""
  import qwix  # pylint: disable=import-outside-toplevel

  provider = qwix.QtProvider(qat_rules(config))
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  model = nnx.eval_shape(lambda: qwix.quantize_model(DecoderLM(config.model, rngs=nnx.Rngs(config.train.seed)),
                                                     provider, tokens))
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  expected = jax.tree.structure((setup.abstract_state.params, setup.abstract_state.extra))
  if jax.tree.structure((params, extra)) != expected:
    raise ValueError(f"train.quantization.scheme={config.train.quantization.scheme!r} changed the model's state "
                     "under qwix QtProvider; QAT needs a weight-only scheme with dynamic scales.")
  return dataclasses.replace(setup, graphdef=graphdef)
