#!/usr/bin/env python
"""Generation speed: KV-cache decode (models/decode.py) against the recompute sampler, and sparse against global.

    python benchmarks/decode.py --out /tmp/decode.json            # CPU: contexts 256, 1K, 4K; local vs global at 4K
    python benchmarks/decode.py --gpu --out /tmp/decode_gpu.json  # GPU: global / local / nsa at 32K
    python benchmarks/decode.py --parts local --out /tmp/local.json  # only local vs global at 4K
    python benchmarks/decode.py --report /tmp/decode.json         # print the markdown tables again

Cached vs recompute (the issue's first goal, >= 10x at 1K on CPU): the `quickstart` model (4 layers, d 128,
2 heads of 64, global attention, f32) with max_seq_len = the context C. One generated token at context C is,
for the recompute sampler (train/sample.py), one forward pass over a [1, C] window plus its greedy pick; for
the cache, one `decode` step with C - 1 positions already cached plus `generate.next_tokens` (greedy). Both
entries of a context are timed interleaved in one process, alternating order, after one discarded warm-up call
each; tokens/s = 1 / median seconds per token, speedup = ratio of the medians. The cached entry appends a token
per call (the cache is a value: each call continues from the last), so its position drifts by --repeats + 1
tokens over the timing, which is noise at these contexts.

Local vs global (second goal): the same model with every layer `local` (window --window, a ring cache of
`window` slots) or `global` (a full cache), both decoding at context --local-context. KV bytes per token are the
K and V each step reads over all layers (layers x 2 x KV heads x head dim x keys read x bytes per value; keys
read = C for global, min(window, C) for local); the bound is their ratio, "of bound" = speedup / bound. The
weights are read by both alike (shown beside: they cap the speedup a small model can show).

GPU mode (--gpu; exits with a message on a machine without one): per-token decode latency of global, local and
nsa layers at --gpu-context (32K) against the same KV-bytes ratio (nsa: compressed keys + selected blocks + the
window, from its config). Latency is what a user waits per token at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.benchmarks.attention import machine, time_interleaved
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.models import decode as decode_lib
from sparseformer.models import presets
from sparseformer.models.decoder import DecoderLM
from sparseformer.train import generate, sample


class _Entry:
  """A named callable; `run()` times one call (blocking) and keeps the seconds in `times`."""

  def __init__(self, name, call):
    self.name, self.call, self.times = name, call, []

  def run(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.call())
    self.times.append(time.perf_counter() - start)
    return self.times[-1]


def build_model(config) -> nnx.Module:
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  model.eval()
  return model


def cached_entry(name, model, context: int, repeats: int) -> _Entry:
  """Decode steps at context ~C: prefill C - 1 - (repeats + 1) random tokens, then each call appends one."""
  config = model.config
  prefix = max(1, context - repeats - 2)
  tokens = np.random.default_rng(context).integers(0, 256, (1, prefix)).astype(np.int32)
  cache = decode_lib.init_cache(model, 1, config.max_seq_len)
  model = decode_lib.snapshot(model)  # split once, as generate does
  logits, cache = decode_lib.prefill(model, tokens, np.asarray([prefix], np.int32), cache)
  state = {"cache": cache, "logits": logits, "step": 0}
  settings = (np.float32(0.0), np.int32(0), np.float32(1.0), np.int32(config.vocab_size))

  def step():
    token = generate.next_tokens(state["logits"], np.uint32(0), np.zeros(1, np.int32), np.int32(state["step"]),
                                 *settings)
    state["logits"], state["cache"] = decode_lib.decode(model, state["cache"], token)
    state["step"] += 1
    return state["logits"]

  entry = _Entry(name, step)
  entry.cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
  return entry


def recompute_entry(name, model, context: int) -> _Entry:
  """One token of train/sample.py at a full [1, C] window: the forward pass it runs per token."""
  graphdef, state = nnx.split(model)
  next_token = sample._next_token_fn(graphdef, 0.0, 0)  # pylint: disable=protected-access
  buffer = np.random.default_rng(context).integers(0, 256, (1, context)).astype(np.int32)
  key = jax.random.key(0)
  return _Entry(name, lambda: next_token(state, buffer, context, key))


def kv_bytes_per_token(config, context: int) -> int:
  """Bytes of K and V one decode step reads over all layers at context C (see the module docstring)."""
  itemsize = jnp.dtype(config.dtype).itemsize
  per_key = 2 * config.num_kv_heads * config.resolved_head_dim * itemsize
  total = 0
  for layer in range(config.num_layers):
    kind, attention = config.attention_kind(layer), config.attention
    if kind == "global":
      keys = context
    elif kind == "local":
      keys = min(attention.window, context)
    elif kind == "nsa":
      nsa = attention.nsa
      compressed = max(0, (context - nsa.compress_block) // nsa.compress_stride + 1)
      keys = compressed + min(context, nsa.num_selected * nsa.select_block) + min(nsa.window, context)
    else:
      raise ValueError(f"no KV-bytes count for attention kind {kind!r}")
    total += keys * per_key
  return total


def param_bytes(model) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _medians(entries) -> dict:
  return {entry.name: statistics.median(entry.times) for entry in entries}


def cached_vs_recompute(contexts, *, repeats: int, base="quickstart", log=print, **changes) -> list[dict]:
  rows = []
  for context in contexts:
    model = build_model(presets.get(base, max_seq_len=context, **changes))
    entries = [cached_entry("cached", model, context, repeats), recompute_entry("recompute", model, context)]
    log(f"C={context:6d}: compiled; cache {entries[0].cache_bytes / 2**20:.1f} MB")
    time_interleaved(entries, repeats)
    medians = _medians(entries)
    rows.append(dict(context=context, cached_seconds=medians["cached"], recompute_seconds=medians["recompute"],
                     cached_tokens_per_s=1 / medians["cached"], recompute_tokens_per_s=1 / medians["recompute"],
                     speedup=medians["recompute"] / medians["cached"], runs=repeats,
                     cache_mb=entries[0].cache_bytes / 2**20))
    log(f"C={context:6d}: cached {rows[-1]['cached_tokens_per_s']:8.1f} tok/s, recompute "
        f"{rows[-1]['recompute_tokens_per_s']:8.2f} tok/s, speedup {rows[-1]['speedup']:6.1f}x")
  return rows


def sparse_vs_global(context: int, kinds, *, window: int, repeats: int, base="quickstart", log=print,
                     **changes) -> list[dict]:
  """Per-token decode of models whose every layer is `kind`, against `global`, at one context."""
  entries, configs, models = [], {}, {}
  for kind in ("global",) + tuple(kinds):
    attention = SparseAttentionConfig(window=window)
    configs[kind] = presets.get(base, max_seq_len=context, attention_pattern=(kind,), attention=attention,
                                **changes)
    models[kind] = build_model(configs[kind])
    entries.append(cached_entry(kind, models[kind], context, repeats))
    log(f"C={context:6d} {kind:7s}: compiled; cache {entries[-1].cache_bytes / 2**20:.1f} MB")
  time_interleaved(entries, repeats)
  medians = _medians(entries)
  rows = []
  for entry in entries:
    kv = kv_bytes_per_token(configs[entry.name], context)
    bound = kv_bytes_per_token(configs["global"], context) / kv
    speedup = medians["global"] / medians[entry.name]
    rows.append(dict(kind=entry.name, context=context, window=window, seconds=medians[entry.name], runs=repeats,
                     tokens_per_s=1 / medians[entry.name], kv_bytes_per_token=kv,
                     param_bytes=param_bytes(models[entry.name]), cache_mb=entry.cache_bytes / 2**20,
                     speedup=speedup, bound=bound, of_bound=speedup / bound))
    log(f"C={context:6d} {entry.name:7s}: {rows[-1]['seconds'] * 1e3:8.2f} ms/token, KV {kv / 2**20:.2f} MB/token, "
        f"speedup {speedup:5.2f}x of bound {bound:5.2f}x = {rows[-1]['of_bound']:.0%}")
  return rows


def tables(record: dict) -> str:
  lines = ["| context | cached tok/s | recompute tok/s | speedup | cache MB |", "|---:|---:|---:|---:|---:|"]
  for row in record.get("cached_vs_recompute", []):
    lines.append(f"| {row['context']} | {row['cached_tokens_per_s']:.1f} | {row['recompute_tokens_per_s']:.2f} | "
                 f"{row['speedup']:.1f}x | {row['cache_mb']:.1f} |")
  for key in ("sparse_vs_global", "gpu"):
    if record.get(key):
      lines += ["", "| kind | context | ms/token | KV MB read/token | weights MB | cache MB | speedup vs global "
                "| KV-bytes bound | of bound |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
      for row in record[key]:
        if "error" in row:
          lines.append(f"| {row['kind']} | {row['context']} | unsupported: {row['error']} | | | | | | |")
          continue
        lines.append(f"| {row['kind']} | {row['context']} | {row['seconds'] * 1e3:.2f} | "
                     f"{row['kv_bytes_per_token'] / 2**20:.2f} | {row['param_bytes'] / 2**20:.2f} | "
                     f"{row['cache_mb']:.1f} | {row['speedup']:.2f}x | {row['bound']:.2f}x | {row['of_bound']:.0%} |")
  return "\n".join(lines)


def run_gpu(context: int, *, window: int, repeats: int, log=print) -> list[dict]:
  """global / local / nsa decode latency at `context` on the GPU (nsa: an error row if it cannot decode)."""
  rows = sparse_vs_global(context, ("local",), window=window, repeats=repeats, log=log, dtype="bfloat16")
  try:
    rows += [row for row in sparse_vs_global(context, ("nsa",), window=window, repeats=repeats, log=log,
                                             dtype="bfloat16", num_kv_heads=2) if row["kind"] == "nsa"]
  except (ValueError, NotImplementedError) as error:
    rows.append(dict(kind="nsa", context=context, error=str(error).split("\n")[0]))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
  parser.add_argument("--local-context", type=int, default=4096)
  parser.add_argument("--window", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--parts", default="recompute,local", help="CPU parts to run: recompute (cached vs "
                      "recompute at --contexts), local (local vs global at --local-context), or both")
  parser.add_argument("--gpu", action="store_true", help="the GPU mode instead (needs a GPU)")
  parser.add_argument("--gpu-context", type=int, default=32768)
  parser.add_argument("--out", help="write the rows and the machine as JSON here (must not exist)")
  parser.add_argument("--report", metavar="JSON", help="print the tables of an earlier --out file")
  args = parser.parse_args(argv)
  if args.report:
    with open(args.report, encoding="utf-8") as file:
      record = json.load(file)
    print(f"machine: {record['machine']}\n\n{tables(record)}")
    return
  if args.out and os.path.exists(args.out):
    sys.exit(f"--out {args.out} exists; give a new path (nothing is overwritten).")
  record = {"machine": machine(), "settings": vars(args)}
  print(f"machine: {record['machine']}", flush=True)
  if args.gpu:
    if jax.default_backend() != "gpu":
      sys.exit(f"--gpu needs a GPU; this machine's JAX backend is {jax.default_backend()!r}.")
    record["gpu"] = run_gpu(args.gpu_context, window=args.window, repeats=args.repeats)
  else:
    parts = args.parts.split(",")
    if "recompute" in parts:
      record["cached_vs_recompute"] = cached_vs_recompute(args.contexts, repeats=args.repeats)
    if "local" in parts:
      record["sparse_vs_global"] = sparse_vs_global(args.local_context, ("local",), window=args.window,
                                                    repeats=args.repeats)
  record["machine_after"] = machine()
  if args.out:
    with open(args.out, "w", encoding="utf-8") as file:
      json.dump(record, file, indent=2)
  print(tables(record))


if __name__ == "__main__":
  main()
