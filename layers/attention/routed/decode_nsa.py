"""Cached decode for NSA (Yuan et al., 2025, arXiv 2502.11089): the three gated branches of eq. 5 for one new
token per row, equal to nsa.py's forward at every position. Paper Table 4 counts the keys a step loads as
floor((s - l) / d) + n * l' + w; this step reads exactly those (compressed keys, n selected blocks, window).

Cache (only the arrays the configured branches and `attention.nsa.separate_kv` need):

  k, v          [B, max_len, KVH, D]   the Attention's roped K/V: the selected branch (any past block may be
                                       picked); with shared K/V also the window and the compression input
  cmp_k, cmp_v  [B, T_c(max_len), KVH, D]  phi of every complete compression block j (tokens j*d .. j*d + l - 1,
                                       eq. 7), key j roped at j*d; written on the step that completes it
  cmp_k_raw, cmp_v_raw  [B, l, KVH, D] separate K/V only: a ring of the last l un-roped compression-branch
                                       K/V (the input of phi); shared K/V un-ropes the cached k instead
  win_k, win_v  [B, window, KVH, D]    separate K/V only: a ring of the window branch's K/V (memory O(w))

Step at position p: write the token's K/V; if p = j*d + l - 1, compress block j (the same `nsa_compress.compress`
as training, over the same l tokens) into cmp_*; attend the compressed keys j*d + l - 1 <= p (eq. 8) and keep
their probabilities; map them to selection blocks (eqs. 9-10: overlap weights, summed over the GQA group),
force block 0 .. init_blocks - 1 and the local blocks ending at p // l', take the top n (ties to the lower
block) and gather only those blocks' K/V (keys <= p); attend the window p - w + 1 .. p; gate the three by
sigmoid(gate(x_t)). Training's slot count min(n, blocks in T) and decode's min(n, blocks in max_len) keep
the same top min(n, visible blocks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparseformer.layers import rope, routing
from sparseformer.layers.attention.routed import decode_common as dc
from sparseformer.layers.attention.routed import nsa_compress as nc
from sparseformer.layers.attention.routed.config import NSA_BRANCHES

_KV_AXES = ("batch", "kv_seq", "kv_heads", "head_dim")


def _shapes(module, batch: int, max_len: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """name -> (shape, logical axes) of every cache array this configuration keeps."""
  nsa = module.config.nsa
  heads = (module.num_kv_heads, module.head_dim)
  compressing = "compressed" in nsa.branches or "selected" in nsa.branches
  names = {}
  if not nsa.separate_kv or "selected" in nsa.branches:
    names.update(k=(max_len, _KV_AXES), v=(max_len, _KV_AXES))
  if compressing:
    blocks = nc.num_compressed(max_len, block=nsa.compress_block, stride=nsa.compress_stride)
    axes = ("batch", "kv_blocks", "kv_heads", "head_dim")
    names.update(cmp_k=(blocks, axes), cmp_v=(blocks, axes))
    if nsa.separate_kv:
      names.update(cmp_k_raw=(nsa.compress_block, _KV_AXES), cmp_v_raw=(nsa.compress_block, _KV_AXES))
  if nsa.separate_kv and "window" in nsa.branches:
    names.update(win_k=(nsa.window, _KV_AXES), win_v=(nsa.window, _KV_AXES))
  return {name: ((batch, length, *heads), axes) for name, (length, axes) in names.items()}


def init_cache(module, batch: int, max_len: int) -> dict[str, jax.Array]:
  """Zero cache of one NSA layer for `batch` rows of up to `max_len` tokens."""
  return {name: jnp.zeros(shape, module.dtype) for name, (shape, _) in _shapes(module, batch, max_len).items()}


def cache_logical_axes(module) -> dict[str, tuple[str, ...]]:
  """Logical axis names of each cache array (the sharding rules place them on the mesh)."""
  return {name: axes for name, (_, axes) in _shapes(module, 1, 1).items()}


def _branch_inputs(module, x: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array):
  """(k_cmp, v_cmp) un-roped compression inputs and (k_win, v_win), as nsa.NSAAttention.forward builds them."""
  if module.config.nsa.separate_kv:
    k_win = rope.apply_rope(module._project(x, "wk_win"), positions, theta=module.rope_theta)  # noqa: SLF001
    return (module._project(x, "wk_cmp"), module._project(x, "wv_cmp"), k_win,  # noqa: SLF001
            module._project(x, "wv_win"))  # noqa: SLF001
  return rope.apply_rope(k, -positions, theta=module.rope_theta), v, k, v


def prefill(module, x, q, k, v, positions, lengths, cache):
  """The training forward over the right-padded prompt (exact by causality) and the cache of the real tokens."""
  nsa = module.config.nsa
  lengths = jnp.asarray(lengths, jnp.int32)
  # Without the full K/V (separate K/V, no selected branch) only the compressed cache bounds the length.
  max_len = cache["k"].shape[1] if "k" in cache else q.shape[1]
  dc.check_prefill("nsa", q, k, lengths, max_len)
  blocks = nc.num_compressed(q.shape[1], block=nsa.compress_block, stride=nsa.compress_stride)
  if "cmp_k" in cache and blocks > cache["cmp_k"].shape[1]:
    raise ValueError(f"nsa prefill: {q.shape[1]} prompt positions exceed the cache's max_len (room for "
                     f"{cache['cmp_k'].shape[1]} compressed blocks); build the cache with a larger max_len.")
  positions = jnp.asarray(positions)
  out, _, _ = module.forward(x, q, k, v, positions)
  x = x.astype(module.dtype)
  k_cmp, v_cmp, k_win, v_win = _branch_inputs(module, x, k.astype(module.dtype), v.astype(module.dtype), positions)
  new = {}
  if "k" in cache:
    new["k"], new["v"] = (dc.keep_real(a.astype(module.dtype), lengths, max_len) for a in (k, v))
  if "cmp_k" in cache:
    geo = dict(block=nsa.compress_block, stride=nsa.compress_stride)
    cmp_k = nc.compress(k_cmp, mlp=module.compression_mlp("k"), **geo)
    cmp_v = nc.compress(v_cmp, mlp=module.compression_mlp("v"), **geo)
    first = positions[..., :cmp_k.shape[1] * nsa.compress_stride:nsa.compress_stride]
    cmp_k = rope.apply_rope(cmp_k, first, theta=module.rope_theta)
    # Block j is complete (cached) iff its last token j*d + l - 1 is real.
    complete = jnp.arange(cmp_k.shape[1]) * nsa.compress_stride + nsa.compress_block
    completed = jnp.sum(complete[None, :] <= lengths[:, None], axis=1)
    capacity = cache["cmp_k"].shape[1]
    new["cmp_k"], new["cmp_v"] = (dc.keep_real(a, completed, capacity)[:, :capacity] for a in (cmp_k, cmp_v))
  if "cmp_k_raw" in cache:
    new["cmp_k_raw"], new["cmp_v_raw"] = (dc.ring_from_sequence(a, lengths, nsa.compress_block)
                                          for a in (k_cmp, v_cmp))
  if "win_k" in cache:
    new["win_k"], new["win_v"] = (dc.ring_from_sequence(a, lengths, nsa.window) for a in (k_win, v_win))
  return dc.keep_real(out, lengths), new


def _compress_new_block(module, cache, positions):
  """cmp_k / cmp_v with block j = (p - l + 1) / d written in each row whose token p completes it."""
  nsa = module.config.nsa
  if cache["cmp_k"].shape[1] == 0:  # max_len < l: no block ever completes
    return cache["cmp_k"], cache["cmp_v"]
  block, stride = nsa.compress_block, nsa.compress_stride
  start = positions - block + 1
  complete = (start >= 0) & (start % stride == 0)
  tokens = jnp.maximum(start, 0)[:, None] + jnp.arange(block)  # [B, l]
  rows = jnp.arange(positions.shape[0])[:, None]
  if nsa.separate_kv:
    raw_k, raw_v = cache["cmp_k_raw"][rows, tokens % block], cache["cmp_v_raw"][rows, tokens % block]
  else:
    raw_k = rope.apply_rope(cache["k"][rows, tokens], -tokens, theta=module.rope_theta)
    raw_v = cache["v"][rows, tokens]
  geo = dict(block=block, stride=stride)
  cmp_k = nc.compress(raw_k, mlp=module.compression_mlp("k"), **geo)  # [B, 1, KVH, D]
  cmp_v = nc.compress(raw_v, mlp=module.compression_mlp("v"), **geo)
  index = start // stride
  cmp_k = rope.apply_rope(cmp_k, (index * stride)[:, None], theta=module.rope_theta)
  return (dc.write(cache["cmp_k"], index, cmp_k[:, 0], complete),
          dc.write(cache["cmp_v"], index, cmp_v[:, 0], complete))


def _compressed_attention(q_t, cmp_k, cmp_v, positions, *, block: int, stride: int):
  """Eq. 8 for one token: (out [B, H, D] in q_t.dtype, probs f32 [B, KVH, G, T_c]); as
  nsa_compress.compressed_attention with the visibility j*d + l - 1 <= p of each row's position."""
  batch, heads, dim = q_t.shape
  kv_heads, count = cmp_k.shape[2], cmp_k.shape[1]
  group = heads // kv_heads
  if count == 0:
    return jnp.zeros_like(q_t), jnp.zeros((batch, kv_heads, group, 0), jnp.float32)
  q = q_t.reshape(batch, kv_heads, group, dim)
  scores = jnp.einsum("BKGD,BCKD->BKGC", q, cmp_k, preferred_element_type=jnp.float32) / math.sqrt(dim)
  visible = (jnp.arange(count)[None, :] * stride + block - 1 <= positions[:, None])[:, None, None, :]
  row_max = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(jnp.where(visible, scores - row_max, -jnp.inf))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("BKGC,BCKD->BKGD", probs.astype(cmp_v.dtype), cmp_v, preferred_element_type=jnp.float32)
  return out.reshape(batch, heads, dim).astype(q_t.dtype), probs


