"""Fields of the content-routed attention kinds, nested in SparseAttentionConfig as `attention.moba`,
`attention.nsa` and `attention.dsa` (`--set model.attention.moba.topk=4`).

No imports from the rest of layers.attention, so attention/config.py imports this module without a cycle.
Defaults are the papers' own settings; presets (models/presets.py) scale them down for small models.
"""

import dataclasses

ROUTED_KINDS = ("moba", "nsa", "dsa", "dsa_block")  # kinds whose keys are chosen from the content
MOBA_SCHEMES = ("union", "kv_major")
NSA_COMPRESSIONS = ("mlp", "mean")
NSA_GATES = ("mlp", "linear")
NSA_BRANCHES = ("compressed", "selected", "window")  # order of the gate outputs
NSA_SELECTED_SCHEMES = ("kv_major", "union", "token")
DSA_BLOCK_SCHEMES = ("kv_major", "union")
DSA_STAGES = ("sparse", "warmup")


def _check_ints(kind: str, config, minimums: dict[str, int]) -> None:
  for field, minimum in minimums.items():
    value = getattr(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"attention.{kind}.{field}={value!r} must be an integer >= {minimum}; set "
                       f"attention.{kind}.{field} to a value >= {minimum}.")


def _check_choice(kind: str, config, field: str, choices: tuple[str, ...]) -> None:
  value = getattr(config, field)
  if value not in choices:
    raise ValueError(f"attention.{kind}.{field}={value!r} is unknown; choose one of {choices}.")


@dataclasses.dataclass(frozen=True)
class MoBAConfig:
  """MoBA (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"), §2.2."""

  block_size: int = 512  # tokens per key block (the paper's 8K setting: 512)
  topk: int = 3  # key blocks per query, counting the query's own block (paper: 3 at 8K)
  scheme: str = "kv_major"  # xla backend: union (query-block-major traced layout) | kv_major (per key block, the
  # queries that chose it; MoBA's "efficient" form; measured on CPU at 4K-8K: 57-94 % of the 1/density bound,
  # union 6-35 %); reference and pallas always run the union layout
  kv_major_tile: int = 128  # kv_major: queries per attention tile (one key block each)

  def __post_init__(self):
    _check_ints("moba", self, {"block_size": 1, "topk": 1, "kv_major_tile": 1})
    _check_choice("moba", self, "scheme", MOBA_SCHEMES)


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """NSA (Yuan et al., 2025, "Native Sparse Attention"), §3 and §4.1 (l=32, d=16, l'=64, n=16, w=512)."""

  compress_block: int = 32  # l: tokens per compressed block
  compress_stride: int = 16  # d: stride between compressed blocks (d divides l and l')
  select_block: int = 64  # l': tokens per selection block
  num_selected: int = 16  # n: selection blocks per query, counting the forced ones
  window: int = 512  # w: sliding-window branch, keys incl. the query itself
  init_blocks: int = 1  # selection blocks at the start always selected
  local_blocks: int = 2  # selection blocks ending at the query always selected (its own and the previous)
  compression: str = "mlp"  # phi: mlp (learned, intra-block positions; the paper) | mean (pooling)
  gate: str = "mlp"  # branch gates from the input: mlp + sigmoid (the paper) | linear + sigmoid
  separate_kv: bool = True  # independent K/V projections per branch (paper: against shortcut learning)
  gate_hidden: int = 64  # gate="mlp": hidden width of the gate MLP (eq. 5)
  query_chunk: int = 1024  # queries per step of the compressed branch and selection (live scores [chunk, T_c])
  branches: tuple[str, ...] = ("compressed", "selected", "window")  # branches summed; leave some out for ablations
  selected_scheme: str = "kv_major"  # selected branch: kv_major (per key block, the (token, kv group) rows that
  # chose it; routed/kv_major.py; xla backend only, reference / pallas run union) | union (query blocks of
  # attention.block_size) | token (a token's GQA group as the query block: exactly num_selected blocks each)

  def __post_init__(self):
    _check_ints("nsa", self, {"compress_block": 1, "compress_stride": 1, "select_block": 1, "num_selected": 1,
                              "window": 1, "init_blocks": 0, "local_blocks": 0})
    _check_choice("nsa", self, "compression", NSA_COMPRESSIONS)
    _check_choice("nsa", self, "gate", NSA_GATES)
    if self.compress_stride > self.compress_block:
      raise ValueError(f"attention.nsa.compress_stride={self.compress_stride} must be <= attention.nsa."
                       f"compress_block={self.compress_block}; lower compress_stride (the paper: 16 for 32).")
    for field in ("compress_block", "select_block"):
      if getattr(self, field) % self.compress_stride:
        raise ValueError(f"attention.nsa.{field}={getattr(self, field)} must be a multiple of attention.nsa."
                         f"compress_stride={self.compress_stride} (NSA eq. 9 needs d | l and d | l'); change one.")
    if self.compress_block > self.select_block:
      raise ValueError(f"attention.nsa.compress_block={self.compress_block} must be <= attention.nsa.select_block="
                       f"{self.select_block} (NSA eq. 9 needs l <= l'); raise select_block.")
    if self.init_blocks + self.local_blocks > self.num_selected:
      raise ValueError(f"attention.nsa.init_blocks + local_blocks ({self.init_blocks} + {self.local_blocks}) "
                       f"must be <= attention.nsa.num_selected={self.num_selected}; the forced blocks count in n.")
    if not isinstance(self.separate_kv, bool):
      raise ValueError(f"attention.nsa.separate_kv={self.separate_kv!r} must be True or False.")
    _check_ints("nsa", self, {"gate_hidden": 1, "query_chunk": 1})
    _check_choice("nsa", self, "selected_scheme", NSA_SELECTED_SCHEMES)
    branches = self.branches
    if (not isinstance(branches, tuple) or not branches or len(set(branches)) != len(branches)
        or not set(branches) <= set(NSA_BRANCHES)):
      raise ValueError(f"attention.nsa.branches={branches!r} must be a non-empty tuple of distinct names from "
                       f"{NSA_BRANCHES}; e.g. attention.nsa.branches=('selected','window').")


