"""One tiny MoE model shared by the pruning tests (initialised and probed once per process: one compile)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.layers.moe.config import MoEConfig
from sparseformer.models.config import ModelConfig
from sparseformer.models.decoder import DecoderLM
from sparseformer.train.compression import prune, prune_masks, prune_structured

# Einsum dispatch compiles fastest; capacity 4x the balanced share drops nothing at 32 tokens.
CONFIG = ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=32, mlp_hidden=64,
                     ffn_pattern=("dense", "moe"),
                     moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, selection_bias=True,
                                   dispatch="capacity_einsum", capacity_factor=4.0))
DEAD_EXPERTS = (1, 3)  # selection bias -1e4: never picked, so zero routed mass
DEAD_HEADS = {0: (1, 2), 1: (0, 3)}  # layer -> query heads whose wo rows are zero: no output, zero importance
SELECTION_BIAS = np.where(np.isin(np.arange(4), DEAD_EXPERTS), -1e4, 0.0).astype(np.float32)


def graphdef_of(config: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]


def forward_of(graphdef):
  """Jitted eval forward (params, extra, tokens) -> logits (the product's, so tests time what prune reports)."""
  return prune_structured.eval_forward(graphdef)


@functools.cache
def probe():
  """(params, extra, tokens, outputs): the calibration statistics, the walked and the real logits, and block
  activations of CONFIG's model (seed 0, DEAD_EXPERTS biased out, DEAD_HEADS' outputs zeroed), all from one jitted pass, as float64."""
  graphdef = graphdef_of(CONFIG)
  params, extra = jax.jit(lambda: nnx.split(DecoderLM(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:])()
  extra = jax.tree.map_with_path(lambda path, leaf: jnp.asarray(SELECTION_BIAS) if prune_masks.path_name(
      path).endswith("router/bias") else leaf, extra)
  dead_rows = {f"blocks/{layer}/attention/wo": np.array(heads) for layer, heads in DEAD_HEADS.items()}
  params = jax.tree.map_with_path(lambda path, leaf: leaf.at[dead_rows[prune_masks.path_name(path)]].set(0.0)
                                  if prune_masks.path_name(path) in dead_rows else leaf, params)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CONFIG.vocab_size)

  @jax.jit
  def run(params, extra, tokens):
    model = nnx.merge(graphdef, params, extra, copy=True)
    model.eval()
    stats, residuals = prune.block_statistics(model, tokens)
    positions = jnp.arange(tokens.shape[1])
    block0, block1 = model.blocks[0], model.blocks[1]
    h0 = block0.attention_norm(model.embedding(tokens))
    attended0, _ = block0.attention(h0, positions)
    attended1, _ = block1.attention(block1.attention_norm(residuals[0]), positions)
    return dict(stats=stats, logits=model(tokens)[0], walked=model.embedding.attend(model.final_norm(residuals[-1])),
                h0=h0, attended0=attended0, ffn_in0=block0.ffn_norm(model.embedding(tokens) + attended0),
                heads0=prune.attention_head_outputs(block0.attention, h0, positions),
                moe_in=block1.ffn_norm(residuals[0] + attended1))

  outputs = jax.tree.map(lambda a: np.asarray(a, np.float64), run(params, extra, tokens))
  return params, extra, tokens, outputs
