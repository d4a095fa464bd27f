"""Configuration of Mixture-of-Experts feed-forward layers."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Router, experts and dispatch of an MoE feed-forward layer."""

  num_experts: int = 8  # routed experts per MoE layer
  top_k: int = 2  # experts each token is sent to
  expert_hidden: int = 512  # SwiGLU hidden size of one expert
