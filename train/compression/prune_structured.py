"""Structured pruning that shrinks the model, so it saves compute in JAX: MoE experts and attention heads.

- Experts: in every MoE layer the `drop` experts with the least routed gate mass on the calibration batches
  are removed (their w_gate / w_up / w_down slices, their router column and balancing state). The router's
  softmax then runs over the survivors, i.e. it is renormalised over them; with gate_norm topk or
  softmax_topk a token that never picked a dropped expert gets exactly the gates it had (sigmoid scores
  are per expert and need no renormalising). The model has E - drop experts: model.moe.num_experts shrinks.
  Lu et al. 2024 ("Not All Experts are Equal", arXiv 2402.14800) enumerate subsets by reconstruction loss;
  routed mass is the frequency-and-weight criterion they compare against.
- Heads: in every layer the `drop` query heads with the smallest mean output norm ||o_h W_o,h||_2 on the
  calibration tokens are removed (wq columns, wo rows; with one KV head per query head, their k / v heads
  too). An activation-based form of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?").
  Under GQA every KV group must keep the same number of query heads, so `drop` must be a multiple of
  model.num_kv_heads and is taken evenly from each group. model.num_heads shrinks and model.head_dim is
  pinned to the old width.

`slice_tree` applies the same cut to params, optimizer moments and non-Param state, matched by path name.
"""

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from sparseformer.layers.attention import kinds
from sparseformer.layers.attention.routed import ROUTED_KINDS
from sparseformer.models.config import ModelConfig
from sparseformer.train.compression import prune_masks


def check_expert_pruning(config: ModelConfig, drop: int) -> ModelConfig:
  """The model config after dropping `drop` experts per MoE layer; ValueError naming --experts otherwise."""
  if "moe" not in config.ffn_pattern:
    raise ValueError("--experts: this model has no MoE layer (model.ffn_pattern has no 'moe').")
  moe = config.moe
  if moe.granularity != 1:
    raise ValueError(f"--experts: fine-grained experts (model.moe.granularity={moe.granularity}) are not "
                     "supported; prune a model with granularity 1.")
  if moe.routing != "token_choice":
    raise ValueError(f"--experts: routed mass is measured for token_choice routing only "
                     f"(model.moe.routing={moe.routing!r}).")
  left = moe.num_experts - drop
  if drop < 1 or left < moe.top_k:
    raise ValueError(f"--experts {drop}: drop at least 1 and keep at least model.moe.top_k={moe.top_k} of the "
                     f"{moe.num_experts} experts (--experts between 1 and {moe.num_experts - moe.top_k}).")
  if left % moe.n_groups:
    raise ValueError(f"--experts {drop}: the {left} experts left do not split into model.moe.n_groups="
                     f"{moe.n_groups} equal groups; drop a count that leaves a multiple of {moe.n_groups}.")
  return dataclasses.replace(config, moe=dataclasses.replace(moe, num_experts=left))


def check_head_pruning(config: ModelConfig, drop: int, seq_len: int) -> ModelConfig:
  """The model config after dropping `drop` query heads per layer; ValueError naming --heads otherwise."""
  heads, kv_heads = config.num_heads, config.num_kv_heads
  if drop < 1 or drop >= heads:
    raise ValueError(f"--heads {drop}: drop between 1 and {heads - 1} of the model.num_heads={heads} heads.")
  grouped = kv_heads != heads
  if grouped and drop % kv_heads:
    raise ValueError(f"--heads {drop}: under GQA (model.num_heads={heads}, model.num_kv_heads={kv_heads}) every "
                     f"KV group must keep the same number of query heads, so --heads must be a multiple of "
                     f"{kv_heads}.")
  for layer in range(config.num_layers):
    kind = config.attention_kind(layer)
    if kind in ROUTED_KINDS:
      raise ValueError(f"--heads: layer {layer} is content-routed ({kind!r}), whose routing parameters are per "
                       "head; head pruning supports global and static sparse kinds.")
    if kind != "global":
      layout = kinds.build_layout(kind, config.attention, seq_len=seq_len, num_heads=heads, layer=layer)
      if layout.num_heads != 1:
        raise ValueError(f"--heads: layer {layer} ({kind!r}) has a different layout per head; head pruning "
                         "supports kinds whose layout all heads share.")
  left = heads - drop
  return dataclasses.replace(config, num_heads=left, num_kv_heads=kv_heads if grouped else left,
                             head_dim=config.resolved_head_dim)


