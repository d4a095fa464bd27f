"""MoE layer vs the dense SwiGLU with the same active parameters: forward + backward time and memory.

  python -m sparseformer.benchmarks.moe                      # the issue's grid (E = 8..128, k = 1, 2)
  python -m sparseformer.benchmarks.moe --experts 8 64 --top-k 2 --dispatch dropless_gather
  python -m sparseformer.benchmarks.moe --json out.json --markdown docs/benchmarks/moe.md

For each (E, k) the dense baseline (SwiGLU of hidden k * F, the FLOPs of the
active experts) and every dispatch path run side by side in one process, their
timed repetitions interleaved so that machine load hits both alike. Reported:
median seconds per forward + backward step (gradients for x and every
parameter, router included), tokens / s, the ratio to dense, and the peak
memory XLA plans for the step (arguments + outputs + temporaries, from the
compiled program's memory analysis).

Routing (--routing): `uniform` is the near-uniform start of a freshly initialised router on random
tokens; `zipf` skews the expert loads the way trained routers and real data do: expert e (by rank r)
is the preferred expert of a fraction of tokens proportional to r^-a (--zipf-a), made by giving the router
orthonormal columns and adding `--zipf-strength` times a token's preferred column to its input, so the
top-1 pick follows the Zipf law (the realised max / mean expert load is reported beside each row).

`dropless_ragged_dot` is skipped where its time, extrapolated linearly in E from
the last measured size, exceeds --max-step-seconds (on CPU `ragged_dot` expands
to a dense product over all experts).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.layers.moe import MoEFeedForward
from sparseformer.layers.moe.config import DISPATCHES, MoEConfig
from sparseformer.layers.moe.grouped import swiglu


def _memory_bytes(compiled) -> int | None:
  try:
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def _dense_step(d_model: int, hidden: int, dtype, key):
  keys = jax.random.split(key, 3)
  scale = lambda fan_in: fan_in ** -0.5
  params = (jax.random.normal(keys[0], (d_model, hidden), dtype) * scale(d_model),
            jax.random.normal(keys[1], (d_model, hidden), dtype) * scale(d_model),
            jax.random.normal(keys[2], (hidden, d_model), dtype) * scale(hidden))

  def loss(params, x):
    return jnp.sum(swiglu(x, *params).astype(jnp.float32) ** 2)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def zipf_tokens(tokens: int, d_model: int, num_experts: int, *, a: float, strength: float, dtype, seed: int = 0):
  """(x [1, tokens, D], router weight [D, E]) whose top-1 routing follows a Zipf law over the experts.

  The router's columns are orthonormal directions; token t adds `strength` times the column of its preferred
  expert e_t ~ P(rank r) ∝ r^-a to a standard normal input, so x_t · w_e = N(0, 1) + strength [e = e_t].
  """
  if num_experts > d_model:
    raise ValueError(f"--routing zipf needs num_experts ({num_experts}) <= d_model ({d_model}) "
                     "(orthonormal router columns); raise --d-model")
  rng = np.random.default_rng(seed)
  columns, _ = np.linalg.qr(rng.standard_normal((d_model, num_experts)))
  probs = np.arange(1, num_experts + 1, dtype=np.float64) ** -a
  preferred = rng.choice(num_experts, size=tokens, p=probs / probs.sum())
  x = rng.standard_normal((tokens, d_model)) + strength * columns[:, preferred].T
  return jnp.asarray(x[None], dtype), jnp.asarray(columns, jnp.float32)


def load_imbalance(x, router_weight, top_k: int) -> float:
  """max / mean expert load of the top-k picks under `router_weight` (1.0 = perfectly balanced)."""
  logits = np.asarray(x[0], np.float32) @ np.asarray(router_weight, np.float32)
  picks = np.argsort(-logits, axis=-1)[:, :top_k]
  load = np.bincount(picks.ravel(), minlength=logits.shape[-1])
  return float(load.max() / load.mean())


def _moe_step(d_model: int, config: MoEConfig, dtype, router_weight=None):
  layer = MoEFeedForward(d_model, config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  if router_weight is not None:
    layer.router.weight[...] = router_weight.astype(layer.router.weight[...].dtype)
  graphdef, params, extra = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    model = nnx.merge(graphdef, params, extra, copy=True)
    y, aux = model(x)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux["aux_loss"]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


class _Timed:
  """A compiled step with its arguments; `run()` times one call."""

  def __init__(self, name, step, params, x):
    self.name, self.args = name, (params, x)
    start = time.perf_counter()
    self.compiled = step.lower(*self.args).compile()
    self.compile_seconds = time.perf_counter() - start
    self.memory = _memory_bytes(self.compiled)
    self.times: list[float] = []

  def run(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.compiled(*self.args))
    elapsed = time.perf_counter() - start
    self.times.append(elapsed)
    return elapsed


def run_grid(experts, top_ks, dispatches, *, tokens, d_model, hidden, repeats, dtype, max_step_seconds,
             config_overrides=None, routing="uniform", zipf_a=1.2, zipf_strength=3.0, log=print):
  if repeats < 3:
    raise ValueError(f"repeats={repeats}: medians need at least 3 samples")
  rows = []
  ragged_seconds_per_expert = None
  for top_k in top_ks:
    for num_experts in experts:
      if routing == "zipf":
        x, router_weight = zipf_tokens(tokens, d_model, num_experts, a=zipf_a, strength=zipf_strength, dtype=dtype)
      elif routing == "uniform":
        x, router_weight = jax.random.normal(jax.random.key(0), (1, tokens, d_model), dtype), None
      else:
        raise ValueError(f"routing={routing!r} must be 'uniform' or 'zipf'")
      step, params = _dense_step(d_model, top_k * hidden, dtype, jax.random.key(1))
      entries = [_Timed("dense", step, params, x)]
      skipped, imbalance = {}, None
      for dispatch in dispatches:
        if dispatch == "dropless_ragged_dot" and ragged_seconds_per_expert is not None:
          predicted = ragged_seconds_per_expert * num_experts
          if predicted > max_step_seconds:
            skipped[dispatch] = f"skipped: predicted {predicted:.0f} s per step > {max_step_seconds:.0f} s"
            continue
        config = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=hidden, dispatch=dispatch,
                           capacity_factor=1.25, **(config_overrides or {}))
        step, params = _moe_step(d_model, config, dtype, router_weight)
        entries.append(_Timed(dispatch, step, params, x))
        if imbalance is None:
          imbalance = load_imbalance(x, params["router"]["weight"][...], top_k)
      for entry in entries:  # warm-up
        entry.run()
        entry.times.clear()
      for repeat in range(repeats):  # interleaved in alternating order, so load changes hit every entry alike
        for entry in entries[::-1] if repeat % 2 else entries:
          if entry.name != "dropless_ragged_dot" or not entry.times or entry.times[-1] < max_step_seconds:
            entry.run()
      dense_median = statistics.median(entries[0].times)
      for entry in entries:
        median = statistics.median(entry.times)
        if entry.name == "dropless_ragged_dot":
          ragged_seconds_per_expert = median / num_experts
        row = dict(experts=num_experts, top_k=top_k, dispatch=entry.name, seconds=median,
                   tokens_per_second=tokens / median, ratio_to_dense=median / dense_median,
                   memory_mb=None if entry.memory is None else entry.memory / 2**20,
                   compile_seconds=entry.compile_seconds, runs=len(entry.times), routing=routing,
                   load_max_over_mean=None if entry.name == "dense" else imbalance)
        rows.append(row)
        log(f"E={num_experts:4d} k={top_k} {entry.name:20s} {median * 1e3:9.1f} ms  "
            f"{row['tokens_per_second']:10.0f} tok/s  x{row['ratio_to_dense']:.2f} dense  "
            f"{row['memory_mb'] or float('nan'):8.1f} MB")
      for dispatch, why in skipped.items():
        rows.append(dict(experts=num_experts, top_k=top_k, dispatch=dispatch, skipped=why))
        log(f"E={num_experts:4d} k={top_k} {dispatch:20s} {why}")
  return rows


def machine_description() -> str:
  device = jax.devices()[0]
  return (f"{platform.processor() or platform.machine()}, {jax.device_count()} x {device.device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}")


def to_markdown(rows, header: str) -> str:
  lines = [header, "", "| E | k | routing (max/mean load) | dispatch | ms / step | tokens / s | x dense | "
           "peak MB (XLA plan) |", "|---:|---:|---|---|---:|---:|---:|---:|"]
  for row in rows:
    if "skipped" in row:
      lines.append(f"| {row['experts']} | {row['top_k']} | | {row['dispatch']} | {row['skipped']} | | | |")
      continue
    memory = "n/a" if row["memory_mb"] is None else f"{row['memory_mb']:.0f}"
    skew = "" if row.get("load_max_over_mean") is None else f" ({row['load_max_over_mean']:.2f})"
    lines.append(f"| {row['experts']} | {row['top_k']} | {row.get('routing', 'uniform')}{skew} | {row['dispatch']} | "
                 f"{row['seconds'] * 1e3:.1f} | {row['tokens_per_second']:.0f} | {row['ratio_to_dense']:.2f} | "
                 f"{memory} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64, 128])
  parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--dispatch", nargs="+", default=None, choices=DISPATCHES,
                      help="default: every dispatch; on CPU all but dropless_pallas (its interpret mode is a "
                           "correctness path, not a speed one)")
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d-model", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=1024, help="hidden size F of one expert")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--max-step-seconds", type=float, default=60.0)
  parser.add_argument("--block-size", type=int, default=MoEConfig.block_size, help="dropless_gather block rows")
  parser.add_argument("--gather-schedule", default="auto", choices=["auto", "loop", "batched"])
  parser.add_argument("--routing", default="uniform", choices=["uniform", "zipf"])
  parser.add_argument("--zipf-a", type=float, default=1.2, help="Zipf exponent of the expert loads (--routing zipf)")
  parser.add_argument("--zipf-strength", type=float, default=3.0, help="signal added toward a token's expert")
  parser.add_argument("--json", help="write the rows here")
  parser.add_argument("--markdown", help="write a markdown table here")
  args = parser.parse_args(argv)
  if args.dispatch is None:
    on_cpu = jax.default_backend() == "cpu"
    args.dispatch = [name for name in DISPATCHES if not (on_cpu and name == "dropless_pallas")]
  header = (f"MoE fwd+bwd vs dense SwiGLU (hidden k*F), T={args.tokens}, D={args.d_model}, F={args.hidden}, "
            f"{args.dtype}, capacity factor 1.25, dropless_gather block {args.block_size} schedule "
            f"{args.gather_schedule}, routing {args.routing}"
            f"{f' (a={args.zipf_a}, strength {args.zipf_strength})' if args.routing == 'zipf' else ''}, median of "
            f"{args.repeats} alternating repeats after a discarded warm-up; {machine_description()}")
  print(header)
  rows = run_grid(args.experts, args.top_k, args.dispatch, tokens=args.tokens, d_model=args.d_model,
                  hidden=args.hidden, repeats=args.repeats, dtype=jnp.dtype(args.dtype),
                  max_step_seconds=args.max_step_seconds,
                  config_overrides=dict(block_size=args.block_size, gather_schedule=args.gather_schedule),
                  routing=args.routing, zipf_a=args.zipf_a, zipf_strength=args.zipf_strength)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"header": header, "rows": rows}, f, indent=1)
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(to_markdown(rows, header))


if __name__ == "__main__":
  main()
