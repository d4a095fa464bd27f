"""Quantization-aware training (train/compression/qat.py): it trains, and its forward pass is the float model's on
fake-quantized weights."""

import dataclasses

import numpy as np
import pytest

qwix = pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sparseformer.models.decoder import DecoderLM  # noqa: E402
from sparseformer.train import trainer  # noqa: E402
from sparseformer.train.compression import qat  # noqa: E402
from sparseformer.train.compression.quantize_config import QuantizationConfig  # noqa: E402


def _qat_config(tiny_config, scheme="int8", **train_changes):
  config = tiny_config(**train_changes)
  return dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                               quantization=QuantizationConfig(scheme=scheme)))


@pytest.mark.slow  # a full trainer run; the QAT forward (fake-quantized weights) is held exactly by the next test
def test_qat_trains(tiny_config, tmp_path, read_losses):
  workdir = str(tmp_path / "qat")
  trainer.train(_qat_config(tiny_config, steps=12, learning_rate=1e-2), workdir)
  losses = read_losses(workdir)
  assert all(np.isfinite(value) for value in losses.values())
  assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.1, losses


def test_qat_forward_is_fake_quantized_weights(tiny_config, seed):
  """int8 QAT forward == the float model with every covered weight replaced by dequantize(quantize(w)) (absmax,
  one scale per output channel of its einsum), computed without qwix interception."""
  from qwix._src.core import qarray  # pylint: disable=import-outside-toplevel

  config = _qat_config(tiny_config)
  model = DecoderLM(config.model, rngs=nnx.Rngs(seed))
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  from sparseformer.train import state as state_lib  # pylint: disable=import-outside-toplevel

  setup = state_lib.setup_model(config.model, lambda p: __import__("optax").sgd(0.1), _mesh(), 0)
  qat_graphdef = qat.wrap_setup(setup, config).graphdef
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (2, 32)), jnp.int32)
  # Under jit, as in training: qwix finds each weight through the traced cast (eagerly it can only guess by shape).
  qat_logits = jax.jit(lambda p, e, t: nnx.merge(qat_graphdef, p, e)(t)[0])(params, extra, tokens)

  float_logits, _ = model(tokens)
  fake = nnx.merge(graphdef, params, extra, copy=True)  # its own Variables: `model` keeps the float weights
  contracted = {"wq": 0, "wk": 0, "wv": 0, "wo": (0, 1), "w_gate": 0, "w_up": 0, "w_down": 0}
  for _, module in nnx.iter_graph(fake):
    for name, axes in contracted.items():
      param = getattr(module, name, None)
      if isinstance(param, nnx.Param):
        axes = axes if isinstance(axes, tuple) else (axes,)
        how = qarray.HowToQuantize(qtype="int8", channelwise_axes=tuple(
            a for a in range(param[...].ndim) if a not in axes))
        param[...] = qarray.dequantize(qarray.quantize(param[...], how))
  fake_logits, _ = fake(tokens)
  qat_logits, fake_logits, float_logits = (np.asarray(x, np.float64) for x in (qat_logits, fake_logits, float_logits))
  assert not np.isnan(qat_logits).any()
  np.testing.assert_allclose(qat_logits, fake_logits, atol=2e-5, rtol=1e-4)
  assert np.abs(qat_logits - float_logits).max() > 1e-4  # the quantization is really applied


def _mesh():
  from sparseformer.train.mesh import MeshConfig, make_mesh  # pylint: disable=import-outside-toplevel

  return make_mesh(MeshConfig())


def test_unknown_qat_scheme_rejected():
  with pytest.raises(ValueError, match="train.quantization.scheme='nf4' is not a QAT scheme"):
    QuantizationConfig(scheme="nf4")