def _select(module, probs, positions, max_len: int) -> jax.Array:
  """Selection blocks int32 [B, KVH, S] (-1 = empty) of each row's token, nsa_compress.select_blocks' rule."""
  nsa = module.config.nsa
  num_sel = nc.num_select_blocks(max_len, nsa.select_block)
  scores = nc.selection_scores(probs[:, :, :, None, :], num_sel, compress_block=nsa.compress_block,
                               compress_stride=nsa.compress_stride, select_block=nsa.select_block)[:, :, 0]
  own = (positions // nsa.select_block)[:, None, None]
  block = jnp.arange(num_sel)[None, None, :]
  visible = block <= own
  forced = visible & ((block < nsa.init_blocks) | (block > own - nsa.local_blocks))
  top = routing.masked_top_k(scores, min(nsa.num_selected, num_sel), mask=visible, forced=forced)
  return jnp.where(top.valid, top.indices, -1)


def decode_step(module, x_t, q_t, k_t, v_t, positions, cache):
  """One token per row: (out [B, 1, H, D] in q_t.dtype, the updated cache)."""
  dc.check_step("nsa", q_t, k_t, positions)
  nsa = module.config.nsa
  positions = jnp.asarray(positions, jnp.int32)
  x_t = x_t.astype(module.dtype)
  k_cmp, v_cmp, k_win, v_win = _branch_inputs(module, x_t, k_t.astype(module.dtype), v_t.astype(module.dtype),
                                              positions[:, None])
  cache = dict(cache)
  writes = {"k": (k_t, positions), "v": (v_t, positions),
            "cmp_k_raw": (k_cmp, positions % nsa.compress_block), "cmp_v_raw": (v_cmp, positions % nsa.compress_block),
            "win_k": (k_win, positions % nsa.window), "win_v": (v_win, positions % nsa.window)}
  for name, (value, index) in writes.items():
    if name in cache:
      cache[name] = dc.write(cache[name], index, value[:, 0])
  q = q_t[:, 0]
  outs = {}
  if "cmp_k" in cache:
    cache["cmp_k"], cache["cmp_v"] = _compress_new_block(module, cache, positions)
    outs["compressed"], probs = _compressed_attention(q, cache["cmp_k"], cache["cmp_v"], positions,
                                                      block=nsa.compress_block, stride=nsa.compress_stride)
  if "selected" in nsa.branches:
    max_len = cache["k"].shape[1]
    tokens, valid = dc.block_tokens(_select(module, probs, positions, max_len), nsa.select_block, positions,
                                    max_len)
    outs["selected"] = dc.gather_attend(q, cache["k"], cache["v"], tokens, valid)
  if "window" in nsa.branches:
    if "win_k" in cache:
      held = dc.ring_positions(positions, nsa.window)[:, None]  # [B, 1, w]: the ring's slots, in slot order
      slots = jnp.broadcast_to(jnp.arange(nsa.window), held.shape)
      outs["window"] = dc.gather_attend(q, cache["win_k"], cache["win_v"], slots, held >= 0)
    else:
      tokens = (positions[:, None] - nsa.window + 1 + jnp.arange(nsa.window))[:, None]
      outs["window"] = dc.gather_attend(q, cache["k"], cache["v"], tokens, tokens >= 0)
  gates = module.gates(x_t)[:, 0]  # [B, 3, H]
  out = jnp.zeros(q.shape, jnp.float32)
  for c, branch in enumerate(NSA_BRANCHES):
    if branch in nsa.branches:
      out = out + gates[:, c, :, None] * outs[branch].astype(jnp.float32)
  return out.astype(q_t.dtype)[:, None], cache
