"""Attention kinds selectable per layer: kind name + SparseAttentionConfig -> BlockLayout.

    layout = build_layout("local", config, seq_len=T, num_heads=H, layer=i)   # cached; call at every trace
    out = backends.attend(q, k, v, layout, backend=config.backend)

Kinds (see config.py for the fields each reads; the builders cite the papers):
  global      dense causal (Vaswani et al., 2017)
  local       sliding window, `window` keys incl. self, optionally dilated (Longformer; Mistral)
  strided     Sparse Transformer strided (Child et al., 2019)
  fixed       Sparse Transformer fixed (Child et al., 2019)
  bigbird     window + global + random blocks seeded by attention.seed + layer (Zaheer et al., 2020)
  longformer  window + global tokens (Beltagy et al., 2020)
  chunked     chunked causal (Llama 4)
  sinks       attention sinks + window (StreamingLLM, Xiao et al., 2023)
  custom      `layout_factory(config, seq_len=..., num_heads=...) -> BlockLayout`

Content-routed kinds (ROUTED_KINDS: moba, nsa, dsa, dsa_block; layers/attention/routed/) choose their keys
from the content inside jit: `validate_kind` checks them, but they have no host layout (`build_layout`
refuses them); `Attention` runs them through `routed.make_routed`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from sparseformer.layers.attention import builders as lb
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.layouts import BlockLayout
from sparseformer.layers.attention.routed.config import ROUTED_KINDS

# Kinds with a static host layout; ROUTED_KINDS build theirs inside jit.
ATTENTION_KINDS = ("global", "local", "strided", "fixed", "bigbird", "longformer", "chunked", "sinks", "custom")

LayoutFactory = Callable[..., BlockLayout]  # (config, *, seq_len, num_heads) -> BlockLayout
_FACTORIES: dict[str, LayoutFactory] = {}


def register_layout_factory(name: str, factory: LayoutFactory) -> None:
  """Makes `layout_factory=name` resolve to `factory` (e.g. a function defined in a notebook)."""
  if not name or ":" in name:
    raise ValueError(f"factory name {name!r} must be non-empty and contain no ':'")
  _FACTORIES[name] = factory
  _cached_layout.cache_clear()


def resolve_layout_factory(path: str) -> LayoutFactory:
  """A registered name or "package.module:function" -> the factory callable."""
  if path in _FACTORIES:
    return _FACTORIES[path]
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    raise ValueError(f"attention.layout_factory={path!r} is neither a registered name ({sorted(_FACTORIES)}) nor "
                     "'package.module:function'; set it to e.g. 'my_project.layouts:make_layout'.")
  try:
    factory = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as error:
    raise ValueError(f"attention.layout_factory={path!r} cannot be imported: {error}") from error
  if not callable(factory):
    raise ValueError(f"attention.layout_factory={path!r} is not callable")
  return factory


def validate_kind(kind: str, config: SparseAttentionConfig) -> None:
  """Raises a ValueError naming the field and the fix if `kind` cannot be built from `config`."""
  if kind not in ATTENTION_KINDS + ROUTED_KINDS:
    raise ValueError(f"attention kind {kind!r} is unknown; choose from {ATTENTION_KINDS + ROUTED_KINDS}.")
  if kind in ROUTED_KINDS:
    if not config.causal:
      raise ValueError(f"attention kind {kind!r} is causal only (its selections exclude future keys); set "
                       "attention.causal=True.")
  if kind == "sinks":
    if not config.causal:
      raise ValueError("attention kind 'sinks' is causal only; set attention.causal=True.")
    if config.num_sinks < 1:
      raise ValueError("attention kind 'sinks' needs attention.num_sinks >= 1 (StreamingLLM uses 4).")
  if kind == "longformer" and config.num_global < 1:
    raise ValueError("attention kind 'longformer' needs attention.num_global >= 1; use kind 'local' "
                     "for a window without global tokens.")
  if kind == "local" and config.dilation > 1 and config.window < 2:
    raise ValueError("a dilated 'local' window needs attention.window >= 2 keys; raise attention.window.")
  if kind == "custom":
    if not config.layout_factory:
      raise ValueError("attention kind 'custom' needs attention.layout_factory='package.module:function' "
                       "(or a name registered with layers.attention.register_layout_factory).")
    resolve_layout_factory(config.layout_factory)


def build_layout(kind: str, config: SparseAttentionConfig, *, seq_len: int, num_heads: int,
                 layer: int = 0) -> BlockLayout:
  """The layout of attention kind `kind` for `seq_len` tokens in layer `layer` (cached: the same object per
  arguments).

  Only bigbird reads `layer`: its random blocks are drawn with seed `config.seed + layer`, so the layers of a
  model attend to different random blocks; the other kinds return one object for every layer. Returns a layout
  with Hl = 1 (shared by heads), or Hl = num_heads for per-head kinds (bigbird with random_per_head, or a custom
  factory that returns one).
  """
  if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
    raise ValueError(f"layer ({layer!r}) must be an integer >= 0")
  if kind in ROUTED_KINDS:
    raise ValueError(f"attention kind {kind!r} is content-routed: its layout is built inside jit from the "
                     "queries and keys, so there is no host layout to build; use layers.attention.Attention "
                     "(or routed.make_routed) for it.")
  return _cached_layout(kind, config, seq_len=seq_len, num_heads=num_heads, layer=layer if kind == "bigbird" else 0)


@functools.lru_cache(maxsize=256)
def _cached_layout(kind: str, config: SparseAttentionConfig, *, seq_len: int, num_heads: int,
                   layer: int) -> BlockLayout:
  validate_kind(kind, config)
  if seq_len < 1 or num_heads < 1:
    raise ValueError(f"seq_len ({seq_len}) and num_heads ({num_heads}) must be >= 1")
  geo = dict(seq_q=seq_len, block_q=config.block_size, block_kv=config.block_kv)
  left, right, causal = config.window - 1, config.window_right, config.causal
  if kind == "global":
    layout = lb.dense(causal=causal, **geo)
  elif kind == "local":
    if config.dilation == 1:
      layout = lb.sliding_window(left=left, right=right, **geo)
    else:
      layout = lb.dilated_window(left=left, right=right, dilation=config.dilation, **geo)
  elif kind == "strided":
    layout = lb.strided(stride=config.stride, causal=causal, **geo)
  elif kind == "fixed":
    layout = lb.fixed(stride=config.stride, summary=config.summary_tokens, causal=causal, **geo)
  elif kind == "bigbird":
    layout = lb.bigbird(left=left, right=right, num_global=config.num_global,
                        num_random_blocks=config.num_random_blocks, seed=config.seed + layer, causal=causal,
                        num_heads=num_heads if config.random_per_head else None, **geo)
  elif kind == "longformer":
    layout = lb.longformer(left=left, right=right, num_global=config.num_global, causal=causal, **geo)
  elif kind == "chunked":
    layout = lb.chunked(chunk=config.chunk_size, causal=causal, **geo)
  elif kind == "sinks":
    layout = lb.sinks(num_sinks=config.num_sinks, left=left, **geo)
  else:
    layout = resolve_layout_factory(config.layout_factory)(config, seq_len=seq_len, num_heads=num_heads)
    if not isinstance(layout, BlockLayout):
      raise ValueError(f"attention.layout_factory={config.layout_factory!r} returned {type(layout).__name__}, "
                       "not a BlockLayout")
    if (layout.seq_q, layout.seq_kv) != (seq_len, seq_len) or layout.num_heads not in (1, num_heads):
      raise ValueError(f"attention.layout_factory={config.layout_factory!r} returned {layout!r}; it must "
                       f"cover seq_len={seq_len} with 1 or {num_heads} heads")
  return layout
