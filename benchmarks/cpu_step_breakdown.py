"""Where the CPU train step of the `small` preset spends its time, one decoder layer taken apart.

    python -m sparseformer.benchmarks.cpu_step_breakdown

Times jitted forward + backward (`jax.vjp` with a random cotangent, outputs kept, so nothing is dead code) at
the `small` preset's shapes (batch 8, seq 512, 8 heads of 64, width 512, SwiGLU hidden 1408, f32) of:
dense causal attention alone, as the reference `jax.nn.dot_product_attention` (XLA), as our CPU path
`dense.blocked_causal_attention`, and as the block-sparse `xla` backend on the dense causal layout; one of
the model's matmuls, [4096 x 512] @ [512 x 1408]; and one decoder `Block` with its attention, SwiGLU and
RMSNorm modules. Rounds are interleaved (the machine is shared); prints medians of 7 and, where the work is
known, the achieved GFLOP/s (attention counts the causal half, as models/flops.py does).
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.layers.attention import backends as sparse_attention, dense, kinds as attention_patterns
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models import presets
from sparseformer.models.decoder import Block

BATCH, SEQ, HEADS, HEAD_DIM, WIDTH, HIDDEN = 8, 512, 8, 64, 512, 1408


def _fwd_bwd(fn):
  """jit of (args, cotangent) -> (fn(*args), grads of <fn(*args), cotangent> w.r.t. every arg)."""

  def run(args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)

  return jax.jit(run)


def _module_fwd_bwd(module, call):
  graphdef, state = nnx.split(module)
  return _fwd_bwd(lambda state, x: call(nnx.merge(graphdef, state), x)), state


def main() -> None:
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  q, k, v, d_out = (normal(BATCH, SEQ, HEADS, HEAD_DIM) for _ in range(4))
  x, d_x = normal(BATCH, SEQ, WIDTH), normal(BATCH, SEQ, WIDTH)
  config = presets.get("small", dtype="float32")
  block = Block(config, 0, rngs=nnx.Rngs(0))
  positions = jnp.arange(SEQ, dtype=jnp.int32)
  layout = attention_patterns.build_layout("global", SparseAttentionConfig(block_size=128), seq_len=SEQ,
                                           num_heads=HEADS)
  attention_flops = 3 * 4 * BATCH * HEADS * HEAD_DIM * SEQ * (SEQ + 1) / 2
  layer_matmul_flops = 3 * 2 * BATCH * SEQ * WIDTH * (4 * HEADS * HEAD_DIM + 3 * HIDDEN)
  block_fn, block_state = _module_fwd_bwd(block, lambda m, x: m(x, positions)[0])
  attention_fn, attention_state = _module_fwd_bwd(block.attention, lambda m, x: m(x, positions))
  ffn_fn, ffn_state = _module_fwd_bwd(block.ffn, lambda m, x: m(x))
  norm_fn, norm_state = _module_fwd_bwd(block.attention_norm, lambda m, x: m(x))
  cases = {  # name: (fn, args, cotangent, useful FLOPs or None)
      "causal attention, jax.nn.dot_product_attention (reference)": (
          _fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)), (q, k, v), d_out,
          attention_flops),
      "causal attention, blocked_causal_attention (ours on CPU)": (
          _fwd_bwd(dense.blocked_causal_attention), (q, k, v), d_out, attention_flops),
      "causal attention, block-sparse xla backend, blocks of 128": (
          _fwd_bwd(lambda q, k, v: sparse_attention.attend(q, k, v, layout, backend="xla")), (q, k, v), d_out,
          attention_flops),
      f"matmul [{BATCH * SEQ} x {WIDTH}] @ [{WIDTH} x {HIDDEN}]": (
          _fwd_bwd(lambda x, w: x @ w), (normal(BATCH * SEQ, WIDTH), normal(WIDTH, HIDDEN)),
          normal(BATCH * SEQ, HIDDEN), 3 * 2 * BATCH * SEQ * WIDTH * HIDDEN),
      "decoder Block (norms, attention, SwiGLU)": (
          block_fn, (block_state, x), d_x, layer_matmul_flops + attention_flops),
      "  Attention module (q/k/v/o projections, RoPE, attention)": (
          attention_fn, (attention_state, x), d_x, 3 * 2 * BATCH * SEQ * WIDTH * 4 * HEADS * HEAD_DIM
          + attention_flops),
      "  SwiGLU module": (ffn_fn, (ffn_state, x), d_x, 3 * 2 * BATCH * SEQ * WIDTH * 3 * HIDDEN),
      "  RMSNorm": (norm_fn, (norm_state, x), d_x, None),
  }
  times = {name: [] for name in cases}
  for fn, args, cotangent, _ in cases.values():
    jax.block_until_ready(fn(args, cotangent))
  for _ in range(7):
    for name, (fn, args, cotangent, _) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(args, cotangent))
      times[name].append(time.perf_counter() - start)
  print(f"fwd+bwd, medians of 7 interleaved rounds; jax {jax.__version__}, {jax.devices()[0].device_kind}")
  for name, (_, _, _, flop) in cases.items():
    seconds = statistics.median(times[name])
    rate = f" ({flop / seconds / 1e9:.0f} GFLOP/s)" if flop else ""
    print(f"{name:62} {seconds * 1e3:6.0f} ms{rate}")


if __name__ == "__main__":
  main()
