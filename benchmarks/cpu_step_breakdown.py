"""Where the CPU train step of the `small` preset spends its time: attention vs matmul, side by side.

    python -m sparseformer.benchmarks.cpu_step_breakdown

Times jitted forward + backward, at the `small` preset's shapes (batch 8, seq 512, 8 heads of 64, width 512,
SwiGLU hidden 1408, f32), of (1) dense causal `jax.nn.dot_product_attention` (XLA) for one layer, (2) our
block-sparse `xla` backend on the dense causal layout (the alternative kernel), and (3) one of the model's
matmuls, [4096 x 512] @ [512 x 1408]. Prints medians of 7 and the achieved GFLOP/s of useful work.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.layers import attention_patterns, sparse_attention
from sparseformer.layers.attention_config import SparseAttentionConfig

BATCH, SEQ, HEADS, HEAD_DIM, WIDTH, HIDDEN = 8, 512, 8, 64, 512, 1408


def _median_seconds(fn, *args, repeats: int = 7) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(BATCH, SEQ, HEADS, HEAD_DIM)), jnp.float32) for _ in range(3))
  attention_flops = 3 * 4 * BATCH * HEADS * HEAD_DIM * SEQ * (SEQ + 1) / 2  # fwd + bwd, causal half
  dense = jax.jit(jax.grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True).sum(),
                           argnums=(0, 1, 2)))
  seconds = _median_seconds(dense, q, k, v)
  print(f"dense causal attention, one layer, fwd+bwd: {seconds * 1e3:.0f} ms "
        f"({attention_flops / seconds / 1e9:.1f} GFLOP/s)")
  for block in (64, 256):
    layout = attention_patterns.build_layout("global", SparseAttentionConfig(block_size=block), seq_len=SEQ,
                                             num_heads=HEADS)
    sparse = jax.jit(jax.grad(lambda q, k, v: sparse_attention.attend(q, k, v, layout, backend="xla").sum(),
                              argnums=(0, 1, 2)))
    seconds = _median_seconds(sparse, q, k, v)
    print(f"block-sparse xla, dense causal layout, block {block}: {seconds * 1e3:.0f} ms "
          f"({attention_flops / seconds / 1e9:.1f} GFLOP/s)")
  x, w = jnp.ones((BATCH * SEQ, WIDTH)), jnp.ones((WIDTH, HIDDEN))
  matmul = jax.jit(jax.grad(lambda x, w: (x @ w).sum(), argnums=(0, 1)))
  seconds = _median_seconds(matmul, x, w)
  print(f"[{BATCH * SEQ} x {WIDTH}] @ [{WIDTH} x {HIDDEN}] fwd+bwd: {seconds * 1e3:.0f} ms "
        f"({3 * 2 * BATCH * SEQ * WIDTH * HIDDEN / seconds / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
  main()
