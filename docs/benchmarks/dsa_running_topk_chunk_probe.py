"""DSA's running top-k (`dsa_indexer.running_top_k`) at several `attention.dsa.key_chunk` values: the selections
checked equal first, then timed interleaved in one process (warm-up discarded, median of 3). The indexer and
top-k as benchmarks/routed_attention.py sets them for `dsa` (4 heads x 32, top-2048, query_chunk 128).

    python docs/benchmarks/dsa_running_topk_chunk_probe.py 16384 1024 4096 16384
    python docs/benchmarks/dsa_running_topk_chunk_probe.py --blocks 16384 1024 4096 16384   # dsa_block's selection

--blocks times dsa_block's selection instead (`dsa.select_blocks`: block max-pooled scores + block top-k, 64-key
blocks), which reads the same field.
"""
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import routed_attention as ra  # noqa: E402

from sparseformer.layers.attention.routed import dsa, dsa_indexer  # noqa: E402

blocks = "--blocks" in sys.argv
argv = [a for a in sys.argv[1:] if a != "--blocks"]
seq, chunks = int(argv[0]), [int(c) for c in argv[1:]]
cfg = ra.KIND_SETTINGS["dsa_block" if blocks else "dsa"]["dsa"]
indexer = dsa_indexer.LightningIndexer(ra.MODEL_DIM, index_heads=cfg.index_heads, index_head_dim=cfg.index_head_dim,
                                       rope_dim=cfg.rope_dim, rope_theta=10_000.0, init_std=0.02, dtype=jnp.float32,
                                       param_dtype=jnp.float32, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(0), (1, seq, ra.MODEL_DIM))
features = jax.jit(lambda x: indexer(x, jnp.arange(seq)))(x)


def select(features, chunk):
  if blocks:
    return dsa.select_blocks(features, cfg.topk, cfg.block_size, key_chunk=chunk, query_chunk=cfg.query_chunk)
  selection = dsa_indexer.running_top_k(features, cfg.topk, key_chunk=chunk, query_chunk=cfg.query_chunk)
  return selection.index, selection.valid


functions = {chunk: jax.jit(lambda f, chunk=chunk: select(f, chunk)) for chunk in chunks}
selections = {chunk: jax.block_until_ready(fn(features)) for chunk, fn in functions.items()}
for chunk, selection in selections.items():
  same = zip(jax.tree.leaves(selection), jax.tree.leaves(selections[chunks[0]]), strict=True)
  assert all(bool((a == b).all()) for a, b in same), f"key_chunk={chunk} selects differently"
times = {chunk: [] for chunk in chunks}
for _ in range(3):
  for chunk, fn in functions.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(features))
    times[chunk].append(time.perf_counter() - start)
for chunk in chunks:
  print(f"T={seq} key_chunk={chunk:6d} {'select_blocks' if blocks else 'running_top_k'} "
        f"{statistics.median(times[chunk]) * 1e3:8.0f} ms "
        f"runs {[round(t * 1e3) for t in times[chunk]]}  (selections equal)")
