"""DeepSeek Sparse Attention (DeepSeek-AI 2025, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with
DeepSeek Sparse Attention"), as the attention kinds `dsa` and `dsa_block`.

A lightning indexer (eq. 1, `dsa_indexer.py`) scores every visible key of each query; the query attends
its top-k keys (`attention.dsa.topk`; every visible key while t + 1 <= k), one selection per token shared
by all heads (the paper's MLA runs in MQA mode, so one key set serves all heads):

  dsa        exact token selection (eq. 2: u_t = Attn(h_t, {c_s | I[t, s] in Top-k(I[t, :])})), attended by
             the token-gather path (`dsa_gather.py`, chunked over queries, flash-style custom VJP).
  dsa_block  the indexer's scores max-pooled per key block of `attention.dsa.block_size`; each token keeps
             its top-(topk // block_size) blocks, its own block forced (counted in the budget), and attends
             their keys s <= t on the block backends through `selection.attend_selected` (a traced union
             layout, query blocks of `attention.block_size`: reference / xla / pallas; on xla by default
             `attention.dsa.block_scheme="kv_major"`, routed/kv_major.py). This is MiniMax's MSA-style block variant (per fla's NSA
             notes: a DSA-style indexer max-pooled to blocks "plus a forced local block"), not in the paper.
             The own block is forced for that reason, and so that a token always sees its most recent keys.

Training follows the paper's two stages (§2.1), chosen by `attention.dsa.stage` (a resumed run may switch it):

  warmup  attention is dense causal (the model's own attention; nothing is selected). The indexer learns
          by KL(p_t || softmax(I_t)) over all visible keys, p_t the main attention summed over heads and
          L1-normalised (`dsa_loss.dense_indexer_kl`); train/optimizer.py freezes every other parameter.
  sparse  attention over the selected set; the indexer learns by the same KL restricted to S_t
          (`dsa_loss.selected_indexer_kl`, its target the token-gather attention's own probabilities;
          dsa_block on xla's kv_major path: `dsa_tile_kl.block_indexer_kl`, the same loss in the attention's
          tiles from its lse) with its input detached.

In both stages the indexer reads stop_gradient(x) and the KL target is detached, so the LM loss gives the
indexer exactly zero gradient (its scores only reach the output as integer indices) and the indexer loss
gives the rest of the model exactly zero gradient. aux: "aux_loss" (indexer_loss_weight * KL), "indexer_kl"
(the mean per-token KL), "density" (attended (query, key) pairs / T^2, as models/flops.py counts pairs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import routing
from sparseformer.layers.attention.dense import causal_attention
from sparseformer.layers.attention.routed import decode_dsa, dsa_gather, dsa_indexer, dsa_loss, dsa_tile_kl


class DSAAttention(nnx.Module):
  """DSA attention of one layer: owns the lightning indexer (`self.indexer`), runs selection + attention.

  Called as `out, aux = module(x, q, k, v, positions)`: x [B, T, dim] the attention input, q [B, T, H, Dh],
  k, v [B, T, KVH, Dh] after RoPE, positions [T] or [B, T] -> out [B, T, H, Dh] in q.dtype.
  """

  def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, config, rope_theta: float,
               init_std: float, dtype, param_dtype, rngs: nnx.Rngs, layer: int = 0, block: bool = False):
    del num_heads, layer  # read from q, k, v at call time
    self.num_kv_heads, self.head_dim = num_kv_heads, head_dim  # the decode cache's shape
    dsa = config.dsa
    if block and dsa.topk < dsa.block_size:
      raise ValueError(f"attention.dsa.topk={dsa.topk} is below attention.dsa.block_size={dsa.block_size}: "
                       "dsa_block keeps topk // block_size key blocks per token; raise topk or lower block_size.")
    self.config, self.block = config, block
    self.indexer = dsa_indexer.LightningIndexer(
        dim, index_heads=dsa.index_heads, index_head_dim=dsa.index_head_dim, rope_dim=dsa.rope_dim,
        rope_theta=rope_theta, init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    dsa = self.config.dsa
    seq_len = q.shape[1]
    features = self.indexer(jax.lax.stop_gradient(x), positions)
    if dsa.stage == "warmup":
      out = causal_attention(q, k, v)
      kl = dsa_loss.dense_indexer_kl(q, k, features, query_chunk=dsa.query_chunk, key_chunk=dsa.key_chunk)
      density = jnp.float32((seq_len + 1) / (2 * seq_len))
    else:
      lse = target = None
      if self.block:
        out, block_index, lse = self._block_attention(q, k, v, features)
        selection = block_tokens(block_index, dsa.block_size)
      else:
        selection = dsa_indexer.running_top_k(features, dsa.topk, key_chunk=dsa.key_chunk,
                                              query_chunk=dsa.query_chunk)
        out, target = dsa_gather.token_gather_attention(q, k, v, selection.index, selection.valid,
                                                        query_chunk=dsa.query_chunk, return_probs=True)
      if lse is not None:  # kv_major's tiles: the KL from the attention's lse, no per-query key gathers
        kl = dsa_tile_kl.block_indexer_kl(q, k, features, block_index, lse, block_size=dsa.block_size)
      else:
        kl = dsa_loss.selected_indexer_kl(q, k, features, selection, query_chunk=dsa.query_chunk,  # target: dsa
                                          block_size=dsa.block_size if self.block else None, target=target)
      density = jnp.sum(selection.valid, dtype=jnp.float32) / (q.shape[0] * seq_len * seq_len)
    aux = {"aux_loss": dsa.indexer_loss_weight * kl, "indexer_kl": kl, "density": density}
    return out, aux

  def _block_attention(self, q, k, v, features):
    """dsa_block: block selection and attention on the block backends -> (out, block_index int32 [B, T, n],
    the attention's row lse f32 [B, T, H] on the kv_major path, else None)."""
    from sparseformer.layers.attention import backends  # noqa: PLC0415 (backends import this module's package)
    from sparseformer.layers.attention.routed import kv_major, selection as selection_lib  # noqa: PLC0415

    dsa = self.config.dsa
    block_index = select_blocks(features, dsa.topk, dsa.block_size, key_chunk=dsa.key_chunk,
                                query_chunk=dsa.query_chunk)
    geometry = type("Blocks", (), {"block_q": self.config.block_size, "block_kv": dsa.block_size})
    backend = backends.resolve_backend(self.config.backend, q, geometry)
    if dsa.block_scheme == "kv_major" and backend == "xla":
      # autodiff, not the flash VJP: no clear layer fwd+bwd difference at 8K and 16K, 1 GB less peak memory at
      # 16K (docs/benchmarks.md, 2026-12-03 second session).
      out, lse = kv_major.attend_kv_major(q, k, v, block_index[:, None], block_kv=dsa.block_size, return_lse=True)
      return out, block_index, lse
    out = selection_lib.attend_selected(q, k, v, block_index[:, None], block_q=self.config.block_size,
                                        block_kv=dsa.block_size, backend=backend)
    return out, block_index, None

  # Cached decode (issue 13; decode_dsa.py): the indexer's key cache, top-k keys or blocks gathered.
  @property
  def kind_name(self) -> str:
    return "dsa_block" if self.block else "dsa"

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    return decode_dsa.init_cache(self, batch, max_len)

  def cache_logical_axes(self, batch: int | None = None, max_len: int | None = None
                         ) -> dict[str, tuple[str | None, ...]]:
    del batch, max_len  # the names do not depend on the sizes
    return decode_dsa.cache_logical_axes(self)

  def prefill(self, x, q, k, v, positions, lengths, cache):
    return decode_dsa.prefill(self, x, q, k, v, positions, lengths, cache)

  def decode_step(self, x_t, q_t, k_t, v_t, positions, cache):
    return decode_dsa.decode_step(self, x_t, q_t, k_t, v_t, positions, cache)


def select_blocks(features: dsa_indexer.IndexerFeatures, topk: int, block_size: int, *, key_chunk: int,
                  query_chunk: int) -> jax.Array:
  """dsa_block's selection: block ids int32 [B, T, n] (-1 in empty slots), n = min(topk // block_size, blocks).

  Blocks rank by the max-pooled indexer score over their visible keys (`dsa_indexer.block_max_scores`);
  blocks starting after t are masked; the query's own block t // block_size is forced (counted in n);
  ties to the lower block (`routing.masked_top_k`).
  """
  seq_len = features.k.shape[1]
  scores = dsa_indexer.block_max_scores(features, block_size, key_chunk=key_chunk, query_chunk=query_chunk)
  num_blocks = scores.shape[-1]
  rows = jnp.arange(seq_len)[:, None]
  starts = jnp.arange(num_blocks)[None, :] * block_size
  visible = starts <= rows  # [T, nk]
  own = jnp.arange(num_blocks)[None, :] == rows // block_size
  picked = routing.masked_top_k(scores, min(topk // block_size, num_blocks), mask=visible, forced=own)
  return picked.indices


def block_tokens(block_index: jax.Array, block_size: int) -> dsa_indexer.TokenSelection:
  """The keys s <= t (s < T) of each token's selected blocks [B, T, n] as a token selection [B, T, n * bs]."""
  seq_len = block_index.shape[1]
  tokens = block_index[..., None] * block_size + jnp.arange(block_size)  # [B, T, n, bs]
  rows = jnp.arange(seq_len)[None, :, None, None]
  valid = (block_index[..., None] >= 0) & (tokens <= rows) & (tokens < seq_len)
  flat = lambda x: x.reshape(*x.shape[:2], -1)  # noqa: E731
  return dsa_indexer.TokenSelection(flat(jnp.where(valid, tokens, -1)).astype(jnp.int32), flat(valid))
