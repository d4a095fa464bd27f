"""Pallas block-sparse flash attention (GPU Triton / TPU Mosaic / interpret)."""
