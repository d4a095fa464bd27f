"""One-shot pruning of a trained model: the calibration pass and the masks of every prunable weight.

`calibration_stats` runs the model over calibration batches and sums, per prunable weight, the squares of
each input feature (Wanda's ||X_j||_2^2, Sun et al. 2023, eq. 1), plus what structured pruning ranks by:
each MoE expert's routed gate mass and each attention head's mean output norm. It walks the blocks itself
(the same modules, in DecoderLM's order) because the inputs of `wo` and of each expert are internal to the
layers; tests hold its block outputs equal to the model's forward pass.

`one_shot_masks` turns weights (and those statistics) into keep-masks: magnitude per matrix, Wanda per
output, N:M along the inputs (prune_scores.py).
"""

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.layers import rope, routing
from sparseformer.layers.attention.dense import causal_attention
from sparseformer.layers.moe import MoEFeedForward
from sparseformer.train.compression import prune_masks, prune_scores


def _sumsq(x: jax.Array) -> jax.Array:
  """[M, F] -> [1, F]: sum over tokens of each feature squared, in f32."""
  return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=0)[None]


def attention_head_outputs(attention, h: jax.Array, positions: jax.Array) -> jax.Array:
  """The per-head outputs [B*T, N, H] that `Attention.__call__` multiplies by `wo` (the module's own steps)."""
  batch = h.shape[0]
  tokens = einops.rearrange(h.astype(attention.dtype), "B T D -> (B T) D")
  q, k, v = (einops.rearrange(jnp.einsum("MD,DNH->MNH", tokens, w[...].astype(attention.dtype)),
                              "(B T) N H -> B T N H", B=batch) for w in (attention.wq, attention.wk, attention.wv))
  q = rope.apply_rope(q, positions, theta=attention.rope_theta)
  k = rope.apply_rope(k, positions, theta=attention.rope_theta)
  if attention.kind == "global":
    out = causal_attention(q, k, v)
  elif attention.routed is not None:
    out, _ = attention.routed(h.astype(attention.dtype), q, k, v, positions)
  else:
    out = attention._sparse_attention(q, k, v)  # pylint: disable=protected-access
  return einops.rearrange(out, "B T N H -> (B T) N H")


def _attention_stats(name: str, attention, h, positions, stats: dict) -> None:
  tokens = h.reshape(-1, h.shape[-1]).astype(attention.dtype)
  for weight in ("wq", "wk", "wv"):
    stats[f"{name}/{weight}"] = _sumsq(tokens)
  heads = attention_head_outputs(attention, h, positions)  # [M, N, H]
  stats[f"{name}/wo"] = _sumsq(heads.reshape(heads.shape[0], -1))
  contribution = jnp.einsum("MNH,NHD->MND", heads, attention.wo[...].astype(attention.dtype))
  stats[f"{name}#head_norm"] = jnp.sum(jnp.linalg.norm(contribution.astype(jnp.float32), axis=-1), axis=0)


def _dense_ffn_stats(name: str, ffn, h, stats: dict) -> None:
  tokens = h.reshape(-1, h.shape[-1]).astype(ffn.dtype)
  hidden = jax.nn.silu(tokens @ ffn.w_gate[...].astype(ffn.dtype)) * (tokens @ ffn.w_up[...].astype(ffn.dtype))
  stats[f"{name}/w_gate"] = stats[f"{name}/w_up"] = _sumsq(tokens)
  stats[f"{name}/w_down"] = _sumsq(hidden)


def _moe_stats(name: str, ffn: MoEFeedForward, h, stats: dict) -> None:
  """Per expert: input sums of squares over the (token, pick) pairs routed to it, and its gate mass.

  Counts every valid assignment, also those a capacity dispatch would drop (the statistics of the router's
  choice, not of the capacity).
  """
  config = ffn.config
  if config.routing != "token_choice":
    raise ValueError(f"{name}: the calibration pass supports token_choice MoE routing only "
                     f"(model.moe.routing={config.routing!r}).")
  x = h.reshape(-1, h.shape[-1]).astype(ffn.dtype)
  num_experts = config.routed_experts
  routed = routing.route_token_choice(
      ffn.router.logits(x), config.routed_top_k, score_function=config.score_function, gate_norm=config.gate_norm,
      route_scale=config.route_scale, bias=ffn.router.selection_bias(), n_groups=config.n_groups,
      topk_groups=config.topk_groups)
  picks = jax.nn.one_hot(routed.expert_index, num_experts) * routed.valid[..., None]  # [N, k, E]
  per_expert = picks.sum(1)  # [N, E] assignments of each token to each expert
  stats[f"{name}#expert_mass"] = jnp.einsum("nk,nke->e", routed.gates, picks)
  x2 = jnp.square(x.astype(jnp.float32))
  stats[f"{name}/w_gate"] = stats[f"{name}/w_up"] = jnp.einsum("ne,nd->ed", per_expert, x2)
  w_gate, w_up, _ = ffn.expert_weights()
  hidden = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w_gate)) * jnp.einsum("nd,edf->enf", x, w_up)
  stats[f"{name}/w_down"] = jnp.einsum("ne,enf->ef", per_expert, jnp.square(hidden.astype(jnp.float32)))
  if ffn.shared_gate is not None:
    shared = jax.nn.silu(x @ ffn.shared_gate[...].astype(ffn.dtype)) * (x @ ffn.shared_up[...].astype(ffn.dtype))
    stats[f"{name}/shared_gate"] = stats[f"{name}/shared_up"] = _sumsq(x)
    stats[f"{name}/shared_down"] = _sumsq(shared)


