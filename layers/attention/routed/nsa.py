"""Native Sparse Attention (Yuan et al., 2025, "Native Sparse Attention: Hardware-Aligned and Natively
Trainable Sparse Attention", arXiv 2502.11089): three attention branches summed with per-head gates.

    o_t = sum_c g_t^c * Attn(q_t, K_t^c, V_t^c),  c in {cmp, slc, win},  g^c = sigmoid(gate(x_t))   (eq. 5)

  cmp  compressed: attention over block summaries phi(k_{jd : jd+l}) (eq. 7; nsa_compress.py);
  slc  selected: attention over the top-n blocks of l' tokens, ranked by the cmp branch's attention
       probabilities mapped onto selection blocks (eqs. 8-10), one selection per KV head; the first
       `init_blocks` and the `local_blocks` blocks ending at the query are always picked (§4.1). It runs
       on the existing backends through routed/selection.py's traced layout (`selected_attention`:
       the union per query block, or per token with its GQA group as the query rows);
  win  a sliding window of `window` keys: the `local` layout (builders.sliding_window) on the backends.

K/V per branch (`attention.nsa.separate_kv`): True (the paper, "independent keys and values for three branches
to prevent shortcut learning"): the Attention's own k, v serve the selected branch and this module projects
x into the compressed branch's and the window branch's K/V (wk_cmp, wv_cmp, wk_win, wv_win). False (fla /
Xunhao): all three branches read the Attention's k, v.

RoPE on compressed keys: phi compresses *un-roped* keys and the summary of block j is then rotated once, at
the position of the block's first token (j*d in a plain sequence). Rotating first and pooling after would
average rotations of different angles, which cancels the high-frequency components of the key; a summary
at one position keeps q . k_cmp a function of the relative distance, as RoPE intends. The separate
compressed keys are projected un-roped; with shared K/V the roped k is rotated back by -position (exact
inverse rotation, computed in f32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.layers import rope, weights
from sparseformer.layers.attention import backends, builders
from sparseformer.layers.attention.routed import nsa_compress as nc
from sparseformer.layers.attention.routed import decode_nsa, kv_major, selection
from sparseformer.layers.attention.routed.config import NSA_BRANCHES as BRANCHES  # order of the gate outputs


@functools.lru_cache(maxsize=64)
def window_layout(seq_len: int, *, window: int, block_q: int, block_kv: int):
  """The `local` kind's layout for the window branch: `window` keys up to and including the query."""
  return builders.sliding_window(seq_len, block_q=block_q, left=window - 1, block_kv=block_kv)


def _param(init, key, shape, dtype, axes):
  return nnx.Param(init(key, shape, dtype), logical_axes=axes)


