"""Cost of a traced (content-routed) layout on the `xla` backend, against the same layout from the host.

    python -m sparseformer.benchmarks.attention_traced

A host layout runs the bucketed plan (query blocks grouped by list length); the same lists passed
through `jax.jit` as arguments take the traced plan (one bucket of width `max_kv`). Times jitted
fwd+bwd of both side by side, alternating order, median of 5, at T = 4096, H = 8, D = 64, f32, for a
sliding window (one bucket either way) and non-causal Longformer with global tokens (the host plan
buckets its rows); prints the ratio and the largest gradient difference.
"""

import statistics
import time
import types

import jax
import jax.numpy as jnp

from sparseformer.layers.attention import backends as sa, builders as lb

SEQ, HEADS, DIM, BLOCK = 4096, 8, 64, 128
LAYOUTS = {
    "window 512": lambda: lb.sliding_window(SEQ, block_q=BLOCK, left=511),
    "longformer, globals": lambda: lb.longformer(SEQ, block_q=BLOCK, left=255, right=255, num_global=128,
                                                 causal=False),
}


def _loss(q, k, v, ct, layout):
  return jnp.sum(sa.attend(q, k, v, layout, backend="xla") * ct)


def compare(layout, q, k, v, ct, repeats: int = 5) -> dict:
  host = jax.jit(lambda q, k, v, ct: jax.grad(_loss, argnums=(0, 1, 2))(q, k, v, ct, layout))

  @jax.jit
  def traced(q, k, v, ct, kv_index, kv_count, kv_mask_id, partial_masks):
    routed = types.SimpleNamespace(seq_q=layout.seq_q, seq_kv=layout.seq_kv, block_q=layout.block_q,
                                   block_kv=layout.block_kv, kv_index=kv_index, kv_count=kv_count,
                                   kv_mask_id=kv_mask_id, partial_masks=partial_masks)
    return jax.grad(_loss, argnums=(0, 1, 2))(q, k, v, ct, routed)

  lists = [jnp.asarray(x) for x in (layout.kv_index, layout.kv_count, layout.kv_mask_id, layout.partial_masks)]
  fns = {"host": lambda: host(q, k, v, ct), "traced": lambda: traced(q, k, v, ct, *lists)}
  grads = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}  # compile both first
  times = {name: [] for name in fns}
  for r in range(repeats):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - start)
  median = {name: statistics.median(t) for name, t in times.items()}
  return dict(host_ms=median["host"] * 1e3, traced_ms=median["traced"] * 1e3,
              ratio=median["traced"] / median["host"],
              max_grad_diff=max(float(jnp.abs(a - b).max()) for a, b in zip(grads["host"], grads["traced"])),
              host_bucket_widths=[int(index.shape[-1]) for _, index, _ in sa._Plan(layout, HEADS, HEADS, DIM).buckets],
              max_kv=layout.max_kv)


def main() -> None:
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (1, SEQ, HEADS, DIM), jnp.float32) for key in keys)
  print(f"xla backend, T={SEQ}, H={HEADS}, D={DIM}, blocks {BLOCK}, f32 fwd+bwd, median of 5 "
        f"({jax.devices()[0].device_kind})")
  for name, build in LAYOUTS.items():
    r = compare(build(), q, k, v, ct)
    print(f"{name:20s} host {r['host_ms']:7.0f} ms (bucket widths {r['host_bucket_widths']}, max_kv {r['max_kv']})"
          f"  traced {r['traced_ms']:7.0f} ms  traced/host {r['ratio']:.2f}  max |grad diff| {r['max_grad_diff']:.1e}")


if __name__ == "__main__":
  main()
