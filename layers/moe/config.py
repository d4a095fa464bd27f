"""Configuration of Mixture-of-Experts feed-forward layers.

`MoEConfig` holds one switch per idea (router score function, selection, gate
normalisation, capacity, dispatch, balancing, shared / fine-grained experts);
`PRESETS` maps the published recipes (Switch, Mixtral, DeepSeek-V3, OLMoE) to
functions that build a config and accept field overrides:

  config = PRESETS["deepseek_v3"](num_experts=16, expert_hidden=256)

Every invalid value or combination raises a ValueError naming the field and the
fix when the config is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

SCORE_FUNCTIONS = ("softmax", "sigmoid")
GATE_NORMS = ("none", "topk", "softmax_topk")
ROUTINGS = ("token_choice", "expert_choice")
CAPACITY_DISPATCHES = ("capacity_scatter", "capacity_einsum")
# dropless_pallas: the Pallas grouped matmul (kernels/grouped_matmul; interpret mode on CPU). Not
# the default dropless path anywhere: it is unmeasured on GPU/TPU (benchmarks/grouped_matmul.py).
DROPLESS_DISPATCHES = ("dropless_gather", "dropless_ragged_dot", "dropless_pallas")
DISPATCHES = CAPACITY_DISPATCHES + DROPLESS_DISPATCHES
GATHER_SCHEDULES = ("auto", "loop", "batched")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Router, experts, dispatch and balancing of one MoE feed-forward layer.

  With `granularity` m > 1 (DeepSeekMoE fine-grained segmentation) each of the
  `num_experts` experts is split into m experts of hidden `expert_hidden // m`
  and each token picks `top_k * m` of them: same parameters and FLOPs, finer
  routing. The layer itself only reads the derived `routed_*` properties.
  """

  # --- experts
  num_experts: int = 8  # routed experts per MoE layer (before fine-grained segmentation)
  top_k: int = 2  # experts each token is sent to (before fine-grained segmentation)
  expert_hidden: int = 512  # SwiGLU hidden size of one expert (before segmentation)
  granularity: int = 1  # DeepSeekMoE fine-grained segmentation factor m (1 = off)
  num_shared_experts: int = 0  # always-on experts, run as one SwiGLU of hidden n * shared hidden
  shared_expert_hidden: int = 0  # hidden size of one shared expert; 0 = routed_hidden

  # --- router
  routing: str = "token_choice"  # token_choice | expert_choice (each expert takes its top-C tokens)
  allow_noncausal_routing: bool = False  # allow expert_choice in a causal decoder (it sees the future)
  score_function: str = "softmax"  # softmax | sigmoid (DeepSeek-V3), computed in float32
  gate_norm: str = "topk"  # none | topk (divide by the sum of the k picked scores) | softmax_topk (Mixtral: softmax over the k picked logits)
  route_scale: float = 1.0  # multiplies the gates after normalisation (DeepSeek-V3: 2.5)
  n_groups: int = 1  # group-limited selection (DeepSeek-V3): experts split into n_groups groups
  topk_groups: int = 1  # ... and only experts of the best topk_groups groups may be picked
  jitter: float = 0.0  # multiplicative uniform noise 1 +- jitter on the router input in training (Switch)

  # --- capacity and dispatch
  dispatch: str = "dropless_gather"  # capacity_scatter | capacity_einsum | dropless_gather | dropless_ragged_dot | dropless_pallas
  capacity_factor: float = 1.25  # capacity_* dispatch and expert_choice: slots per expert = ceil(cf * group * k / E)
  capacity_group_size: int = 0  # tokens per capacity group; 0 = one group per sequence
  block_size: int = 64  # rows per grouped-matmul block in dropless_gather (padding waste < E * block_size rows)
  gather_schedule: str = "auto"  # dropless_gather: loop (CPU) | batched (GPU/TPU) | auto (by backend)
  # Expert-parallel dropless receive buffer per (source, destination shard): ep_buffer_factor x the balanced
  # share N*k/n rows, capped at the worst case N*k; rows past it are dropped and counted in dropped_fraction.
  # >= the `expert` axis size never drops (the worst case; n x the row memory). Unused without an expert axis.
  ep_buffer_factor: float = 2.0

  # --- balancing
  aux_loss_alpha: float = 0.01  # Switch load-balance loss alpha * E * sum_i f_i P_i (= alpha when uniform)
  z_loss_coef: float = 0.0  # router z-loss coefficient on mean(logsumexp(logits)^2) (ST-MoE: 1e-3)
  seq_aux_loss_alpha: float = 0.0  # sequence-wise balance loss (DeepSeek-V3: 1e-4), same form per sequence
  selection_bias: bool = False  # auxiliary-loss-free balancing: a selection-only bias, updated outside the optimizer
  bias_update_rate: float = 1e-3  # u in b += u * sign(mean_load - load), applied by after_optimizer_step

  def __post_init__(self) -> None:
    def fail(field: str, value: Any, fix: str) -> None:
      raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {fix}")

    for field in ("num_experts", "top_k", "expert_hidden", "granularity", "n_groups", "topk_groups",
                  "block_size"):
      if int(getattr(self, field)) < 1:
        fail(field, getattr(self, field), "it must be a positive integer")
    for field in ("num_shared_experts", "shared_expert_hidden", "capacity_group_size"):
      if int(getattr(self, field)) < 0:
        fail(field, getattr(self, field), "it must be >= 0")
    if self.top_k > self.num_experts:
      fail("top_k", self.top_k, f"set top_k <= num_experts ({self.num_experts}) or add experts")
    if self.expert_hidden % self.granularity:
      fail("granularity", self.granularity,
           f"it must divide expert_hidden ({self.expert_hidden}) to split every expert evenly")
    if self.score_function not in SCORE_FUNCTIONS:
      fail("score_function", self.score_function, f"choose one of {SCORE_FUNCTIONS}")
    if self.gate_norm not in GATE_NORMS:
      fail("gate_norm", self.gate_norm, f"choose one of {GATE_NORMS}")
    if self.routing not in ROUTINGS:
      fail("routing", self.routing, f"choose one of {ROUTINGS}")
    if self.gather_schedule not in GATHER_SCHEDULES:
      fail("gather_schedule", self.gather_schedule, f"choose one of {GATHER_SCHEDULES}")
    if self.dispatch not in DISPATCHES:
      fail("dispatch", self.dispatch, f"choose one of {DISPATCHES}")
    if not self.route_scale > 0:
      fail("route_scale", self.route_scale, "it must be > 0")
    if not self.ep_buffer_factor > 0:
      fail("ep_buffer_factor", self.ep_buffer_factor,
           "it must be > 0 (x the balanced share of rows per expert shard; >= the expert axis size never drops)")
    if not self.capacity_factor > 0:
      fail("capacity_factor", self.capacity_factor,
           "it must be > 0 (1.0 = exactly the balanced share; use a dropless_* dispatch for no dropping)")
    for field in ("jitter", "aux_loss_alpha", "z_loss_coef", "seq_aux_loss_alpha", "bias_update_rate"):
      if not getattr(self, field) >= 0:
        fail(field, getattr(self, field), "it must be >= 0")
    if self.jitter >= 1:
      fail("jitter", self.jitter, "it must be < 1 (the router input is scaled by U(1 - jitter, 1 + jitter))")
    experts, k = self.routed_experts, self.routed_top_k
    if experts % self.n_groups:
      fail("n_groups", self.n_groups, f"it must divide the routed expert count ({experts})")
    if self.topk_groups > self.n_groups:
      fail("topk_groups", self.topk_groups, f"set topk_groups <= n_groups ({self.n_groups})")
    if self.topk_groups * (experts // self.n_groups) < k:
      fail("topk_groups", self.topk_groups,
           f"the {self.topk_groups} kept groups hold {self.topk_groups * (experts // self.n_groups)} "
           f"experts, fewer than routed_top_k={k}; raise topk_groups or lower top_k")
    if self.routing == "expert_choice":
      if self.dispatch not in CAPACITY_DISPATCHES:
        fail("dispatch", self.dispatch,
             f"expert_choice routing fills fixed expert slots; use one of {CAPACITY_DISPATCHES}")
      if self.selection_bias or self.n_groups > 1:
        fail("routing", self.routing,
             "expert_choice is balanced by construction; set selection_bias=False and n_groups=1")
      if self.seq_aux_loss_alpha > 0:
        fail("seq_aux_loss_alpha", self.seq_aux_loss_alpha, "set it to 0 with expert_choice routing")

  # --- derived sizes (fine-grained segmentation applied)
  @property
  def routed_experts(self) -> int:
    """Experts the router chooses among: num_experts * granularity."""
    return self.num_experts * self.granularity

  @property
  def routed_top_k(self) -> int:
    """Experts per token: top_k * granularity (for expert_choice: the average)."""
    return self.top_k * self.granularity

  @property
  def routed_hidden(self) -> int:
    """SwiGLU hidden size of one routed expert: expert_hidden // granularity."""
    return self.expert_hidden // self.granularity

  @property
  def shared_hidden(self) -> int:
    """Total hidden size of the shared-expert SwiGLU (0 when there is none)."""
    return self.num_shared_experts * (self.shared_expert_hidden or self.routed_hidden)

  @property
  def dropless(self) -> bool:
    """Whether every (token, expert) assignment is computed (no capacity limit)."""
    return self.routing == "token_choice" and self.dispatch in DROPLESS_DISPATCHES

  @property
  def grouped_options(self) -> dict[str, Any]:
    """Keyword options of the grouped SwiGLU behind the dropless dispatch, plus `ep_buffer_factor`, which
    the expert-parallel path (parallel.py) takes out before calling it."""
    options = dict(ep_buffer_factor=self.ep_buffer_factor)
    if self.dispatch == "dropless_gather":
      options.update(block_size=self.block_size, schedule=self.gather_schedule)
    return options

  def validate_mesh(self, axis_sizes: Mapping[str, int]) -> None:
    """Checks this config against a device mesh ({axis name: size}, e.g. dict(mesh.shape)).

    Raises ValueError when the `expert` axis does not divide the routed experts.
    """
    expert_shards = int(axis_sizes.get("expert", 1))
    if self.routed_experts % expert_shards:
      raise ValueError(
          f"MoEConfig.num_experts={self.num_experts} (x granularity {self.granularity} = "
          f"{self.routed_experts} routed experts) is not divisible by the mesh axis 'expert' of size "
          f"{expert_shards}; choose an expert axis size that divides {self.routed_experts}")


def switch(**overrides: Any) -> MoEConfig:
  """Switch Transformer: top-1 softmax router, capacity 1.25 with dropping, alpha = 0.01."""
  base = dict(num_experts=64, top_k=1, score_function="softmax", gate_norm="none",
              dispatch="capacity_scatter", capacity_factor=1.25, aux_loss_alpha=0.01, jitter=0.01)
  return MoEConfig(**(base | overrides))


def mixtral(**overrides: Any) -> MoEConfig:
  """GShard / Mixtral: top-2 of 8, softmax over the two picked logits, dropless."""
  base = dict(num_experts=8, top_k=2, score_function="softmax", gate_norm="softmax_topk",
              dispatch="dropless_gather", aux_loss_alpha=0.01)
  return MoEConfig(**(base | overrides))


def deepseek_v3(**overrides: Any) -> MoEConfig:
  """DeepSeek-V3: sigmoid scores, bias balancing (u = 1e-3), 8 groups / top-4 groups, top-8 of 256,
  gates normalised over the picks and scaled by 2.5, one shared expert, tiny sequence-wise loss."""
  base = dict(num_experts=256, top_k=8, expert_hidden=2048, score_function="sigmoid", gate_norm="topk",
              route_scale=2.5, n_groups=8, topk_groups=4, selection_bias=True, bias_update_rate=1e-3,
              num_shared_experts=1, aux_loss_alpha=0.0, seq_aux_loss_alpha=1e-4,
              dispatch="dropless_gather")
  return MoEConfig(**(base | overrides))


def olmoe(**overrides: Any) -> MoEConfig:
  """OLMoE: top-8 of 64 softmax experts, gates not renormalised, dropless, alpha 0.01, z-loss 1e-3."""
  base = dict(num_experts=64, top_k=8, expert_hidden=1024, score_function="softmax", gate_norm="none",
              dispatch="dropless_gather", aux_loss_alpha=0.01, z_loss_coef=1e-3)
  return MoEConfig(**(base | overrides))


PRESETS: dict[str, Callable[..., MoEConfig]] = {
    "switch": switch,
    "mixtral": mixtral,
    "deepseek_v3": deepseek_v3,
    "olmoe": olmoe,
}
