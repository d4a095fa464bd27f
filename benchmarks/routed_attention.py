#!/usr/bin/env python
"""Content-routed attention layers (moba, nsa, dsa, dsa_block) end to end against dense causal attention.

    python benchmarks/routed_attention.py --out /tmp/routed.json                     # T 4K, 8K, 16K
    python benchmarks/routed_attention.py --seq-lens 4096 --kinds moba --out /tmp/r.json   # one point
    python benchmarks/routed_attention.py --report /tmp/routed.json                  # print the markdown table
    python benchmarks/routed_attention.py --split --seq-lens 4096 --out /tmp/split.json   # where the time goes

One attention layer's routed part as the model runs it (`routed.make_routed(kind)(x, q, k, v, positions)`:
scoring, compression, top-k, traced layout build, attention, gating; DSA's indexer and its KL loss, NSA's gates
and separate K/V projections), forward and forward+backward (gradients of q, k, v, x and the kind's own
parameters), on the xla backend, against the strongest dense path on the same machine: the blocked causal
attention the model uses on CPU (`dense.blocked_causal_attention`, which skips the masked half). All entries of
one T are compiled first, then timed interleaved in alternating order after one discarded warm-up call each,
median of --repeats (>= 3). Batch 1, H = 8 query heads, 2 KV heads (GQA groups of 4), D = 64, f32.

Density is attended (query, key) pairs / T^2 counted from the kind's definition at these settings
(`expected_pairs`; NSA sums its three branches, DSA-family kinds add no indexer cost to it); the bound is
causal density / density, what skipping work can buy over a path that computes exactly the causal half;
"of bound" = speedup / bound. The indexer (DSA) and compressed branch (NSA) are O(T^2 / stride) work that the
density leaves out, so their share shows in the fraction. Peak memory is XLA's compiled buffer assignment.

Kind settings (papers' values where a CPU can run them; see KIND_SETTINGS): MoBA block 512, top-3 (the paper's
8K setting); NSA l=32, d=16, l'=64, n=16, w=512 (the paper's); DSA top-2048 with a 4-head x 32 indexer (the
paper's 64 x 128 indexer costs more per pair than the attention at H=8, D=64), dsa_block in 64-token blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.benchmarks.attention import _Timed, machine, time_interleaved

from sparseformer.layers.attention import dense
from sparseformer.layers.attention.config import SparseAttentionConfig
from sparseformer.layers.attention.routed import make_routed
from sparseformer.layers.attention.routed.config import DSAConfig, MoBAConfig, NSAConfig

HEADS, KV_HEADS, DIM, MODEL_DIM = 8, 2, 64, 512
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks")
KIND_SETTINGS = {
    "moba": dict(moba=MoBAConfig(block_size=512, topk=3)),
    "nsa": dict(nsa=NSAConfig()),
    "dsa": dict(dsa=DSAConfig(index_heads=4, index_head_dim=32, rope_dim=16, topk=2048)),
    "dsa_block": dict(dsa=DSAConfig(index_heads=4, index_head_dim=32, rope_dim=16, topk=2048, block_size=64)),
}


def sparse_config(kind: str) -> SparseAttentionConfig:
  return SparseAttentionConfig(backend="xla", block_size=64, **KIND_SETTINGS[kind])


def expected_pairs(kind: str, seq: int) -> float:
  """Attended (query, key) pairs of `kind` at KIND_SETTINGS for T = seq, from the kinds' definitions."""
  t = np.arange(seq)
  if kind == "moba":
    cfg = KIND_SETTINGS["moba"]["moba"]
    own = t // cfg.block_size
    keys = t - own * cfg.block_size + 1 + np.minimum(cfg.topk - 1, own) * cfg.block_size
  elif kind == "nsa":
    cfg = KIND_SETTINGS["nsa"]["nsa"]
    compressed = np.maximum(0, (t - cfg.compress_block) // cfg.compress_stride + 1)
    visible_blocks = t // cfg.select_block + 1
    selected = np.minimum(t + 1, np.minimum(cfg.num_selected, visible_blocks) * cfg.select_block)
    keys = compressed + selected + np.minimum(cfg.window, t + 1)
  elif kind in ("dsa", "dsa_block"):
    keys = np.minimum(KIND_SETTINGS[kind]["dsa"].topk, t + 1)
  else:
    raise ValueError(f"unknown kind {kind!r}")
  return float(keys.sum())


def _routed_functions(kind: str, seq: int):
  """(fwd, fwd+bwd) of the routed module over (params, x, q, k, v, cotangent)."""
  module = make_routed(kind, dim=MODEL_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM,
                       config=sparse_config(kind), rope_theta=10_000.0, init_std=0.02, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  positions = jnp.arange(seq, dtype=jnp.int32)

  def apply(params, x, q, k, v):
    out, aux = nnx.merge(graphdef, params, rest, copy=True)(x, q, k, v, positions)
    return out, aux.get("aux_loss", jnp.zeros((), jnp.float32))

  def forward(params, x, q, k, v, ct):
    return apply(params, x, q, k, v)[0]

  def forward_backward(params, x, q, k, v, ct):
    def loss(params, x, q, k, v):
      out, aux_loss = apply(params, x, q, k, v)
      return jnp.sum(out * ct) + aux_loss
    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(params, x, q, k, v)

  return params, forward, forward_backward


def _dense_functions():
  def forward(params, x, q, k, v, ct):
    return dense.blocked_causal_attention(q, k, v)

  def forward_backward(params, x, q, k, v, ct):
    return jax.grad(lambda q, k, v: jnp.sum(dense.blocked_causal_attention(q, k, v) * ct), argnums=(0, 1, 2))(q, k, v)

  return {}, forward, forward_backward


def layer_inputs(seq: int):
  """The timed layer's inputs at T = seq, f32, seeded by seq: (x [1, T, MODEL_DIM], q [1, T, H, D], k, v
  [1, T, KVH, D], ct [1, T, H, D] the output cotangent)."""
  keys = jax.random.split(jax.random.key(seq), 5)
  x = jax.random.normal(keys[0], (1, seq, MODEL_DIM), jnp.float32)
  q, ct = (jax.random.normal(key, (1, seq, HEADS, DIM), jnp.float32) for key in keys[1:3])
  k, v = (jax.random.normal(key, (1, seq, KV_HEADS, DIM), jnp.float32) for key in keys[3:5])
  return x, q, k, v, ct


def run(seq_lens, kinds, *, repeats: int, log=print) -> list[dict]:
  rows = []
  for seq in seq_lens:
    x, q, k, v, ct = layer_inputs(seq)
    entries = []
    for kind in ("dense",) + tuple(kinds):
      params, forward, forward_backward = _dense_functions() if kind == "dense" else _routed_functions(kind, seq)
      for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        entry = _Timed((kind, mode), fn, (params, x, q, k, v, ct))
        log(f"T={seq:6d} {kind:10s} {mode:8s} compiled in {entry.compile_seconds:5.1f} s, "
            f"peak {(entry.peak_bytes or 0) / 2**20:9.1f} MB")
        entries.append(entry)
    time_interleaved(entries, repeats)
    causal_density = (seq + 1) / (2 * seq)
    medians = {entry.name: statistics.median(entry.times) for entry in entries}
    for entry in entries:
      kind, mode = entry.name
      density = causal_density if kind == "dense" else expected_pairs(kind, seq) / seq**2
      speedup = medians[("dense", mode)] / medians[entry.name]
      bound = causal_density / density
      rows.append(dict(kind=kind, seq=seq, mode=mode, seconds=medians[entry.name], runs=len(entry.times),
                       density=density, bound=bound, speedup=speedup, of_bound=speedup / bound,
                       peak_mb=None if entry.peak_bytes is None else entry.peak_bytes / 2**20,
                       compile_seconds=entry.compile_seconds))
      log(f"T={seq:6d} {kind:10s} {mode:8s} {rows[-1]['seconds'] * 1e3:10.1f} ms  density {density:.3f}  "
          f"speedup {speedup:5.2f}x of bound {bound:5.2f}x = {rows[-1]['of_bound']:4.0%}  "
          f"peak {rows[-1]['peak_mb'] or 0:9.1f} MB")
  return rows


def split_functions(kind: str, seq: int, x, q, k, v, ct) -> dict:
  """The layer's parts as separate functions of (q, k, v) for `--split` (where the fwd+bwd time goes): the
  kv_major attention (fwd, fwd+bwd; the selection fixed from these inputs), and per kind what surrounds it
  (MoBA's selection; NSA's compressed branch, selection, window branch; dsa_block's indexer + block top-k and
  the selected KL with the gradient to the indexer features, gathered per query and in kv_major tiles). Same
  settings as the benchmark."""
  from sparseformer.layers.attention import backends  # noqa: PLC0415
  from sparseformer.layers.attention.routed import dsa, dsa_loss, dsa_tile_kl, kv_major, moba, nsa  # noqa: PLC0415
  from sparseformer.layers.attention.routed import nsa_compress as nc  # noqa: PLC0415

  def with_grad(fn):
    return lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct),
                                    argnums=(0, 1, 2))(q, k, v)

  parts = {}
  if kind == "moba":
    cfg = KIND_SETTINGS["moba"]["moba"]
    parts["selection"] = lambda q, k, v: moba.select_blocks(q, k, cfg.block_size, cfg.topk)
    index, block = moba.select_blocks(q, k, cfg.block_size, cfg.topk), cfg.block_size
  elif kind == "nsa":
    cfg = KIND_SETTINGS["nsa"]["nsa"]
    geo = dict(block=cfg.compress_block, stride=cfg.compress_stride)
    selection = dict(select_block=cfg.select_block, num_selected=cfg.num_selected, init_blocks=cfg.init_blocks,
                     local_blocks=cfg.local_blocks)

    def compressed(q, k, v, selection=None):
      return nc.compressed_branch(q, nc.compress(k, **geo), nc.compress(v, **geo), query_chunk=cfg.query_chunk,
                                  selection=selection, **geo)
    parts["compressed branch"] = lambda q, k, v: compressed(q, k, v)[0]
    parts["compressed branch fwd+bwd"] = with_grad(parts["compressed branch"])
    select = lambda q, k, v: compressed(q, k, v, selection)[1]  # noqa: E731
    parts["compressed branch + selection"] = select
    index, block = select(q, k, v), cfg.select_block
    layout = nsa.window_layout(seq, window=cfg.window, block_q=64, block_kv=64)
    parts["window branch"] = lambda q, k, v: backends.attend(q, k, v, layout, backend="xla")
    parts["window branch fwd+bwd"] = with_grad(parts["window branch"])
  else:
    cfg = KIND_SETTINGS[kind]["dsa"]
    module = make_routed(kind, dim=MODEL_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM,
                         config=sparse_config(kind), rope_theta=10_000.0, init_std=0.02, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    positions = jnp.arange(seq)
    chunks = dict(key_chunk=cfg.key_chunk, query_chunk=cfg.query_chunk)
    parts["indexer + block top-k"] = lambda q, k, v: dsa.select_blocks(module.indexer(x, positions), cfg.topk,
                                                                       cfg.block_size, **chunks)
    features = module.indexer(x, positions)
    block_index = dsa.select_blocks(features, cfg.topk, cfg.block_size, **chunks)
    tokens = dsa.block_tokens(block_index, cfg.block_size)
    index, block = block_index[:, None], cfg.block_size
    kl = lambda f, q, k: dsa_loss.selected_indexer_kl(  # noqa: E731
        q, k, f, tokens, query_chunk=cfg.query_chunk, block_size=cfg.block_size)
    parts["selected KL, block gather fwd+bwd"] = lambda q, k, v: jax.grad(kl)(features, q, k)
    _, lse = kv_major.attend_kv_major(q, k, v, block_index[:, None], block_kv=cfg.block_size, return_lse=True)
    tiled = lambda f, q, k: dsa_tile_kl.block_indexer_kl(q, k, f, block_index, lse,  # noqa: E731
                                                         block_size=cfg.block_size)
    parts["selected KL, kv_major tiles fwd+bwd (the model's)"] = lambda q, k, v: jax.grad(tiled)(features, q, k)
  for gradient in ("autodiff", "flash"):
    attend = lambda q, k, v, gradient=gradient: kv_major.attend_kv_major(q, k, v, index, block_kv=block,  # noqa: E731
                                                                         gradient=gradient)
    if gradient == "autodiff":
      parts["kv_major attention"] = attend
    parts[f"kv_major attention fwd+bwd ({gradient})"] = with_grad(attend)
  return parts


def run_split(seq: int, kinds, *, repeats: int, log=print) -> list[dict]:
  """`--split`: each kind's parts (`split_functions`) with the dense baseline, timed interleaved."""
  x, q, k, v, ct = layer_inputs(seq)
  dense_fwd = lambda q, k, v: dense.blocked_causal_attention(q, k, v)  # noqa: E731
  entries = [_Timed(("dense", "fwd"), dense_fwd, (q, k, v)),
             _Timed(("dense", "fwd+bwd"), lambda q, k, v: _dense_functions()[2]({}, x, q, k, v, ct), (q, k, v))]
  for kind in kinds:
    entries += [_Timed((kind, name), fn, (q, k, v)) for name, fn in split_functions(kind, seq, x, q, k, v, ct).items()]
  time_interleaved(entries, repeats)
  rows = [dict(seq=seq, kind=e.name[0], part=e.name[1], seconds=statistics.median(e.times),
               peak_mb=None if e.peak_bytes is None else e.peak_bytes / 2**20) for e in entries]
  for row in rows:
    log(f"T={seq} {row['kind']:10s} {row['part']:45s} {row['seconds'] * 1e3:9.1f} ms")
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| T | kind | mode | ms | density | speedup vs dense | bound | of bound | peak MB |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    lines.append(f"| {row['seq']} | {row['kind']} | {row['mode']} | {row['seconds'] * 1e3:.0f} | {row['density']:.3f} "
                 f"| {row['speedup']:.2f}x | {row['bound']:.2f}x | {row['of_bound']:.0%} | {row['peak_mb'] or 0:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
  parser.add_argument("--kinds", nargs="+", default=list(KIND_SETTINGS), choices=list(KIND_SETTINGS))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", help="write the rows and the machine as JSON here")
  parser.add_argument("--report", nargs="+", metavar="JSON", help="print the markdown table of earlier --out files")
  parser.add_argument("--split", action="store_true", help="time each kind's parts at the first --seq-lens")
  args = parser.parse_args(argv)
  if args.split:
    rows = run_split(args.seq_lens[0], args.kinds, repeats=args.repeats)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as file:
        json.dump({"machine": machine(), "split": rows}, file, indent=2)
    return
  if args.report:
    for path in args.report:
      with open(path, encoding="utf-8") as file:
        run_record = json.load(file)
      print(f"machine: {run_record['machine']}\n\n{table(run_record['rows'])}\n")
    return
  rows = run(args.seq_lens, args.kinds, repeats=args.repeats)
  record = {"machine": machine(), "rows": rows, "settings": {k: repr(v) for k, v in KIND_SETTINGS.items()}}
  if args.out:
    with open(args.out, "w", encoding="utf-8") as file:
      json.dump(record, file, indent=2)
  print(table(rows))


if __name__ == "__main__":
  main()
