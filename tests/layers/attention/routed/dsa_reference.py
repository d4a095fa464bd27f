"""Slow, obvious DSA references written from DeepSeek-V3.2-Exp (§2, eq. 1-2; §2.1 for the losses), for tests.

Dense [T, T] indexer scores by einsum, top-k by NumPy argsort (stable: ties to the lower index), masked
dense softmax attention, KL over dense masks. Indexer math in jnp f32 so gradients can be taken.
"""

import numpy as np
import jax
import jax.numpy as jnp


def rope_rotate_half(x, positions, theta):
  """x [B, T, N, r]: pair (i, i + r/2) rotated by positions * theta^(-2i / r) (RoFormer, rotate-half)."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  angle = jnp.asarray(np.asarray(positions, np.float64)[..., None] * freq, jnp.float32)[..., None, :]  # [(B,) T, 1, r/2]
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate([first * jnp.cos(angle) - second * jnp.sin(angle),
                          second * jnp.cos(angle) + first * jnp.sin(angle)], axis=-1)


def indexer_scores(params: dict, x, positions, *, rope_dim: int, theta: float, round_to=None):
  """Eq. 1: I[b, t, s] = sum_j w[t, j] ReLU(q_I[t, j] . k_I[s]) for ALL (t, s), f32 [B, T, T].

  params: wq [D, H_I, d_I], wk [D, d_I], k_norm_scale / k_norm_bias [d_I], w_weights [D, H_I].
  round_to: a dtype the projection inputs (x, wq, wk) are rounded to first (the module's bf16 compute).
  """
  rnd = (lambda a: a.astype(round_to).astype(jnp.float32)) if round_to is not None else (lambda a: a)
  x32 = jnp.asarray(x, jnp.float32)
  heads, dim = params["wq"].shape[1:]
  q = jnp.einsum("btd,dhe->bthe", rnd(x32), rnd(params["wq"]))
  k = jnp.einsum("btd,de->bte", rnd(x32), rnd(params["wk"]))
  mean = k.mean(-1, keepdims=True)
  k = (k - mean) / jnp.sqrt(((k - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
  k = k * params["k_norm_scale"] + params["k_norm_bias"]
  if rope_dim:
    q = jnp.concatenate([rope_rotate_half(q[..., :rope_dim], positions, theta), q[..., rope_dim:]], -1)
    k = jnp.concatenate([rope_rotate_half(k[:, :, None, :rope_dim], positions, theta)[:, :, 0], k[..., rope_dim:]], -1)
  w = jnp.einsum("btd,dh->bth", rnd(x32), params["w_weights"]) / np.sqrt(heads * dim)
  return jnp.einsum("bth,bths->bts", w, jax.nn.relu(jnp.einsum("bthe,bse->bths", q, k)))


def token_topk_mask(scores: np.ndarray, topk: int) -> np.ndarray:
  """bool [B, T, T]: key s selected by query t = among the topk best of I[t, :t+1] (stable argsort)."""
  batch, seq_len, _ = scores.shape
  mask = np.zeros(scores.shape, bool)
  for b in range(batch):
    for t in range(seq_len):
      mask[b, t, np.argsort(-scores[b, t, :t + 1], kind="stable")[:topk]] = True
  return mask


def block_choice(scores: np.ndarray, topk: int, block_size: int) -> list:
  """dsa_block's choice per (b, t): its own block first, then other visible blocks by max-pooled score over
  the visible keys (stable: ties to the lower block), topk // block_size blocks in all."""
  batch, seq_len, _ = scores.shape
  num_blocks = -(-seq_len // block_size)
  n = min(topk // block_size, num_blocks)
  chosen = []
  for b in range(batch):
    rows = []
    for t in range(seq_len):
      own = t // block_size
      pooled = np.array([scores[b, t, j * block_size:min((j + 1) * block_size, t + 1)].max() for j in range(own)])
      rows.append([own] + list(np.argsort(-pooled, kind="stable")[:n - 1]))
    chosen.append(rows)
  return chosen


def block_topk_mask(scores: np.ndarray, topk: int, block_size: int) -> np.ndarray:
  """bool [B, T, T]: the keys s <= t of each token's chosen blocks (`block_choice`)."""
  mask = np.zeros(scores.shape, bool)
  for b, rows in enumerate(block_choice(scores, topk, block_size)):
    for t, blocks in enumerate(rows):
      for j in blocks:
        mask[b, t, j * block_size:min((j + 1) * block_size, t + 1)] = True
  return mask


def masked_attention(q, k, v, mask):
  """Dense softmax attention in f32 under bool mask [B, T, S]; K/V repeated over the GQA group."""
  group = q.shape[2] // k.shape[2]
  k32 = jnp.repeat(jnp.asarray(k, jnp.float32), group, axis=2)
  v32 = jnp.repeat(jnp.asarray(v, jnp.float32), group, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", jnp.asarray(q, jnp.float32), k32) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e30), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v32)


def indexer_kl(q, k, scores, mask):
  """Mean over tokens of KL(p_t || softmax(I_t)) over mask [B, T, S]; p = head mean of the attention
  probabilities under the same mask, constant."""
  group = q.shape[2] // k.shape[2]
  k32 = jnp.repeat(jnp.asarray(k, jnp.float32), group, axis=2)
  main = jnp.einsum("bthd,bshd->bhts", jnp.asarray(q, jnp.float32), k32) / np.sqrt(q.shape[-1])
  target = jax.lax.stop_gradient(jax.nn.softmax(jnp.where(mask[:, None], main, -1e30), axis=-1).mean(1))
  log_q = jax.nn.log_softmax(jnp.where(mask, scores, -1e30), axis=-1)
  terms = jnp.where(mask & (target > 0), target * (jnp.log(jnp.where(target > 0, target, 1.0)) - log_q), 0.0)
  return terms.sum(-1).mean()
