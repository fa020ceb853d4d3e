"""Pictures: attention maps and learned MTA weights, saved as PNG (matplotlib, no display).

    python -m mta_jax.viz --model=runs/toy --text="abcde.fghij.klmno#ak" --out=runs/toy/viz

writes, for a training workdir or an export and a text:
  attention_L<l>.png   every head of layer l at three stages: plain softmax(q k^T) (no MTA
                       op), after the pre-softmax conv and head mix, and the final weights
                       (after the post-softmax conv and head mix)
  kernels.png          the learned key-query kernels (pre / post) of every layer that has them
  head_mix.png         the head-mixing matrices (pre / post) of every layer, [heads x heads]
                       with the groups on the diagonal
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from mta_jax import cli  # noqa: E402


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


ATTENTION_STAGES = ("plain softmax", "after pre conv + mix", "final")


def attention_stages(model, tokens_BxT, segment_ids=None, positions=None) -> list:
  """Per layer, [3, B, H, T, T] weights at the ATTENTION_STAGES (one forward pass).

  Layers without a pre-softmax op repeat the plain map as the middle stage."""
  import jax.numpy as jnp

  from mta_jax import ops
  positions = model.check_inputs(tokens_BxT, segment_ids, positions)
  x = model.embed(tokens_BxT, jnp.dtype(model.cfg.dtype))
  out = []
  get = lambda w: None if w is None else w[...]
  for block in model.blocks:
    a = block.attn
    q, k, _ = a.project(block.attn_norm(x), positions)
    kw = dict(segment_ids=segment_ids)
    plain = ops.attention_weights(q, k, **kw)
    pre = ops.attention_weights(q, k, kq_kernel_pre=get(a.kq_pre), head_mix_pre=get(a.mix_pre),
                                **kw)
    final = ops.attention_weights(q, k, kq_kernel_pre=get(a.kq_pre),
                                  kq_kernel_post=get(a.kq_post), head_mix_pre=get(a.mix_pre),
                                  head_mix_post=get(a.mix_post), **kw)
    out.append(np.stack([np.asarray(plain), np.asarray(pre), np.asarray(final)]))
    x = block(x, positions, segment_ids, None)
  return out


def plot_attention_stages(stages, path: str, *, layer: int, row: int = 0,
                          labels: Sequence[str] | None = None, max_len: int = 64) -> str:
  """One layer: rows = heads, columns = ATTENTION_STAGES (see `attention_stages`)."""
  st = np.asarray(stages)[:, row, :, :max_len, :max_len]  # [3, H, T, T]
  n_heads, t = st.shape[1], st.shape[-1]
  fig, axes = plt.subplots(n_heads, 3, figsize=(3.2 * 3, 3.0 * n_heads), squeeze=False)
  for h in range(n_heads):
    for s in range(3):
      ax, a = axes[h][s], st[s, h]
      bound = max(float(np.abs(a).max()), 1e-9)
      cmap, vmin = ("RdBu_r", -bound) if a.min() < 0 else ("viridis", 0.0)
      ax.imshow(a, cmap=cmap, vmin=vmin, vmax=bound, interpolation="nearest")
      ax.set_title(f"head {h}: {ATTENTION_STAGES[s]}", fontsize=8)
      if labels is not None and t <= 40:
        ticks = list(labels)[:t]
        ax.set_xticks(range(t), ticks, fontsize=5, rotation=90)
        ax.set_yticks(range(t), ticks, fontsize=5)
      else:
        ax.set_xticks([])
        ax.set_yticks([])
  fig.suptitle(f"layer {layer} (rows: query, columns: key)", fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_head_mix(model, path: str) -> str | None:
  """Head-mixing matrices of every layer (pre / post) as block-diagonal [H, H] images: entry
  (o, i) is the weight of old head i in new head o. None when the model has no head mixing."""
  panels = []
  for l, block in enumerate(model.blocks):
    for name in ("mix_pre", "mix_post"):
      p = getattr(block.attn, name)
      if p is not None:
        w = np.asarray(p[...])
        groups, c_h, _ = w.shape
        full = np.zeros((groups * c_h, groups * c_h), w.dtype)
        for g in range(groups):
          full[g * c_h:(g + 1) * c_h, g * c_h:(g + 1) * c_h] = w[g]
        panels.append((f"L{l} {name[4:]}", full))
  if not panels:
    return None
  cols = min(6, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (title, w) in zip(axes.flat, panels):
    bound = max(float(np.abs(w).max()), 1e-9)
    ax.imshow(w, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_title(title, fontsize=7)
  fig.suptitle("head mixing (rows: new head, columns: old head)", fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_heatmap(grid, path: str, *, rows: Sequence[str], cols: Sequence[str], xlabel: str = "",
                 title: str = "", vmin: float = 0.0, vmax: float = 1.0) -> str:
  """An annotated heat map (e.g. accuracy by needle count and depth)."""
  grid = np.asarray(grid, float)
  fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.7 * len(rows) + 1.5))
  im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
  ax.set_xticks(range(len(cols)), cols)
  ax.set_yticks(range(len(rows)), rows)
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
              color="white" if grid[i, j] < (vmin + vmax) / 2 else "black")
  ax.set_xlabel(xlabel)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  return _save(fig, path)


def plot_lines(series: dict, path: str, *, xlabel: str = "", ylabel: str = "",
               title: str = "") -> str:
  """Named (xs, ys) series on one axis."""
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  if len(series) > 1:
    ax.legend()
  fig.tight_layout()
  return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Command line (absl flags on this command's own FlagValues: see mta_jax/cli.py)
# ---------------------------------------------------------------------------------------------

_FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "training workdir or export directory", flag_values=_FLAGS)
flags.DEFINE_string("text", None, "the text whose attention is drawn", flag_values=_FLAGS)
flags.DEFINE_string("out", "", "output directory (default: <model>/viz)", flag_values=_FLAGS)
flags.DEFINE_integer("max_len", 64, "positions drawn (the first ones)", flag_values=_FLAGS)
flags.DEFINE_string("tokenizer", "", "override the recorded tokenizer file", flag_values=_FLAGS)
flags.mark_flags_as_required(["model", "text"], flag_values=_FLAGS)


def _main(rest: list[str]) -> int:
  del rest
  import sys

  import jax.numpy as jnp
  args = _FLAGS
  from mta_jax import generate
  from mta_jax.config import ConfigError
  try:
    lm = generate.load(args.model, tokenizer=args.tokenizer)
    if lm.tokenizer is None:
      raise ConfigError("the run recorded no tokenizer; pass --tokenizer=FILE.")
    ids = generate.encode_prompt(lm.tokenizer, args.text, lm.config.data.add_bos)
    ids = ids[:min(args.max_len, lm.config.model.max_len)]
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.model, "viz")
  labels = [lm.tokenizer.decode([i]) or "_" for i in ids]
  stages = attention_stages(lm.model, jnp.asarray([ids], jnp.int32))
  written = [plot_attention_stages(s, os.path.join(out, f"attention_L{l}.png"), layer=l,
                                   labels=labels) for l, s in enumerate(stages)]
  for f in (plot_kernels(lm.model, os.path.join(out, "kernels.png")),
            plot_head_mix(lm.model, os.path.join(out, "head_mix.png"))):
    if f:
      written.append(f)
  print("wrote " + ", ".join(written))
  return 0


def main(argv=None) -> int:
  """`python -m mta_jax.viz`; `argv`: the arguments (tests)."""
  return cli.run(_main, _FLAGS, argv, "python -m mta_jax.viz", __doc__)


def _save(fig, path: str) -> str:
  from mta_jax import storage  # local or remote (gs://...) path
  storage.save_figure(fig, path)
  plt.close(fig)
  return path


if __name__ == "__main__":
  import sys
  sys.exit(main())
