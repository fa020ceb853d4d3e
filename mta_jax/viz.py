"""Pictures: attention maps and learned MTA kernels, saved as PNG (matplotlib, no display)."""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_attention_maps(maps: Sequence, path: str, *, row: int = 0,
                        labels: Sequence[str] | None = None, max_len: int = 96) -> str:
  """One panel per (layer, head) of `maps` (each [B, H, T, T]) for batch row `row`.

  Only the first `max_len` positions are drawn; `labels` (one string per token) label the axes
  when the sequence is short enough to read.
  """
  maps = [np.asarray(m[row])[:, :max_len, :max_len] for m in maps]
  n_layers, n_heads = len(maps), maps[0].shape[0]
  t = maps[0].shape[-1]
  fig, axes = plt.subplots(n_layers, n_heads, figsize=(2.6 * n_heads, 2.6 * n_layers),
                           squeeze=False)
  for l, m in enumerate(maps):
    for h in range(n_heads):
      ax = axes[l][h]
      a = m[h]
      bound = max(float(np.abs(a).max()), 1e-9)
      # Post-softmax ops can make weights negative: a diverging map shows the sign.
      cmap, vmin = ("RdBu_r", -bound) if a.min() < 0 else ("viridis", 0.0)
      ax.imshow(a, cmap=cmap, vmin=vmin, vmax=bound, interpolation="nearest")
      ax.set_title(f"layer {l} head {h}", fontsize=8)
      if labels is not None and t <= 40:
        ticks = list(labels)[:t]
        ax.set_xticks(range(t), ticks, fontsize=6, rotation=90)
        ax.set_yticks(range(t), ticks, fontsize=6)
      else:
        ax.set_xticks([])
        ax.set_yticks([])
  fig.supxlabel("key")
  fig.supylabel("query")
  fig.tight_layout()
  return _save(fig, path)


def plot_kernels(model, path: str) -> str | None:
  """The learned key-query kernels of every layer that has them, one panel per (layer, head,
  pre/post). The bottom row of a panel is the current query; the centre column the same key.
  Returns None when the model has no key-query convolutions."""
  panels = []
  for l, block in enumerate(model.blocks):
    for name in ("kq_pre", "kq_post"):
      p = getattr(block.attn, name)
      if p is not None:
        k = np.asarray(p[...])
        panels.extend((f"L{l} {name[3:]} h{h}", k[h]) for h in range(k.shape[0]))
  if not panels:
    return None
  cols = min(8, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (title, k) in zip(axes.flat, panels):
    bound = max(float(np.abs(k).max()), 1e-9)
    ax.imshow(k, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("on")
    ax.set_xticks([k.shape[1] // 2], ["j"], fontsize=6)
    ax.set_yticks([k.shape[0] - 1], ["i"], fontsize=6)
  fig.suptitle("key-query kernels (rows: query offset, columns: key offset)", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  from mta_jax import storage  # local or remote (gs://...) path
  storage.save_figure(fig, path)
  plt.close(fig)
  return path
