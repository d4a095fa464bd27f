"""Pallas grouped matmuls for dropless MoE (GPU Triton / TPU Mosaic / interpret).

    from sparseformer.kernels.grouped_matmul import gmm, tgmm
    out = gmm(lhs, rhs, group_sizes)       # [M, K] x [G, K, N] -> [M, N], rows sorted by group
    d_rhs = tgmm(lhs, grad, group_sizes)   # [M, K] x [M, N] -> [G, K, N]

See kernels/README.md for concepts, features, usage and limitations.
"""

from sparseformer.kernels.grouped_matmul.api import gmm, tgmm
from sparseformer.kernels.grouped_matmul.metadata import Tiling
from sparseformer.kernels.grouped_matmul.reference import gmm_reference, tgmm_reference

__all__ = ["Tiling", "gmm", "gmm_reference", "tgmm", "tgmm_reference"]