@dataclasses.dataclass(frozen=True)
class DSAConfig:
  """DeepSeek Sparse Attention (DeepSeek-V3.2-Exp): lightning indexer (eq. 1) + top-k keys, two training stages."""

  index_heads: int = 64  # H^I: indexer heads
  index_head_dim: int = 128  # indexer query / key width
  topk: int = 2048  # keys per query (all keys while t < topk)
  block_size: int = 64  # dsa_block: key block the indexer scores are max-pooled over
  key_chunk: int = 16384  # indexer keys per step of the running top-k (live [query_chunk, key_chunk] scores, never
  # [T, T]); each step re-ranks topk + key_chunk candidates, so fewer, longer steps are faster: 23.3 s -> 9.4 s
  # at T = 16K for 1024 -> 16384 (docs/benchmarks.md, 2026-12-04)
  query_chunk: int = 128  # queries per step of the indexer, the token-gather attention and the KL losses
  stage: str = "sparse"  # warmup (dense attention, only the indexer learns) | sparse (top-k attention)
  indexer_loss_weight: float = 1.0  # weight of the indexer KL loss added to the LM loss
  rope_dim: int = 64  # leading indexer dims that get (non-interleaved) RoPE
  block_scheme: str = "kv_major"  # dsa_block on the xla backend: kv_major (routed/kv_major.py) | union (traced
  # layout, query blocks of attention.block_size); reference and pallas always run union

  def __post_init__(self):
    _check_ints("dsa", self, {"index_heads": 1, "index_head_dim": 1, "topk": 1, "block_size": 1, "key_chunk": 1,
                              "query_chunk": 1, "rope_dim": 0})
    _check_choice("dsa", self, "stage", DSA_STAGES)
    _check_choice("dsa", self, "block_scheme", DSA_BLOCK_SCHEMES)
    weight = self.indexer_loss_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
      raise ValueError(f"attention.dsa.indexer_loss_weight={weight!r} must be a number >= 0; set it to a number >= 0 "
                       "(0 turns the indexer loss off).")
    if self.rope_dim % 2 or self.rope_dim > self.index_head_dim:
      raise ValueError(f"attention.dsa.rope_dim={self.rope_dim} must be even and <= attention.dsa.index_head_dim="
                       f"{self.index_head_dim}; lower rope_dim.")
