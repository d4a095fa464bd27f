"""Attention in all its forms: the nnx module, dense causal paths, kinds, BlockLayouts and their backends.

    from sparseformer.layers.attention import BlockLayout, attend, build_layout, builders
    layout = builders.sliding_window(1024, block_q=64, left=255)
    out = attend(q, k, v, layout)                 # q [B, T, H, D], k/v [B, S, KVH, D]

Rooms: config.py (SparseAttentionConfig), kinds.py (kind name -> layout), layouts.py + builders.py
(BlockLayout and named patterns), backends.py (reference / xla / pallas), layout_view.py (what the
backends read of a host or traced layout), dense.py (causal attention), module.py (the nnx layer),
plot.py (PNG pictures of layouts).
"""

from sparseformer.layers.attention.backends import attend, reference_attention, resolve_backend, xla_attention
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.dense import blocked_causal_attention, causal_attention
from sparseformer.layers.attention.kinds import ATTENTION_KINDS, build_layout, register_layout_factory
from sparseformer.layers.attention.layouts import (EMPTY, FULL, BlockLayout, from_block_mask, intersection, per_head,
                                                   union)
from sparseformer.layers.attention.module import Attention

__all__ = [
    "ATTENTION_KINDS", "EMPTY", "FULL", "Attention", "BlockLayout", "SparseAttentionConfig", "attend",
    "blocked_causal_attention", "build_layout", "causal_attention", "from_block_mask", "intersection", "per_head",
    "reference_attention", "register_layout_factory", "resolve_backend", "union", "xla_attention",
]
