"""Configuration of the attention kinds a layer can use (dense and block-sparse).

Each kind of `layers/attention/kinds.py` reads the fields it needs:

  global      dense causal                       block_size
  local       sliding (optionally dilated) window window, window_right, dilation
  strided     Sparse Transformer strided          stride
  fixed       Sparse Transformer fixed            stride, summary_tokens
  bigbird     window + global + random blocks     window, window_right, num_global, num_random_blocks, seed,
                                                  random_per_head
  longformer  window + global tokens              window, window_right, num_global
  chunked     Llama-4 chunked causal              chunk_size
  sinks       StreamingLLM sinks + window         num_sinks, window
  custom      your own layout factory             layout_factory
  moba        MoBA top-k key blocks                moba.* (routed/config.py)
  nsa         NSA compressed + selected + window   nsa.*
  dsa         DSA lightning indexer, top-k keys    dsa.*
  dsa_block   DSA, indexer max-pooled per block    dsa.*
"""

import dataclasses

from sparseformer.layers.attention.routed.config import DSAConfig, MoBAConfig, NSAConfig

BACKENDS = ("auto", "reference", "xla", "pallas")  # what backends.attend accepts


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
  """Parameters shared by the sparse attention kinds; each kind reads the fields it needs."""

  backend: str = "auto"  # reference | xla | pallas | auto (pallas on GPU/TPU when the kernel takes the shapes, else xla)
  block_size: int = 64  # tokens per query block (and per key block unless block_kv_size is set)
  block_kv_size: int = 0  # tokens per key block; 0 = block_size (rectangular blocks otherwise)
  causal: bool = True  # False builds bidirectional (encoder) layouts; decoders keep True
  window: int = 256  # local kinds: keys visible to the left, counting the query itself (Mistral/Gemma style)
  window_right: int = 0  # local kinds: keys visible to the right; only with causal=False
  dilation: int = 1  # local: attend every dilation-th key of the window (Longformer dilated window)
  stride: int = 128  # strided / fixed: Sparse Transformer stride l (about sqrt(seq_len) in the paper)
  summary_tokens: int = 16  # fixed: last c tokens of every stride-long chunk that everyone sees
  num_global: int = 64  # bigbird / longformer: leading tokens that see and are seen by all tokens
  num_random_blocks: int = 2  # bigbird: random key blocks added per query block
  seed: int = 0  # bigbird: seed of the random block choice (fixed per layout, not per step)
  random_per_head: bool = False  # bigbird: independent random blocks per head (per-head layout)
  chunk_size: int = 1024  # chunked: tokens per attention chunk (Llama 4 uses 8192)
  num_sinks: int = 4  # sinks: leading tokens always visible (StreamingLLM uses 4)
  layout_factory: str = ""  # custom: "package.module:function" or a name given to register_layout_factory
  moba: MoBAConfig = MoBAConfig()  # moba: block size, top-k, xla scheme
  nsa: NSAConfig = NSAConfig()  # nsa: compression, selection and window branches
  dsa: DSAConfig = DSAConfig()  # dsa / dsa_block: indexer, top-k, training stage

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"attention.backend={self.backend!r} is unknown; choose one of {BACKENDS}.")
    minimums = {"block_size": 1, "block_kv_size": 0, "window": 1, "window_right": 0, "dilation": 1,
                "stride": 1, "summary_tokens": 1, "num_global": 0, "num_random_blocks": 0, "seed": 0,
                "chunk_size": 1, "num_sinks": 0}
    for field, minimum in minimums.items():
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"attention.{field}={value!r} must be an integer >= {minimum}; set "
                         f"attention.{field} to a value >= {minimum}.")
    if self.causal and self.window_right:
      raise ValueError(f"attention.window_right={self.window_right} lets a causal layer see future tokens; "
                       "set attention.window_right=0 or attention.causal=False (encoder).")
    if self.summary_tokens > self.stride:
      raise ValueError(f"attention.summary_tokens={self.summary_tokens} must be <= attention.stride="
                       f"{self.stride}; lower summary_tokens or raise stride.")
    if not isinstance(self.layout_factory, str):
      raise ValueError("attention.layout_factory must be a string ('package.module:function' or a name "
                       "registered with layers.attention.register_layout_factory), not "
                       f"{type(self.layout_factory).__name__}; configs stay JSON-serialisable.")

  @property
  def block_kv(self) -> int:
    """Tokens per key block."""
    return self.block_kv_size or self.block_size