class NSAAttention(nnx.Module):
  """NSA's three gated branches for one layer; called by `Attention` with its (roped) q, k, v.

  Owns the gate (eq. 5), the compression MLPs of keys and values (eq. 7, `compression="mlp"`) and, with
  `separate_kv`, the compressed and window branches' K/V projections. `__call__` returns
  (out [B, T, H, D] in q.dtype, aux f32 scalars): aux_loss 0 (NSA adds no loss), the mean of each branch's
  gate, and selected_density, the share of the causal (query, key) pairs the selected branch attends.
  """

  def __init__(self, *, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, config, rope_theta: float,
               init_std: float, dtype, param_dtype, rngs: nnx.Rngs, layer: int = 0):
    del layer  # selection depends on the content only
    self.config = config
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta, self.dtype = rope_theta, dtype
    nsa = config.nsa
    normal = nnx.initializers.normal
    zeros = nnx.initializers.zeros_init()
    if nsa.gate == "linear":
      self.gate_w = _param(normal(init_std), rngs.params(), (dim, len(BRANCHES), num_heads), param_dtype,
                           ("embed", None, "heads"))
    else:
      self.gate_w1 = _param(normal(init_std), rngs.params(), (dim, nsa.gate_hidden), param_dtype, ("embed", None))
      self.gate_b1 = _param(zeros, rngs.params(), (nsa.gate_hidden,), param_dtype, (None,))
      self.gate_w = _param(normal(nsa.gate_hidden ** -0.5), rngs.params(), (nsa.gate_hidden, len(BRANCHES), num_heads),
                           param_dtype, (None, None, "heads"))
    self.gate_b = _param(zeros, rngs.params(), (len(BRANCHES), num_heads), param_dtype, (None, "heads"))
    if nsa.compression == "mlp":
      # Fan-in scaled, so a summary starts at the scale of the keys it summarises.
      block, width = nsa.compress_block, head_dim
      for name in ("k", "v"):
        setattr(self, f"cmp_{name}_pe", _param(normal(init_std), rngs.params(), (block, head_dim), param_dtype,
                                               (None, "head_dim")))
        setattr(self, f"cmp_{name}_w1", _param(normal((block * head_dim) ** -0.5), rngs.params(),
                                               (block, head_dim, width), param_dtype, (None, "head_dim", None)))
        setattr(self, f"cmp_{name}_b1", _param(zeros, rngs.params(), (width,), param_dtype, (None,)))
        setattr(self, f"cmp_{name}_w2", _param(normal(width ** -0.5), rngs.params(), (width, head_dim),
                                               param_dtype, (None, "head_dim")))
        setattr(self, f"cmp_{name}_b2", _param(zeros, rngs.params(), (head_dim,), param_dtype, ("head_dim",)))
    if nsa.separate_kv:
      for name in ("wk_cmp", "wv_cmp", "wk_win", "wv_win"):
        setattr(self, name, _param(normal(init_std), rngs.params(), (dim, num_kv_heads, head_dim), param_dtype,
                                   ("embed", "kv_heads", "head_dim")))

  def gates(self, x: jax.Array) -> jax.Array:
    """Per-head branch gates f32 [B, T, 3, H] in [0, 1] from x [B, T, dim] (eq. 5; order of BRANCHES)."""
    x = x.astype(self.dtype)
    if self.config.nsa.gate == "mlp":
      hidden = jnp.einsum("BTD,DF->BTF", x, weights.for_matmul(self.gate_w1, self.dtype),
                          preferred_element_type=jnp.float32)
      x = jax.nn.gelu(hidden + self.gate_b1[...].astype(jnp.float32)).astype(self.dtype)
    logits = jnp.einsum("BTD,DCH->BTCH", x, weights.for_matmul(self.gate_w, self.dtype),
                        preferred_element_type=jnp.float32)
    return jax.nn.sigmoid(logits + self.gate_b[...].astype(jnp.float32))

  def compression_mlp(self, name: str) -> dict | None:
    """The parameters of phi for "k" or "v" as `nsa_compress.compress` takes them (None: mean pooling)."""
    if self.config.nsa.compression != "mlp":
      return None
    return {part: getattr(self, f"cmp_{name}_{part}")[...] for part in ("pe", "w1", "b1", "w2", "b2")}

  def _project(self, x: jax.Array, name: str) -> jax.Array:
    return jnp.einsum("BTD,DNH->BTNH", x, weights.for_matmul(getattr(self, name), self.dtype))

  def __call__(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
               positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B, T, dim] (normed block input), q [B, T, H, D], k, v [B, T, KVH, D] roped, positions [T] or [B, T]."""
    out, aux, _ = self.forward(x, q, k, v, positions)
    return out, aux

  def forward(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array):
    """`__call__` plus the selection: (out, aux, block_index int32 [B, KVH, T, S] or None without "selected")."""
    nsa = self.config.nsa
    block_index = None
    x = x.astype(self.dtype)
    positions = jnp.asarray(positions)
    seq_len = q.shape[1]
    if nsa.separate_kv:
      k_cmp, v_cmp = self._project(x, "wk_cmp"), self._project(x, "wv_cmp")
      k_win = rope.apply_rope(self._project(x, "wk_win"), positions, theta=self.rope_theta)
      v_win = self._project(x, "wv_win")
    else:
      k_cmp, v_cmp, k_win, v_win = rope.apply_rope(k, -positions, theta=self.rope_theta), v, k, v
    outs, aux = {}, {}
    if "compressed" in nsa.branches or "selected" in nsa.branches:
      # phi over un-roped keys, then RoPE at each block's first position (module docstring).
      geo = dict(block=nsa.compress_block, stride=nsa.compress_stride)
      k_cmp = nc.compress(k_cmp, mlp=self.compression_mlp("k"), **geo)
      v_cmp = nc.compress(v_cmp, mlp=self.compression_mlp("v"), **geo)
      first = positions[..., :k_cmp.shape[1] * nsa.compress_stride:nsa.compress_stride]
      k_cmp = rope.apply_rope(k_cmp, first, theta=self.rope_theta)
      selection = None if "selected" not in nsa.branches else dict(
          select_block=nsa.select_block, num_selected=nsa.num_selected, init_blocks=nsa.init_blocks,
          local_blocks=nsa.local_blocks)
      outs["compressed"], block_index = nc.compressed_branch(q, k_cmp, v_cmp, query_chunk=nsa.query_chunk,
                                                             selection=selection, **geo)
    if "selected" in nsa.branches:
      outs["selected"] = selected_attention(q, k, v, block_index, scheme=nsa.selected_scheme,
                                            block_q=self.config.block_size, select_block=nsa.select_block,
                                            backend=self.config.backend)
      aux["selected_density"] = selected_density(block_index, nsa.select_block)
    if "window" in nsa.branches:
      layout = window_layout(seq_len, window=nsa.window, block_q=self.config.block_size,
                             block_kv=self.config.block_kv)
      outs["window"] = backends.attend(q, k_win, v_win, layout, backend=self.config.backend)
    gates = self.gates(x)
    out = jnp.zeros(q.shape, jnp.float32)
    for c, branch in enumerate(BRANCHES):
      if branch in nsa.branches:
        out = out + gates[:, :, c, :, None] * outs[branch].astype(jnp.float32)
        aux[f"gate_{branch}"] = jnp.mean(gates[:, :, c])
    aux["aux_loss"] = jnp.zeros((), jnp.float32)
    return out.astype(q.dtype), aux, block_index

  # Cached decode (issue 13; decode_nsa.py): compressed-key cache, selected blocks, window ring.
  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    return decode_nsa.init_cache(self, batch, max_len)

  def cache_logical_axes(self, batch: int | None = None, max_len: int | None = None
                         ) -> dict[str, tuple[str | None, ...]]:
    del batch, max_len  # the names do not depend on the sizes
    return decode_nsa.cache_logical_axes(self)

  def prefill(self, x, q, k, v, positions, lengths, cache):
    return decode_nsa.prefill(self, x, q, k, v, positions, lengths, cache)

  def decode_step(self, x_t, q_t, k_t, v_t, positions, cache):
    return decode_nsa.decode_step(self, x_t, q_t, k_t, v_t, positions, cache)


def _Blocks(block_q: int, block_kv: int):  # noqa: N802  the geometry `resolve_backend` reads
  return type("Blocks", (), {"block_q": block_q, "block_kv": block_kv})


def selected_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_index: jax.Array, *, scheme: str,
                       block_q: int, select_block: int, backend: str) -> jax.Array:
  """The selected branch: q [B, T, H, D] over k, v [B, T, KVH, D], query t of kv head h restricted to the
  blocks block_index[b, h, t] (int32 [B, KVH, T, S], -1 = empty) and to keys <= t. Both schemes are exact.

  union: query blocks of `block_q` tokens visit the union of their tokens' blocks (selection.py); the union
         width min(num_blocks, block_q * S) is static, so at short T it covers every block.
  kv_major: per key block, the (token, kv group) rows that chose it, in tiles merged by log-sum-exp
         (kv_major.py); only where `backend` resolves to xla, else union.
  token: the paper's kernel layout (§3.4): each token's G query heads of a group form one query block of G
         rows that visits exactly its S blocks; causality is the per-slot key mask. Width S at any T, but
         query blocks of G rows (compiled GPU tiles need >= 16; use it with the xla backend).
  """
  if scheme == "kv_major" and backends.resolve_backend(backend, q, _Blocks(block_q, select_block)) == "xla":
    return kv_major.attend_kv_major(q, k, v, block_index, block_kv=select_block)
  if scheme in ("union", "kv_major"):
    return selection.attend_selected(q, k, v, block_index, block_q=block_q, block_kv=select_block, backend=backend)
  batch, seq_len, heads, dim = q.shape
  kv_heads, slots = k.shape[2], block_index.shape[-1]
  group = heads // kv_heads
  # [B, T, (K G), D] -> rows t * G + g of kv head K: one query block per token.
  rows = q.reshape(batch, seq_len, kv_heads, group, dim).transpose(0, 1, 3, 2, 4).reshape(batch, -1, kv_heads, dim)
  row_index = jnp.repeat(block_index, group, axis=2)  # [B, KVH, T * G, S]
  key = row_index[..., None] * select_block + jnp.arange(select_block)
  query = jnp.repeat(jnp.arange(seq_len), group)[None, None, :, None, None]
  token_mask = (row_index[..., None] >= 0) & (key <= query)
  out = selection.attend_selected(rows, k, v, row_index, block_q=group, block_kv=select_block, backend=backend,
                                  width=slots, token_mask=token_mask, causal=False)
  return out.reshape(batch, seq_len, group, kv_heads, dim).transpose(0, 1, 3, 2, 4).reshape(q.shape)


def selected_density(block_index: jax.Array, select_block: int) -> jax.Array:
  """Share of the causal (query, key) pairs the selected branch attends: f32 scalar.

  block_index int32 [B, KVH, T, S] (-1 = empty); block b holds keys b*l' .. b*l' + l' - 1, of which query t
  sees those <= t.
  """
  seq_len = block_index.shape[2]
  t = jnp.arange(seq_len)[:, None]
  keys = jnp.clip(t - block_index * select_block + 1, 0, select_block)
  keys = jnp.where(block_index >= 0, keys, 0)
  causal_pairs = seq_len * (seq_len + 1) / 2
  return (jnp.sum(keys.astype(jnp.float32)) / (causal_pairs * block_index.shape[0] * block_index.shape[1]))


__all__ = ["BRANCHES", "NSAAttention", "selected_attention", "selected_density", "window_layout"]
