"""Dense causal attention: the CPU blocked path and the accelerator paths, same function.

Which implementation runs is one rule, `dense_attention_implementation(backend, dtype, head_dim)`:
  cpu                                              -> "blocked"  `blocked_causal_attention` (skips the masked half)
  gpu, 16-bit, head_dim % 8 == 0 and <= 128        -> "cudnn"    cuDNN flash attention through
                                                                 `jax.nn.dot_product_attention(implementation="cudnn")`
  gpu otherwise (f32, other head sizes) where our
    Pallas kernel takes it (`unsupported_reason`)  -> "pallas"   block-sparse flash kernel on the dense causal layout
  anything else (TPU, head sizes neither takes)    -> "xla"      `jax.nn.dot_product_attention`'s XLA implementation
cuDNN's bound is head_dim <= 128 before Hopper and <= 256 from Hopper on (jax/_src/cudnn/
fused_attention_stablehlo.py, check_is_flash_attention); the rule keeps the bound every cuDNN GPU meets.
The XLA implementation materialises the T x T scores (12 % MFU for `base` on an H200, docs/benchmarks.md).
"""

import functools

import einops
import jax
import jax.numpy as jnp

from sparseformer.kernels import block_sparse_attention as pallas_kernel
from sparseformer.layers.attention import builders

CPU_BLOCK_SIZE = 128  # query rows per block of `blocked_causal_attention`; 64-256 measure alike at T = 512
PALLAS_BLOCK_SIZE = 128  # layout block of the Pallas dense causal path (the GPU kernel's default tile)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128
IMPLEMENTATIONS = ("blocked", "cudnn", "pallas", "xla")


def dense_attention_implementation(backend: str, dtype, head_dim: int) -> str:
  """The one rule choosing dense causal attention's implementation (see the module docstring).

  Args: `backend` as `jax.default_backend()` ("cpu", "gpu", "tpu", ...), the q/k/v `dtype`, the head size.
  Returns one of IMPLEMENTATIONS.
  """
  if backend == "cpu":
    return "blocked"
  if backend != "gpu":
    return "xla"
  if jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM:
    return "cudnn"
  if pallas_kernel.unsupported_reason("gpu", head_dim, PALLAS_BLOCK_SIZE, PALLAS_BLOCK_SIZE, dtype) is None:
    return "pallas"
  return "xla"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Dense causal attention, q: [B, T, N, H], k, v: [B, T, K, H] (K divides N) -> [B, T, N, H].

  The implementation is `dense_attention_implementation(jax.default_backend(), q.dtype, H)`; all of them
  compute `jax.nn.dot_product_attention(q, k, v, is_causal=True)`, the reference.
  """
  implementation = dense_attention_implementation(jax.default_backend(), q.dtype, q.shape[-1])
  if implementation == "blocked":
    return blocked_causal_attention(q, k, v)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if implementation == "pallas":
    return pallas_causal_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True)


@functools.lru_cache(maxsize=32)
def _causal_layout(seq_len: int, block_size: int):
  return builders.dense(seq_len, block_q=block_size, causal=True)


def pallas_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool | None = None
                            ) -> jax.Array:
  """Dense causal attention through the Pallas block-sparse flash kernel on the dense causal layout
  (blocks of min(PALLAS_BLOCK_SIZE, T rounded up to a power of two >= 16)); shapes as `causal_attention`.
  `interpret` None: interpret mode on the CPU backend."""
  seq_len = q.shape[1]
  block = 16
  while block < min(seq_len, PALLAS_BLOCK_SIZE):
    block *= 2
  return pallas_kernel.block_sparse_attention(q, k, v, _causal_layout(seq_len, block), interpret=interpret,
                                              platform="gpu")


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int = CPU_BLOCK_SIZE
                             ) -> jax.Array:
  """`jax.nn.dot_product_attention(q, k, v, is_causal=True)` computed in query blocks.

  Query block [s, e) scores only keys [0, e), so of the T x T scores only the causal half plus the diagonal
  blocks is built (5/8 of them at T = 512, blocks of 128). Shapes as `causal_attention`; any T (the last block
  may be short); the softmax runs in f32 and the output has q's dtype.
  """
  _, seq_len, num_heads, head_dim = q.shape
  q = einops.rearrange(q * head_dim**-0.5, "B T (K G) H -> B T K G H", K=k.shape[2])
  outs = []
  for start in range(0, seq_len, block_size):
    end = min(start + block_size, seq_len)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q[:, start:end], k[:, :end], preferred_element_type=jnp.float32)
    causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
    scores = jnp.where(causal, scores, -jnp.inf)
    # Softmax is shift-invariant, so the row max needs no gradient; normalising after the product with v
    # divides [T, H] instead of [T, S] (the diagonal keeps every row's max finite).
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights.astype(v.dtype), v[:, :end], preferred_element_type=jnp.float32)
    outs.append(out / einops.rearrange(jnp.sum(weights, axis=-1), "B K G T -> B T K G 1"))
  return einops.rearrange(jnp.concatenate(outs, axis=1), "B T K G H -> B T (K G) H").astype(q.dtype)
