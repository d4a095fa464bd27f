"""Compression commands over trained workdirs: quantize (qwix PTQ / QAT), prune, distill."""
