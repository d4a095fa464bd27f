"""A/B of dsa's sparse-stage KL: target from the token-gather attention's own probabilities vs recomputed.

    python docs/benchmarks/dsa_kl_target_ab.py 4096
"""
import statistics, sys
import jax, jax.numpy as jnp
from flax import nnx
sys.path.insert(0, "benchmarks")
import routed_attention as ra
from sparseformer.benchmarks.attention import _Timed, time_interleaved
from sparseformer.layers.attention.routed import dsa_gather, dsa_indexer, dsa_loss, make_routed
seq = int(sys.argv[1]); cfg = ra.KIND_SETTINGS["dsa"]["dsa"]
x, q, k, v, ct = ra.layer_inputs(seq)
module = make_routed("dsa", dim=ra.MODEL_DIM, num_heads=ra.HEADS, num_kv_heads=ra.KV_HEADS, head_dim=ra.DIM, config=ra.sparse_config("dsa"), rope_theta=1e4, init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
features = module.indexer(x, jnp.arange(seq))
sel = dsa_indexer.running_top_k(features, cfg.topk, key_chunk=cfg.key_chunk, query_chunk=cfg.query_chunk)
def with_target(f, q, k, v):
  out, p = dsa_gather.token_gather_attention(q, k, v, sel.index, sel.valid, query_chunk=cfg.query_chunk, return_probs=True)
  return jnp.sum(out * ct) + dsa_loss.selected_indexer_kl(q, k, f, sel, query_chunk=cfg.query_chunk, target=p)
def recomputed(f, q, k, v):
  out = dsa_gather.token_gather_attention(q, k, v, sel.index, sel.valid, query_chunk=cfg.query_chunk)
  return jnp.sum(out * ct) + dsa_loss.selected_indexer_kl(q, k, f, sel, query_chunk=cfg.query_chunk)
entries = [_Timed(n, jax.grad(fn, argnums=(0, 1, 2, 3)), (features, q, k, v)) for n, fn in (("attention + KL from its probs", with_target), ("attention + KL recomputing p", recomputed))]
time_interleaved(entries, 3)
for e in entries: print(f"T={seq} {e.name:32s} fwd+bwd {statistics.median(e.times)*1e3:9.1f} ms  peak {(e.peak_bytes or 0)/2**20:.0f} MB")
