"""MoBA's key-block-major ("efficient") scheme: the xla fast path of `moba_attention`.

Lu et al. (2025), MoBA's implementation section (its Algorithm 1, in our reading): every key block gathers
the (head, token) queries that chose it, attends them without a mask and merges with the causal own-block
attention by log-sum-exp. The generic machinery (dispatch, tiles, merge) lives in `kv_major.py`; MoBA's
selection is one row per query head (Hl = H), own block first.
"""

from __future__ import annotations

import jax

from sparseformer.layers.attention.routed import kv_major


def attend(q: jax.Array, k: jax.Array, v: jax.Array, block_index: jax.Array, *, block_size: int, tile: int = 128,
           scale: float | None = None) -> jax.Array:
  """MoBA attention of q [B, T, H, D] over k, v [B, T, KVH, D] given selections block_index [B, H, T, S]
  (`moba.select_blocks`: own block first, then past blocks, -1 empty) -> [B, T, H, D] in q.dtype."""
  # The flash VJP: 0.81-0.83x autodiff's fwd+bwd time for MoBA's 512-key blocks in two interleaved runs at
  # T = 4096 (docs/benchmarks.md, 2026-12-02); slower for the 64-key blocks of NSA and dsa_block.
  return kv_major.attend_kv_major(q, k, v, block_index, block_kv=block_size, tile=tile, scale=scale,
                                  gradient="flash")
