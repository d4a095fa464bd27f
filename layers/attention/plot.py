"""PNG pictures of BlockLayouts, so a researcher can see what a pattern does.

    from sparseformer.layers.attention import builders, plot
    plot.save_layout_png(builders.bigbird(1024, block_q=64, left=127, num_global=64,
                                          num_random_blocks=2), "bigbird.png")

Each layout gets a block view (FULL dark, PARTIAL mid-grey, EMPTY white; queries down, keys
across) and, when the sequence is short enough, the exact token mask beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparseformer.layers.attention.layouts import EMPTY, FULL, BlockLayout


def block_image(layout: BlockLayout, head: int = 0) -> np.ndarray:
  """float [nq, nk] image: 1 = FULL, 0.5 = PARTIAL, 0 = EMPTY."""
  table = layout.block_table()[head]
  return np.where(table == FULL, 1.0, np.where(table == EMPTY, 0.0, 0.5))


def save_layouts_png(layouts: Sequence[BlockLayout], path: str, *, head: int = 0,
                     max_tokens: int = 2048) -> None:
  """One row per layout: block view, plus the token mask if seq_q, seq_kv <= max_tokens."""
  # A pyplot-free Figure: no global backend switch, so inline notebook plots keep working.
  from matplotlib.figure import Figure  # local import: plotting is optional for layout users

  layouts = list(layouts)
  show_tokens = all(max(layout.seq_q, layout.seq_kv) <= max_tokens for layout in layouts)
  cols = 2 if show_tokens else 1
  fig = Figure(figsize=(4.2 * cols, 4.0 * len(layouts)))
  axes = fig.subplots(len(layouts), cols, squeeze=False)
  for row, layout in enumerate(layouts):
    h = min(head, layout.num_heads - 1)
    ax = axes[row, 0]
    ax.imshow(block_image(layout, h), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{layout.name} (head {h})\nblocks {layout.block_q}x{layout.block_kv}, "
                 f"density {layout.density():.3f}", fontsize=9)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    if show_tokens:
      ax = axes[row, 1]
      ax.imshow(layout.to_token_mask()[h], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
      ax.set_title(f"token mask {layout.seq_q}x{layout.seq_kv}, "
                   f"allowed {layout.token_density():.3f}", fontsize=9)
      ax.set_xlabel("key")
      ax.set_ylabel("query")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def save_layout_png(layout: BlockLayout, path: str, *, head: int = 0, max_tokens: int = 2048) -> None:
  """PNG of one layout (see `save_layouts_png`)."""
  save_layouts_png([layout], path, head=head, max_tokens=max_tokens)
