"""Content-routed sparse attention: the keys a query visits are chosen from the content, inside jit.

    module = make_routed("moba", dim=..., num_heads=..., ..., config=sparse_config, layer=i)
    out, aux = module(x, q, k, v, positions)   # x [B, T, dim]; q [B, T, H, Dh]; k, v [B, T, KVH, Dh] after RoPE

Kinds: moba (Lu et al., 2025), nsa (Yuan et al., 2025), dsa and dsa_block (DeepSeek-V3.2-Exp). Each scores
keys or key blocks, selects with `layers.routing.masked_top_k`, and attends through `selection.py` (a traced
BlockLayout on the existing backends) or a kind's own fast path. `out` [B, T, H, Dh] has q's dtype; `aux` is a
dict of f32 scalars: "aux_loss" (already weighted; the decoder adds it to the loss) and metrics such as
"density", logged as `layer{i}/attention/{name}`.

Rooms: config.py (the `attention.moba / nsa / dsa` fields), selection.py (selections -> traced layout ->
backends), moba.py, nsa.py, dsa.py. The kind modules are imported when a module is made, not here:
attention/config.py imports routed/config.py, and this package's import must not reach back into backends.
"""

import importlib

from flax import nnx

from sparseformer.layers.attention.routed.config import ROUTED_KINDS

# kind -> (module under routed/, class name, extra constructor arguments)
_MODULES = {"moba": ("moba", "MoBAAttention", {}), "nsa": ("nsa", "NSAAttention", {}),
            "dsa": ("dsa", "DSAAttention", {"block": False}), "dsa_block": ("dsa", "DSAAttention", {"block": True})}


def make_routed(kind: str, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, config, rope_theta: float,
                init_std: float, dtype, param_dtype, rngs: nnx.Rngs, layer: int = 0) -> nnx.Module:
  """The routed attention module of `kind` (one of ROUTED_KINDS); `config` is the SparseAttentionConfig."""
  if kind not in _MODULES:
    raise ValueError(f"routed attention kind {kind!r} is unknown; choose from {ROUTED_KINDS}.")
  module_name, class_name, extra = _MODULES[kind]
  try:
    module = importlib.import_module(f"sparseformer.layers.attention.routed.{module_name}")
  except ModuleNotFoundError as error:
    raise ValueError(f"attention kind {kind!r} is not implemented in this checkout "
                     f"(layers/attention/routed/{module_name}.py is missing): {error}") from error
  cls = getattr(module, class_name)
  return cls(dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, config=config,
             rope_theta=rope_theta, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs, layer=layer,
             **extra)


__all__ = ["ROUTED_KINDS", "make_routed"]