def keep_highest(scores: np.ndarray, count: int) -> np.ndarray:
  """Sorted indices of the `count` highest scores (ties: the lower index is kept)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  return np.sort(order[:count])


def expert_slices(stats: dict, config: ModelConfig, drop: int) -> dict[str, tuple[int, np.ndarray]]:
  """{name: (axis, kept indices)} removing the `drop` least-routed experts of every MoE layer."""
  slices = {}
  for layer in range(config.num_layers):
    if config.ffn_kind(layer) != "moe":
      continue
    prefix = f"blocks/{layer}/ffn"
    keep = keep_highest(stats[f"{prefix}#expert_mass"], config.moe.num_experts - drop)
    for name in ("w_gate", "w_up", "w_down", "router/bias", "router/load"):
      slices[f"{prefix}/{name}"] = (0, keep)
    slices[f"{prefix}/router/weight"] = (1, keep)
  return slices


def head_slices(stats: dict, config: ModelConfig, drop: int) -> dict[str, tuple[int, np.ndarray]]:
  """{name: (axis, kept indices)} removing the `drop` lowest-importance query heads of every layer (evenly
  from each KV group under GQA; with their K / V heads when every query head has its own)."""
  heads, kv_heads = config.num_heads, config.num_kv_heads
  group = heads // kv_heads
  slices = {}
  for layer in range(config.num_layers):
    prefix = f"blocks/{layer}/attention"
    importance = np.asarray(stats[f"{prefix}#head_norm"], np.float64)
    if kv_heads == heads:
      keep = keep_highest(importance, heads - drop)
      slices[f"{prefix}/wk"] = slices[f"{prefix}/wv"] = (1, keep)
    else:  # query head n belongs to KV group n // group (layers/attention/dense.py)
      per_group = group - drop // kv_heads
      keep = np.concatenate([start + keep_highest(importance[start:start + group], per_group)
                             for start in range(0, heads, group)])
    slices[f"{prefix}/wq"] = (1, keep)
    slices[f"{prefix}/wo"] = (0, keep)
  return slices


def slice_tree(tree, slices: dict[str, tuple[int, np.ndarray]]):
  """`tree` (params, optimizer state, non-Param state, a whole TrainState) with every leaf whose path name
  (prune_masks.path_name) is in `slices` cut to the kept indices along its axis."""

  def cut(path, leaf):
    spec = slices.get(prune_masks.path_name(path))
    if spec is None:
      return leaf
    axis, keep = spec
    return np.take(np.asarray(leaf), keep, axis=axis)

  return jax.tree.map_with_path(cut, tree)


def eval_forward(graphdef):
  """Jitted eval-mode forward (params, extra, tokens) -> logits of the model `graphdef` describes."""

  @jax.jit
  def forward(params, extra, tokens):
    model = nnx.merge(graphdef, params, extra, copy=True)
    model.eval()
    return model(tokens)[0]

  return forward


def forward_seconds(models, tokens, repeats: int = 7) -> list[float]:
  """Median wall time of the jitted eval forward pass on `tokens` for each (graphdef, params, extra) in
  `models`, measured side by side (the models alternate within each repeat, after one compile-and-run each)."""

  forwards = [eval_forward(graphdef) for graphdef, _, _ in models]
  for forward, (_, params, extra) in zip(forwards, models):
    forward(params, extra, tokens).block_until_ready()
  times = [[] for _ in models]
  for _ in range(repeats):
    for index, (forward, (_, params, extra)) in enumerate(zip(forwards, models)):
      start = time.perf_counter()
      forward(params, extra, tokens).block_until_ready()
      times[index].append(time.perf_counter() - start)
  return [float(np.median(seconds)) for seconds in times]
