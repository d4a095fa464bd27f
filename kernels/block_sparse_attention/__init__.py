"""Pallas block-sparse flash attention (GPU Triton / TPU Mosaic / interpret).

    from sparseformer.kernels.block_sparse_attention import block_sparse_attention
    out = block_sparse_attention(q, k, v, layout)   # q [B, T, H, D], k/v [B, S, KVH, D]

See kernels/README.md for concepts, features, usage and limitations.
"""

from sparseformer.kernels.block_sparse_attention.api import block_sparse_attention
from sparseformer.kernels.block_sparse_attention.api import block_sparse_attention_with_lse
from sparseformer.kernels.block_sparse_attention.common import transpose_block_lists
from sparseformer.kernels.block_sparse_attention.tiles import BlockSizes, unsupported_reason

__all__ = [
    "BlockSizes",
    "block_sparse_attention",
    "block_sparse_attention_with_lse",
    "transpose_block_lists",
    "unsupported_reason",
]
