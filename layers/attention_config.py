"""Configuration of the attention kinds a layer can use (dense and block-sparse)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
  """Parameters shared by the sparse attention kinds; each kind reads the fields it needs."""

  backend: str = "auto"  # reference | xla | pallas | auto (best available on this platform)
  block_size: int = 64  # tokens per query / key block
  window: int = 256  # local window (tokens to the left, including self) for local-style kinds