def block_statistics(model: nnx.Module, tokens: jax.Array) -> tuple[dict[str, jax.Array], list[jax.Array]]:
  """Statistics of one batch of tokens [B, T] and the residual stream after each block (for tests).

  Keys: "<param>" -> [G, I] input sums of squares; "blocks/i/attention#head_norm" -> [N] summed head output
  norms; "blocks/i/ffn#expert_mass" -> [E] summed gates.
  """
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  x = model.embedding(tokens)
  stats, residuals = {}, []
  for layer, block in enumerate(model.blocks):
    prefix = f"blocks/{layer}"
    h = block.attention_norm(x)
    _attention_stats(f"{prefix}/attention", block.attention, h, positions, stats)
    attended, _ = block.attention(h, positions)
    x = x + attended
    h = block.ffn_norm(x)
    if block.ffn_kind == "moe":
      _moe_stats(f"{prefix}/ffn", block.ffn, h, stats)
      y, _ = block.ffn(h)
    else:
      _dense_ffn_stats(f"{prefix}/ffn", block.ffn, h, stats)
      y = block.ffn(h)
    x = x + y
    residuals.append(x)
  return stats, residuals


def calibration_stats(run, batches) -> dict[str, np.ndarray]:
  """Sums of `block_statistics` over `batches` (dicts with "inputs" [B, T]) for the model of a trainer Run,
  in float64, plus "#tokens"."""
  graphdef = run.setup.graphdef

  @jax.jit
  def stats_of(params, extra, tokens):
    model = nnx.merge(graphdef, params, extra, copy=True)
    model.eval()  # no router jitter
    return block_statistics(model, tokens)[0]

  total, count = {}, 0
  with jax.set_mesh(run.mesh):
    for batch in batches:
      tokens = jnp.asarray(batch["inputs"])
      for key, value in stats_of(run.state.params, run.state.extra, tokens).items():
        total[key] = total.get(key, 0.0) + np.asarray(value, np.float64)
      count += int(np.prod(tokens.shape))
  total["#tokens"] = np.asarray(count)
  return total


def prunable_names(params: nnx.State) -> dict[str, tuple[int, int]]:
  """{name: (group axes, input axes)} of the weights one-shot pruning touches."""
  layouts = {}
  for name, leaf in prune_masks.named_params(params).items():
    layout = prune_scores.prunable_layout(name, leaf.ndim)
    if layout is not None:
      layouts[name] = layout
  return layouts


def one_shot_masks(params: nnx.State, method: str, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                   score: str = "wanda", stats: dict | None = None, group: str | None = None
                   ) -> dict[str, np.ndarray]:
  """Keep-masks {name: bool array of the parameter's shape} for every prunable weight.

  method "magnitude": |W| per matrix (per expert); "wanda": |W| * ||X||_2 per output; "nm": `nm` = (N, M)
  along the inputs, ranked by `score` ("wanda" or "magnitude"). Wanda scores need `stats`
  (`calibration_stats`). `group` ("per_matrix" | "per_output", magnitude / wanda only) overrides the
  method's comparison group (as in Sun et al. 2023's comparison-group ablation); None keeps the method's own.
  """
  if method not in prune_scores.METHODS:
    raise ValueError(f"--method {method!r}: choose one of {prune_scores.METHODS}.")
  if group is not None and (method == "nm" or group not in prune_scores.GROUPS):
    raise ValueError(f"--group {group!r}: choose one of {prune_scores.GROUPS}, with --method magnitude or wanda "
                     "(N:M always compares within each group of M inputs).")
  group = group or prune_scores.DEFAULT_GROUP.get(method)
  uses_wanda = method == "wanda" or (method == "nm" and score == "wanda")
  if uses_wanda and stats is None:
    raise ValueError("Wanda scores need calibration statistics (calibration_stats).")
  params_by_name = prune_masks.named_params(params)
  masks = {}
  for name, layout in prunable_names(params).items():
    weight = np.asarray(params_by_name[name][...], np.float32)
    canonical = prune_scores.canonical(weight, layout)
    if uses_wanda:
      scores = prune_scores.wanda_scores(canonical, stats[name].astype(np.float32))
    else:
      scores = prune_scores.magnitude_scores(canonical)
    if method == "nm":
      mask = prune_scores.nm_mask(scores, *nm)
    elif group == "per_matrix":
      mask = prune_scores.per_matrix_mask(scores, sparsity)
    else:
      mask = prune_scores.per_output_mask(scores, sparsity)
    masks[name] = np.asarray(mask).reshape(weight.shape)
  return masks
