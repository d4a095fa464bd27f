"""Training throughput (tokens/s) and MFU of model presets, beside a plain jitted JAX step of the same shape.

    python -m sparseformer.benchmarks.train_throughput                      # presets small + quickstart
    python -m sparseformer.benchmarks.train_throughput --presets small,all_local --steps 10

For every preset the full sparseformer train step (sharded jit, AdamW + clipping + weight-decay mask,
non-finite guard) runs on random tokens; for dense presets a hand-written plain JAX transformer step of the
same shape and dtypes (parameters in `param_dtype`, compute in `--dtype`; embedding, RMSNorm, RoPE,
`jax.nn.dot_product_attention` (cuDNN flash attention on a GPU in 16-bit, `plain_attention_implementation`),
SwiGLU, tied head, optax AdamW) is the baseline. Both compile and take one
discarded step, then alternate step by step (interleaved, median of --steps each). MFU = tokens/s x model FLOPs per token / peak, where the peak is a jitted square
matmul measured in this process before, between and after the runs (the CPU roofline; the highest is used, so
MFU errs low on a noisy machine).
Results: JSON (--out) and a markdown table on stdout.
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseformer.layers import rope
from sparseformer.layers.attention import dense
from sparseformer.models import flops, presets
from sparseformer.models.config import ModelConfig
from sparseformer.train import optimizer as optimizer_lib
from sparseformer.train import sharding as sharding_lib
from sparseformer.train import state as state_lib
from sparseformer.train import step as step_lib
from sparseformer.train.config import TrainConfig
from sparseformer.train.mesh import MeshConfig, make_mesh
from sparseformer.train.metrics import measure_matmul_peak


def stepper(step, state, batch) -> Callable[[], float]:
  """A closure running one step on its own state and returning its wall time (the state is carried)."""
  holder = [state]

  def run() -> float:
    start = time.perf_counter()
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  return run


def interleaved_median_seconds(runners: dict[str, Callable[[], float]], steps: int) -> dict[str, float]:
  """Median step time of each runner: one discarded call each (compile + warm-up), then `steps` rounds
  alternating the order, so load changes on a shared machine hit every runner alike."""
  for run in runners.values():
    run()
  times = {name: [] for name in runners}
  order = list(runners)
  for round_ in range(steps):
    for name in order[::-1] if round_ % 2 else order:
      times[name].append(runners[name]())
  return {name: statistics.median(values) for name, values in times.items()}


def sparseformer_stepper(config: ModelConfig, batch: dict) -> Callable[[], float]:
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  train_config = TrainConfig(steps=1000, warmup_steps=10)
  setup = state_lib.setup_model(config, lambda p: optimizer_lib.build_optimizer(train_config, p, config), mesh, 0)
  state = state_lib.init_train_state(config, setup, 0)
  step = jax.jit(step_lib.make_train_step(setup, accum_steps=1,
                                          learning_rate=optimizer_lib.learning_rate_schedule(train_config)),
                 in_shardings=(setup.state_shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(setup.state_shardings, sharding_lib.replicated(mesh)), donate_argnums=0)
  return stepper(step, state, batch)


def _rms_norm(x, scale):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6) * scale).astype(x.dtype)


def plain_params(config: ModelConfig) -> dict:
  """The baseline's parameters, in `config.param_dtype` like ours (the master copy the optimizer updates)."""
  d, heads, head_dim, hidden = config.d_model, config.num_heads, config.resolved_head_dim, config.resolved_mlp_hidden
  keys = iter(jax.random.split(jax.random.key(0), 8 * config.num_layers + 2))
  param_dtype = jnp.dtype(config.param_dtype)
  normal = lambda shape: (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(param_dtype)  # noqa: E731
  ones = lambda shape: jnp.ones(shape, param_dtype)  # noqa: E731
  return {"embed": normal((config.vocab_size, d)), "norm": ones((d,)), "layers": [
      {"wq": normal((d, heads * head_dim)), "wk": normal((d, config.num_kv_heads * head_dim)),
       "wv": normal((d, config.num_kv_heads * head_dim)), "wo": normal((heads * head_dim, d)),
       "w1": normal((d, hidden)), "w3": normal((d, hidden)), "w2": normal((hidden, d)),
       "n1": ones((d,)), "n2": ones((d,))} for _ in range(config.num_layers)]}


def plain_attention_implementation(dtype, head_dim: int) -> str | None:
  """The plain step's attention: cuDNN flash attention where our rule picks it (GPU, 16-bit, head sizes cuDNN
  takes: `dense.dense_attention_implementation`), else jax.nn.dot_product_attention's default (None)."""
  cudnn = dense.dense_attention_implementation(jax.default_backend(), dtype, head_dim) == "cudnn"
  return "cudnn" if cudnn else None


def plain_loss(config: ModelConfig, params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """A textbook transformer forward in `config.dtype` (weights cast from their stored dtype, as ours does)."""
  heads, head_dim, compute = config.num_heads, config.resolved_head_dim, jnp.dtype(config.dtype)
  params = jax.tree.map(lambda p: p.astype(compute), params)
  batch_size, length = inputs.shape
  positions = jnp.arange(length)
  x = params["embed"][inputs]
  for layer in params["layers"]:
    h = _rms_norm(x, layer["n1"])
    q = rope.apply_rope((h @ layer["wq"]).reshape(batch_size, length, heads, head_dim), positions)
    k = rope.apply_rope((h @ layer["wk"]).reshape(batch_size, length, config.num_kv_heads, head_dim), positions)
    v = (h @ layer["wv"]).reshape(batch_size, length, config.num_kv_heads, head_dim)
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=plain_attention_implementation(
        compute, head_dim)).reshape(batch_size, length, -1)
    x = x + attended @ layer["wo"]
    h = _rms_norm(x, layer["n2"])
    x = x + (jax.nn.silu(h @ layer["w1"]) * (h @ layer["w3"])) @ layer["w2"]
  logits = jnp.matmul(_rms_norm(x, params["norm"]), params["embed"].T, preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def plain_stepper(config: ModelConfig, batch: dict) -> Callable[[], float]:
  """A textbook transformer train step with the same shapes and dtypes: the baseline."""
  tx = optax.adamw(1e-3)

  @jax.jit
  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(lambda p: plain_loss(config, p, batch["inputs"], batch["targets"]))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  params = plain_params(config)
  return stepper(step, (params, tx.init(params)), batch)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default="small,quickstart")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per run (median reported)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--out", default="docs/benchmarks/train_throughput.json")
  args = parser.parse_args()

  peaks = [measure_matmul_peak(args.dtype)]
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (args.batch, args.seq + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  rows = []
  for name in args.presets.split(","):
    config = presets.get(name, max_seq_len=max(args.seq, presets.get(name).max_seq_len), dtype=args.dtype)
    flops_per_token = flops.train_flops_per_token(config, args.seq)
    runners = {"ours": sparseformer_stepper(config, batch)}
    if set(config.attention_pattern) == {"global"} and "moe" not in config.ffn_pattern:
      runners["plain"] = plain_stepper(config, batch)
    seconds = interleaved_median_seconds(runners, args.steps)
    ours, plain = seconds["ours"], seconds.get("plain")
    rows.append({"preset": name, "flops_per_token": flops_per_token, "step_seconds": ours,
                 "plain_step_seconds": plain})
    peaks.append(measure_matmul_peak(args.dtype))
    print(f"{name}: {ours * 1e3:.0f} ms/step" + (f", plain JAX {plain * 1e3:.0f} ms/step" if plain else ""),
          flush=True)
  peak = max(peaks)
  tokens_per_step = args.batch * args.seq
  print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; batch {args.batch} x seq {args.seq}, {args.dtype}")
  print(f"Measured matmul peak: {', '.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s (before, after each "
        f"preset); MFU uses the highest, {peak / 1e9:.1f}\n")
  print("| preset | ms/step | tokens/s | MFU | plain JAX ms/step | plain MFU | ours / plain time |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    row["tokens_per_second"] = tokens_per_step / row["step_seconds"]
    row["mfu"] = row["tokens_per_second"] * row["flops_per_token"] / peak
    plain = row["plain_step_seconds"]
    row["plain_mfu"] = tokens_per_step / plain * row["flops_per_token"] / peak if plain else None
    plain_cells = (f"{plain * 1e3:.0f} | {row['plain_mfu']:.0%} | {row['step_seconds'] / plain:.2f}" if plain
                   else "- | - | -")
    print(f"| {row['preset']} | {row['step_seconds'] * 1e3:.0f} | {row['tokens_per_second']:,.0f} | "
          f"{row['mfu']:.0%} | {plain_cells} |")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as file:
    json.dump({"peak_flops_measurements": peaks, "peak_flops": peak, "batch": args.batch,
               "seq": args.seq, "dtype": args.dtype, "jax": jax.__version__, "rows": rows}, file, indent=2)


if __name__ == "__main__":
  main()
