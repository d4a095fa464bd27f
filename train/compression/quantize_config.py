"""Quantization schemes (PTQ `sparseformer quantize --scheme`, QAT `train.quantization.scheme`) and qwix rules.

A scheme fixes the weight type, the granularity of its scales (per output channel, or per group of `tile_size`
inputs: "g128"), whether activations are quantized too (dynamic range, per token) and whether GPTQ (Frantar et
al., 2022) chooses the rounding. Integer schemes are symmetric absmax; nf4 is QLoRA's NormalFloat-4 (Dettmers et
al., 2023) with absmax scales per group of 64.

What is quantized: every matmul weight inside the transformer blocks (attention q/k/v/o, the routed kinds' own
projections, dense SwiGLU, MoE expert and shared-expert stacks). Kept in their original dtype, as in GPTQ / AWQ
practice: the embedding table and the output head (unless `quantize_embeddings`), norms, biases and MoE routers.
"""

import dataclasses
import re

from sparseformer.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One named quantization recipe."""

  weight_qtype: str  # qwix qtype of the weights: int8 | int4 | int2 | nf4 | float8_e4m3fn
  tile_size: int | None = None  # inputs per scale group on the contracted axis; None = one scale per channel
  act_qtype: str | None = None  # dynamic-range activation type (W8A8), None = weight-only
  gptq: bool = False  # GPTQ rounding from calibration Hessians instead of round-to-nearest
  bits: int = 8  # bits per stored weight value


SCHEMES = {
    "int8": Scheme("int8", bits=8),
    "int4": Scheme("int4", bits=4),
    "int4-g128": Scheme("int4", tile_size=128, bits=4),
    "nf4": Scheme("nf4", tile_size=64, bits=4),
    "fp8": Scheme("float8_e4m3fn", act_qtype="float8_e4m3fn", bits=8),
    "w8a8": Scheme("int8", act_qtype="int8", bits=8),
    "gptq-int4": Scheme("int4", tile_size=128, gptq=True, bits=4),
    "int2-g64": Scheme("int2", tile_size=64, bits=2),
    "gptq-int2-g64": Scheme("int2", tile_size=64, gptq=True, bits=2),
}
QAT_SCHEMES = ("none", "int8", "int4", "int4-g128")  # weight-only fake quantization with a straight-through backward


def get_scheme(name: str, *, field: str = "--scheme") -> Scheme:
  """The Scheme called `name`; a ValueError naming `field` and the choices otherwise."""
  if name not in SCHEMES:
    raise ValueError(f"{field}={name!r} is not a quantization scheme; choose one of {', '.join(SCHEMES)}.")
  return SCHEMES[name]


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
  """Quantization-aware training (QAT): the forward pass sees quantized weights, the backward pass is straight
  through (qwix QtProvider with bwd_qtype=None). The checkpoint keeps float weights, so PTQ of the same scheme
  afterwards (`sparseformer quantize`) serves what QAT trained for."""

  scheme: str = "none"  # none | int8 | int4 | int4-g128 (weight-only fake quantization in the forward pass)
  quantize_embeddings: bool = False  # also fake-quantize the embedding table / output head

  def __post_init__(self):
    if self.scheme not in QAT_SCHEMES:
      raise ValueError(f"train.quantization.scheme={self.scheme!r} is not a QAT scheme; choose one of "
                       f"{QAT_SCHEMES} (PTQ-only schemes such as nf4, fp8, w8a8, gptq-int4 go to "
                       "`sparseformer quantize --scheme`).")


def moe_layers(config: ModelConfig) -> list[int]:
  return [layer for layer in range(config.num_layers) if config.ffn_kind(layer) == "moe"]


def qwix_rules(config: ModelConfig, scheme: Scheme, *, quantize_embeddings: bool = False, rule_type=None):
  """qwix rules for a DecoderLM (first match wins; module paths are like `blocks/3/attention`).

  MoE layers are excluded from interception (their dispatch indexes and gathers the expert stacks, which qwix
  cannot follow); `quantize.py` quantizes their stacks directly. `rule_type` is qwix.QuantizationRule by
  default (QtRule for QAT, GptqRule for GPTQ calibration).
  """
  import qwix  # pylint: disable=import-outside-toplevel

  rule_type = rule_type or qwix.QuantizationRule
  keep = [rule_type(module_path=r".*/router(/.*)?")]  # weight_qtype None = left as it is
  keep += [rule_type(module_path=rf"blocks/{layer}/ffn(/.*)?") for layer in moe_layers(config)]
  quantized = dict(weight_qtype=scheme.weight_qtype, act_qtype=scheme.act_qtype, tile_size=scheme.tile_size)
  rules = keep + [rule_type(module_path=r"blocks/.*", **quantized)]
  if quantize_embeddings:
    rules.append(rule_type(module_path=r"(embedding)?", **quantized))  # "" is the model itself (lm_head)
  return rules


def parameter_path(path: tuple) -> str:
  """'blocks/0/attention/wq' from an nnx state path."""
  return "/".join(str(part) for part in path)


def is_matrix_weight(path: str, ndim: int, *, quantize_embeddings: bool) -> bool:
  """Whether the scheme quantizes the parameter at `path` (the coverage check of quantize.py)."""
  if ndim < 2 or re.search(r"(^|/)router(/|$)", path):
    return False
  if path.startswith("blocks/"):
    return not re.search(r"(_bias|_b\d*|_pe|scale)$", path)
  return quantize_embeddings and path in ("embedding/table", "lm_head")
