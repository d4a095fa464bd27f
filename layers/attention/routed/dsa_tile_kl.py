"""dsa_block's sparse-stage indexer loss in kv_major's tile layout (DeepSeek-V3.2-Exp §2.1).

    L_I = mean_t KL(p_t || softmax_{s in S_t}(I[t, s])),  p_t = the head mean of the attention's own
                                                             distributions over S_t (detached)

`dsa_loss.selected_indexer_kl` gathers, for every query, the K = n * bs selected keys of the main
attention and of the indexer ([T, K, KVH, D] and [T, K, d_I] gathers; 1.6x dense forward at 8K). Here
the selected blocks are dispatched as kv_major does (`kv_major.dispatch`, one row per token): each tile
holds the rows that chose one key block, so a key block is read once per tile and a row carries only its
own q [H, D], indexer query [H_I, d_I] and the attention's log-sum-exp lse [H]. Per tile and row:

  p_s = mean_h exp(q_h . k_s - lse_h)        (the attention's probabilities, from its lse: one pass)
  I_s = sum_j w_j relu(q^I_j . k^I_s)        (eq. 1)

and the KL splits into per-block sums merged per row: KL_t = sum p log p - sum p I + (sum p) LSE_s(I).
The own (partially visible) block runs as kv_major's own-block path. Tiles run `tiles_per_step` at a time
under lax.map, each step a jax.checkpoint (live memory one step's [rows, H, bs] scores).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparseformer.layers.attention.routed import kv_major
from sparseformer.layers.attention.routed.dsa_indexer import IndexerFeatures


def _terms(scores: jax.Array, lse: jax.Array, logits: jax.Array, mask: jax.Array):
  """scores f32 [..., H, S] (scaled), lse [..., H], logits I [..., S], mask [..., S] -> per row (p log p, p I,
  sum p, logsumexp I), each [...]; masked keys count nowhere."""
  finite = jnp.isfinite(lse)
  probs = jnp.exp(jnp.where(mask[..., None, :], scores, -jnp.inf) - jnp.where(finite, lse, 0.0)[..., None])
  p = jnp.mean(jnp.where(finite[..., None], probs, 0.0), axis=-2)  # [..., S]
  entropy = jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  _, _, lse_i = kv_major._softmax_parts(logits, mask)  # the masked log-sum-exp of I
  return entropy, jnp.sum(jnp.where(mask, p * logits, 0.0), axis=-1), jnp.sum(p, axis=-1), lse_i


def _indexer_logits(q_index: jax.Array, weights: jax.Array, k_index: jax.Array, spec: str) -> jax.Array:
  relu = jax.nn.relu(jnp.einsum(spec, q_index, k_index, preferred_element_type=jnp.float32))
  return jnp.einsum("...hs,...h->...s", relu, weights)


def block_indexer_kl(q: jax.Array, k: jax.Array, features: IndexerFeatures, block_index: jax.Array,
                     lse: jax.Array, *, block_size: int, tile: int = 128, tiles_per_step: int = 64) -> jax.Array:
  """The sparse-stage loss of dsa_block: equals `dsa_loss.selected_indexer_kl` on `dsa.block_tokens`.

  q [B, T, H, D], k [B, T, KVH, D]: the main attention's (roped), detached here; features: the indexer's;
  block_index int32 [B, T, n] (dsa.select_blocks: -1 empty, the own block among them); lse f32 [B, T, H]:
  the main attention's row log-sum-exp (`attend_kv_major(return_lse=True)`). Gradients reach only
  `features`. Returns the mean over tokens, f32 scalar.
  """
  batch, seq, heads, dim = q.shape
  kv_heads, slots = k.shape[2], block_index.shape[-1]
  group = heads // kv_heads
  # Scaled as the attention scales (kv_major): p here is its distribution, normalised by its lse.
  q = jax.lax.stop_gradient((q.astype(jnp.float32) / math.sqrt(dim)).astype(q.dtype))
  k, lse = jax.lax.stop_gradient(k), jax.lax.stop_gradient(lse)
  index = block_index.astype(jnp.int32)[:, :, None, :]  # [B, T, 1, n]: one row per token
  plan = jax.lax.stop_gradient(kv_major._plan(index, None, kv_heads=1, block_kv=block_size, tile=tile))
  num_blocks = math.ceil(seq / block_size)
  padded = num_blocks * block_size
  rows = dict(q=q.reshape(batch, seq, 1, kv_heads, group, dim), lse=lse.reshape(batch, seq, 1, kv_heads, group),
              q_index=features.q[:, :, None], weights=features.weights[:, :, None])

  # The own block: causal inside, as kv_major's own-block attention.
  pad = lambda x: kv_major._pad(x, padded).reshape(batch, num_blocks, block_size, *x.shape[2:])  # noqa: E731
  qb, lseb = pad(rows["q"][:, :, 0]), pad(rows["lse"][:, :, 0])
  scores = jnp.einsum("bnqkgd,bnskd->bnqkgs", qb, pad(k), preferred_element_type=jnp.float32)
  logits = _indexer_logits(pad(features.q), pad(features.weights), pad(features.k), "bnqhd,bnsd->bnqhs")
  own = _terms(scores.reshape(*scores.shape[:3], heads, block_size), lseb.reshape(*lseb.shape[:3], heads), logits,
               pad(plan.own_mask[:, :, 0]))
  entropy, cross, mass, lse_i = (x.reshape(batch, padded)[:, :seq] for x in own)

  if plan.slot_assignment is not None:
    key_blocks = lambda x: kv_major._key_blocks(x.reshape(batch, seq, 1, -1), block_size)  # noqa: E731
    k_blocks = key_blocks(k).reshape(-1, block_size, kv_heads, dim)  # [B * nk, bs, KVH, D]
    k_index_blocks = key_blocks(features.k)  # [B * nk, bs, d_I]
    num_tiles = plan.tile_group.shape[0]
    steps = math.ceil(num_tiles / tiles_per_step)
    step_tiles = math.ceil(num_tiles / steps)
    fill = steps * step_tiles - num_tiles
    assignment = jnp.pad(plan.slot_assignment, (0, fill * tile), constant_values=-1).reshape(steps, -1)
    tile_group = jnp.pad(plan.tile_group, (0, fill)).reshape(steps, -1)

    @jax.checkpoint
    def one_step(args):
      slot_assignment, groups = args
      taken = (slot_assignment >= 0).reshape(-1, tile, 1)
      gather = lambda x: x.reshape(-1, *x.shape[3:])[jnp.maximum(slot_assignment, 0) // slots].reshape(  # noqa: E731
          -1, tile, *x.shape[3:])
      scores = jnp.einsum("ntkgd,nskd->ntkgs", gather(rows["q"]), k_blocks[groups],
                          preferred_element_type=jnp.float32)
      logits = _indexer_logits(gather(rows["q_index"]), gather(rows["weights"]), k_index_blocks[groups],
                               "nthd,nsd->nths")
      mask = jnp.broadcast_to(taken, logits.shape)  # a past block is wholly visible
      return _terms(scores.reshape(*scores.shape[:2], heads, block_size),
                    gather(rows["lse"]).reshape(*scores.shape[:2], heads), logits, mask)

    parts = jax.lax.map(one_step, (assignment, tile_group))  # 4 x [steps, step_tiles, tile]
    taken = plan.assignment_slot[:, :, 0] >= 0  # [B, T, n]
    slot = jnp.maximum(plan.assignment_slot[:, :, 0], 0)
    per_slot = [jnp.where(taken, x.reshape(-1)[slot], fill_value) for x, fill_value in
                zip(parts, (0.0, 0.0, 0.0, -jnp.inf), strict=True)]
    entropy, cross, mass = (a + jnp.sum(b, axis=-1) for a, b in zip((entropy, cross, mass), per_slot[:3],
                                                                   strict=True))
    lse_i = jax.nn.logsumexp(jnp.concatenate([lse_i[..., None], per_slot[3]], axis=-1), axis=-1)
  kl = jnp.where(mass > 0, entropy - cross + mass * jnp.where(jnp.isfinite(lse_i), lse_i, 0.0), 0.0)
  return jnp.sum(kl) / (batch * seq)
