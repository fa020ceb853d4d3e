"""Pallas backward kernels of the fused MTA op (tiling and wiring: `ops_pallas.py`).

Covered: every op the forward accepts (pre / post key-query convs of any size, pre / post head
mixing of any group size, segments, the causal mask; also plain causal softmax). With the
stages of ops.py, P the softmax weights (from the forward's log-sum-exp `lse`), U' = Mask_0(
Conv_post(P)) and A = HeadMix_post(U'), the gradient is

    dA_o  = dout_o V_o^T           dV_o  = A_o^T dout_o
    dU'_h = Mask * sum_o W'[o, h] dA_o   (transpose of the post mixing; dW'[o, h] = <dA_o, U'_h>)
    dP_h  = ConvT_post(dU'_h)      (transpose of the post conv; dKer'[a, b] = <dU', shifted P>)
    dX_o  = P_o * (dP_o - D_o)     D_o = rowsum(P_o * dP_o)
    dC_i  = sum_o W[o, i] dX_o     (transpose of the pre mixing;  dW[o, i] = <dX_o, C_i>)
    dS0_i = ConvT_pre(dC_i) * Mask (transpose of the pre conv;    dKer[a, b] = <dC, shifted S0>)
    dQ_i  = dS0_i K_i / sqrt(d)    dK_i = dS0_i^T Q_i / sqrt(d)

Without post ops dP = dA and D = rowsum(dout * out) (flash attention's identity); with them D
needs a pass of its own over every key, the "dpost" kernel, which also sums the post-weight
gradients.

Regions. A program owns the [block_q, block_k] tile (query block i, key block j) of dS0. The
transposed pre conv reads dC (so dX, P and dP) on the "x region": c_q - 1 rows below the tile and
c_k // 2 columns either side. dP there is the transposed post conv of dU' on the "u region"
(the post conv's c_q' - 1 more rows below, c_k' // 2 more columns either side). P is needed on
the x region and, for dV and the post-kernel gradient, c_q' - 1 rows above the tile: the "p
region" (rows of the u region shifted up by c_q' - 1). P on the p region needs S0 on the pre
conv's halo around it: the q / k windows. Without post ops u = x and p = x. The dpost kernel
uses the same regions with an empty x halo (x region = the tile). Every weight-gradient term
is summed over the program's own tile only, so each (row, column) counts once; the per-program
partial sums are reduced outside (XLA).

Kernels: `dpost` (grid b, g, i, j; with post ops only) -> D and the post-weight partials;
`dq` (grid b, g, i, j; keys innermost) -> dQ and the pre-weight partials of query block i;
`dkv` (grid b, g, j, i; queries innermost) -> dK, dV of key block j. Each recomputes its tile.

Precision: dS stays float32 in the dQ / dK matmuls (bf16 q / k are widened), as in the xla
reference's own gradient; rounding dS to bf16 first (as softmax flash kernels do) doubles the
gradient error of bf16 inputs. A is rounded to v's dtype for dV, as the forward rounds it for A V.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mta_jax.pallas_kernel import (LANES, NEG, SUBLANES, conv_one, dot, head_loop, mixed,
                                   valid, compiler_params, TileGrid)


@dataclasses.dataclass(frozen=True)
class BwdPlan(TileGrid):
  """The backward's tiling: the regions below and the windows that cover them."""
  x_halo: bool = True       # False: the dpost kernel (x region = the own tile)

  @property
  def xr(self) -> int:      # rows of the x region below the tile
    return self.halo_rows_pre if self.x_halo else 0

  @property
  def xc(self) -> int:      # columns of the x region either side of the tile
    return self.halo_cols_pre if self.x_halo else 0

  @property
  def rows_x(self) -> int:  # x region: rows [r0, r0 + rows_x), columns from c0 - xc
    return self.block_q + self.xr

  @property
  def cols_x(self) -> int:
    return self.block_k + 2 * self.xc

  @property
  def rows_u(self) -> int:  # u region: rows from r0, columns from c0 - xc - halo_cols_post
    return self.rows_x + self.halo_rows_post

  @property
  def cols_u(self) -> int:
    return self.cols_x + 2 * self.halo_cols_post

  @property
  def rows_p(self) -> int:  # p region: rows from r0 - halo_rows_post, the u region's columns
    return self.rows_x + self.halo_rows_post

  @property
  def q_front(self) -> int:  # q window: the p region plus the pre conv's rows above
    return self.halo_rows_post + self.halo_rows_pre

  @property
  def q_rows(self) -> int:
    return self.rows_p + self.halo_rows_pre

  @property
  def seg_rows(self) -> int:  # segment-id rows: the q window and the u region below it
    return self.q_rows + self.halo_rows_post

  @property
  def k_front(self) -> int:  # k window: the p region plus the pre conv's columns either side
    return self.xc + self.halo_cols_post + self.halo_cols_pre

  @property
  def k_cols(self) -> int:
    return self.align(self.cols_u + 2 * self.halo_cols_pre)

  @property
  def v_front(self) -> int:  # v window: the u region's columns
    return self.xc + self.halo_cols_post

  @property
  def v_cols(self) -> int:
    return self.align(self.cols_u)


  def tile_work(self, kernel: str) -> tuple[int, int]:
    """(multiply-adds, exponentials) of one tile and head of kernel "dpost", "dq" or "dkv":
    each recomputes S0 on the windows, C / X / P on the p region, dA and dU' on the u region
    and dP on the x region, then does its own part on the tile."""
    tile, d = self.block_q * self.block_k, self.head_dim
    s0 = self.q_rows * (self.cols_u + 2 * self.halo_cols_pre) * d
    macs = (s0 + self.rows_p * self.cols_u * (self.conv_pre + self.mix_pre)
            + self.rows_u * self.cols_u * (d + self.mix_post)
            + self.rows_x * self.cols_x * self.conv_post)
    u_own = tile * (self.conv_post + self.mix_post) if self.has_post else 0
    if kernel == "dpost":   # D, the post kernel's and mixing's gradients, U'
      macs += tile * (1 + self.conv_post + self.mix_post) + u_own
    else:                   # transposed pre mixing and conv, then dQ or dK (and dV)
      macs += self.rows_x * self.cols_x * self.mix_pre + tile * (self.conv_pre + d)
      if kernel == "dq":    # the pre weights' gradients (S0 recomputed for the kernel's)
        macs += tile * (self.conv_pre + self.mix_pre) + (s0 if self.c_pre else 0)
      else:
        macs += u_own + tile * d
    return macs, self.rows_p * self.cols_u


class _Tile:
  """Masks and segment ids of one backward tile's regions, shared by every head."""

  def __init__(self, bp: BwdPlan, refs, i, j):
    r0, c0 = i * bp.block_q, j * bp.block_k
    seg_all = seg_cols = None
    if bp.segments:
      seg_all = refs["segq"][:, :1]    # [seg_rows, 1]: rows from r0 - q_front
      seg_cols = refs["segk"][:1, :]   # [1, k_cols]: columns from c0 - k_front

    def region(dr, rows, dc, cols):
      """(ok, row segment ids) of rows [dr, dr + rows) of the q window x columns [dc,
      dc + cols) of the k window (static offsets)."""
      row0, col0 = r0 - bp.q_front + dr, c0 - bp.k_front + dc
      sr = sc = None
      if seg_all is not None:
        sr, sc = seg_all[dr:dr + rows], seg_cols[:, dc:dc + cols]
      ok = valid(bp, row0, rows, col0, cols, sr, sc)
      row = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
      return ok & (row < bp.length), sr  # padded rows past the end carry no gradient

    self.seg_q = None if seg_all is None else seg_all[:bp.q_rows]
    self.ok_in = region(0, bp.q_rows, 0, bp.k_cols)[0] if bp.has_pre else None
    self.ok_p, self.seg_p = region(bp.halo_rows_pre, bp.rows_p, bp.halo_cols_pre, bp.cols_u)
    self.ok_u, self.seg_u = region(bp.q_front, bp.rows_u, bp.halo_cols_pre, bp.cols_u)
    self.ok_own = region(bp.q_front, bp.block_q, bp.k_front, bp.block_k)[0]
    self.seg_x = None if self.seg_u is None else self.seg_u[:bp.rows_x]


# ---------------------------------------------------------------------------------------------
# Pieces of a tile (one head at a time).
# ---------------------------------------------------------------------------------------------


def _s0(bp, refs, tile, h):
  """S0 = QK^T / sqrt(d) on the q / k windows, Mask_0 applied if a pre op follows."""
  s = dot(refs["q"][h], refs["k"][h], ((1,), (1,))) / math.sqrt(bp.head_dim)
  return jnp.where(tile.ok_in, s, 0.0) if bp.has_pre else s


def _c(bp, refs, tile, head0, h):
  """C_h (S after the pre conv, before mixing) on the p region."""
  s = _s0(bp, refs, tile, h)
  if bp.c_pre is None:
    return s[:bp.rows_p, :bp.cols_u]
  c_q, c_k = bp.c_pre
  return conv_one(s, refs["w_pre"], head0 + h, c_q, c_k, bp.rows_p, bp.cols_u, tile.seg_q)


def _p(bp, refs, tile, o, x):
  """P_o on the p region from the final logits x (before the NEG mask)."""
  x = jnp.where(tile.ok_p, x, NEG)
  return jnp.where(tile.ok_p, jnp.exp(x - refs["lse"][o][:, :1]), 0.0)


def _x_part(bp, p):
  """The x region's part of a p-region tile."""
  r, c = bp.halo_rows_post, bp.halo_cols_post
  return p[r:r + bp.rows_x, c:c + bp.cols_x]


def _own(bp, t, row0, col0):
  return t[row0:row0 + bp.block_q, col0:col0 + bp.block_k]


def _da(bp, refs, o):
  """dA_o = dout_o V_o^T on the u region."""
  return dot(refs["do"][o], refs["v"][o], ((1,), (1,)))[:, :bp.cols_u]


def _du_dp(bp, refs, tile, head0, o):
  """(dU'_o on the u region, dP_o on the x region). Without post ops both are dA_o."""
  if bp.c_h_post is not None:
    da = _mixed_t(refs["sda"], refs["mix_post"], head0, o, bp.c_h_post)
  else:
    da = _da(bp, refs, o)
  if not bp.has_post:
    return da, da
  du = jnp.where(tile.ok_u, da, 0.0)                                # Mask_0's transpose
  if bp.c_post is None:
    return du, du
  c_q, c_k = bp.c_post
  return du, conv_t(du, refs["w_post"], head0 + o, c_q, c_k, bp.rows_x, bp.cols_x, tile.seg_u)


def _u_own(bp, refs, tile, head0, h, p):
  """U'_h = Mask_0(Conv_post(P_h)) on the own tile (before the post mixing)."""
  if bp.c_post is None:
    u = _own(bp, p, bp.halo_rows_post, bp.xc + bp.halo_cols_post)
  else:
    c_q, c_k = bp.c_post
    u = conv_one(p[:, bp.xc:], refs["w_post"], head0 + h, c_q, c_k, bp.block_q, bp.block_k,
                 tile.seg_p)
  return jnp.where(tile.ok_own, u, 0.0)


def conv_t(dc, w_ref, head, c_q, c_k, rows, cols, seg_rows):
  """The transpose of `conv_one`: [rows, cols] from dc [rows + c_q - 1, >= cols + c_k - 1]
  whose (0, 0) receives the gradient of output (0, 0) - c_k // 2 columns to its left.
  seg_rows: None or the segment ids of dc's rows."""
  out = None
  for a in range(c_q):
    r = c_q - 1 - a  # the output row t receives dc row t + r
    term = None
    for b in range(c_k):
      cc = c_k - 1 - b
      t = w_ref[(head * c_q + a) * c_k + b] * dc[r:r + rows, cc:cc + cols]
      term = t if term is None else term + t
    if seg_rows is not None and r:
      term = jnp.where(seg_rows[r:r + rows] == seg_rows[:rows], term, 0.0)
    out = term if out is None else out + term
  return out


def _ds_own(bp, refs, tile, head, dc):
  """dS0 (the gradient of QK^T / sqrt(d)) on the own tile: pre conv transpose, Mask_0's."""
  if bp.c_pre is None:
    ds = dc[:bp.block_q, :bp.block_k]
  else:
    c_q, c_k = bp.c_pre
    ds = conv_t(dc, refs["w_pre"], head, c_q, c_k, bp.block_q, bp.block_k, tile.seg_x)
  return jnp.where(tile.ok_own, ds, 0.0) if bp.has_pre else ds


def _kernel_grad_partials(bp, acc_ref, h, g_own, src, c, seg_rows):
  """acc_ref[h][tap] += <g_own, src shifted by the tap> for every tap of a c = (c_q, c_k)
  conv: src's (0, 0) is tap [0, 0] of own (0, 0); seg_rows the ids of src's rows."""
  c_q, c_k = c
  bq, bk = bp.block_q, bp.block_k
  tap = jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape[1:], 0)
  taps = jnp.zeros(acc_ref.shape[1:], jnp.float32)  # [c_q * c_k, LANES], row = tap
  for a in range(c_q):
    same = None
    if seg_rows is not None and a != c_q - 1:
      same = seg_rows[a:a + bq] == seg_rows[c_q - 1:c_q - 1 + bq]
    for b in range(c_k):
      t = g_own * src[a:a + bq, b:b + bk]
      if same is not None:
        t = jnp.where(same, t, 0.0)
      taps = jnp.where(tap == a * c_k + b, _total(t), taps)
  acc_ref[h] = acc_ref[h] + taps


def _total(x):
  """[1, 1] sum of a 2-D tile (lanes first, then sublanes)."""
  return x.sum(axis=1, keepdims=True).sum(axis=0, keepdims=True)


def _mix_grad_partials(acc_ref, o, c_h, g_own, src_own):
  """acc_ref[o][i] += <g_own, src_own(base + i)> for the inputs i of o's mixing group."""
  base = o - o % c_h  # heads_per_program is a multiple of c_h, and so is head0
  def step(i, acc):
    row = jax.lax.broadcasted_iota(jnp.int32, (c_h, LANES), 0)
    return acc + jnp.where(row == i, _total(g_own * src_own(base + i)), 0.0)
  acc = jax.lax.fori_loop(0, c_h, step, jnp.zeros((c_h, LANES), jnp.float32))
  acc_ref[o] = acc_ref[o] + acc


def _mixed_t(src_ref, w_ref, head0, h, c_h):
  """Transpose of the head mixing for local input head h: sum_o W[group, o, h'] src[base + o]."""
  glob = head0 + h
  group, h_in = glob // c_h, glob % c_h
  base = h - h_in
  def step(o, acc):
    return acc + w_ref[(group * c_h + o) * c_h + h_in] * src_ref[base + o]
  return jax.lax.fori_loop(1, c_h, step, w_ref[group * c_h * c_h + h_in] * src_ref[base])


def _store(ref, h, x):
  ref[h] = x


def _prologue(bp, refs, tile, head0):
  """What every head of the group needs before the per-head work: dA (post mixing) and C
  (pre mixing), into VMEM scratch."""
  hp = bp.heads_per_program
  if bp.c_h_post is not None:
    head_loop(hp, lambda o: _store(refs["sda"], o, _da(bp, refs, o)))
  if bp.c_h_pre is not None:
    head_loop(hp, lambda h: _store(refs["spre"], h, _c(bp, refs, tile, head0, h)))


def _p_of(bp, refs, tile, head0, o):
  """P_o on the p region (the pre chain of every input head of o's group)."""
  if bp.c_h_pre is None:
    x = _c(bp, refs, tile, head0, o)
  else:
    x = mixed(refs["spre"], refs["mix_pre"], head0, o, bp.c_h_pre)
  return _p(bp, refs, tile, o, x)


def _tile_ds(bp, refs, tile, head0, *, on_p, on_ds, weight_grads):
  """Runs the dq / dkv tile: on_p(o, P_o) (dV), on_ds(h, dS0_h own tile) (dQ / dK)."""
  hp = bp.heads_per_program
  _prologue(bp, refs, tile, head0)

  def dx_of(o):
    p = _p_of(bp, refs, tile, head0, o)
    on_p(o, p)
    _, dp = _du_dp(bp, refs, tile, head0, o)
    return _x_part(bp, p) * (dp - refs["di"][o][:, :1])

  pre_kernel_grads = weight_grads and bp.c_pre is not None
  # Tap [0, 0] of own (0, 0) in the q / k windows.
  s0_own = (bp.halo_rows_post, bp.xc + bp.halo_cols_post)

  def pre_grads_and_ds(h, dc):
    if pre_kernel_grads:
      src = _s0(bp, refs, tile, h)[s0_own[0]:, s0_own[1]:]
      seg = None if tile.seg_q is None else tile.seg_q[s0_own[0]:]
      _kernel_grad_partials(bp, refs["dwk"], h, _own(bp, dc, 0, bp.xc), src, bp.c_pre, seg)
    on_ds(h, _ds_own(bp, refs, tile, head0 + h, dc))

  if bp.c_h_pre is None:
    head_loop(hp, lambda h: pre_grads_and_ds(h, dx_of(h)))
    return

  def per_out_head(o):
    dx = dx_of(o)
    if weight_grads:
      own = (bp.halo_rows_post, bp.xc + bp.halo_cols_post)  # the own tile in the p region (spre)
      _mix_grad_partials(refs["dwm"], o, bp.c_h_pre, _own(bp, dx, 0, bp.xc),
                         lambda i: _own(bp, refs["spre"][i], *own))
    refs["sdx"][o] = dx
  head_loop(hp, per_out_head)
  head_loop(hp, lambda h: pre_grads_and_ds(
      h, _mixed_t(refs["sdx"], refs["mix_pre"], head0, h, bp.c_h_pre)))


def _should_run(bp, i, j):
  return j * bp.block_k <= (i + 1) * bp.block_q - 1


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------


def _accumulating(bp, refs, order, acc_names, body, finish):
  """The skeleton of every backward kernel: grid (b, g, i, j) for order "ij", (b, g, j, i) for
  "ji"; the innermost axis accumulates into acc_names (zeroed at its first step), body(tile,
  head0) runs on tiles with a key at or before the query block's last row, finish() at the
  innermost axis' last step."""
  g, outer, inner = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  i, j = (outer, inner) if order == "ij" else (inner, outer)

  @pl.when(inner == 0)
  def _():
    for n in acc_names:
      refs[n][...] = jnp.zeros(refs[n].shape, jnp.float32)

  @pl.when(_should_run(bp, i, j))
  def _():
    body(_Tile(bp, refs, i, j), g * bp.heads_per_program)

  pl.when(inner == pl.num_programs(3) - 1)(finish)


def _write_partials(refs, names):
  for n in names:
    refs[n + "_out"][...] = refs[n][...]


def _dpost_kernel(bp, names, *refs):
  """D = rowsum(P * dP) of query block i, and the post-weight-gradient partials."""
  refs = dict(zip(names, refs))
  acc_names = [n for n in ("d", "dwkp", "dwmp") if n in refs]

  def body(tile, head0):
    _prologue(bp, refs, tile, head0)

    def per_head(o):
      p = _p_of(bp, refs, tile, head0, o)
      du, dp = _du_dp(bp, refs, tile, head0, o)
      d = (_own(bp, p, bp.halo_rows_post, bp.halo_cols_post) * dp).sum(axis=1, keepdims=True)
      refs["d"][o] = refs["d"][o] + d
      if bp.c_post is not None:
        _kernel_grad_partials(bp, refs["dwkp"], o, _own(bp, du, 0, bp.halo_cols_post), p,
                              bp.c_post, tile.seg_p)
      if bp.c_h_post is not None:
        refs["su"][o] = _u_own(bp, refs, tile, head0, o, p)
    head_loop(bp.heads_per_program, per_head)
    if bp.c_h_post is not None:
      head_loop(bp.heads_per_program, lambda o: _mix_grad_partials(
          refs["dwmp"], o, bp.c_h_post, _own(bp, refs["sda"][o], 0, bp.halo_cols_post),
          lambda h: refs["su"][h]))

  _accumulating(bp, refs, "ij", acc_names, body, lambda: _write_partials(refs, acc_names))


def _dq_kernel(bp, names, *refs):
  refs = dict(zip(names, refs))
  partials = [n for n in ("dwk", "dwm") if n in refs]

  def body(tile, head0):
    k_lo = bp.k_front

    def on_ds(h, ds):
      k_own = refs["k"][h].astype(jnp.float32)[k_lo:k_lo + bp.block_k]  # f32: see Precision
      refs["dq_acc"][h] = refs["dq_acc"][h] + dot(ds, k_own, ((1,), (0,)))
    _tile_ds(bp, refs, tile, head0, on_p=lambda o, p: None, on_ds=on_ds, weight_grads=True)

  def finish():
    scale = 1.0 / math.sqrt(bp.head_dim)
    refs["dq"][...] = (refs["dq_acc"][...] * scale).astype(refs["dq"].dtype)
    _write_partials(refs, partials)

  _accumulating(bp, refs, "ij", ["dq_acc"] + partials, body, finish)


def _dkv_kernel(bp, names, *refs):
  refs = dict(zip(names, refs))
  bq = bp.block_q

  def body(tile, head0):
    def add_dv(o, a_own):
      do_own = refs["do"][o][:bq]
      refs["dv_acc"][o] = refs["dv_acc"][o] + dot(a_own.T.astype(do_own.dtype), do_own,
                                                   ((1,), (0,)))

    def on_p(o, p):
      if not bp.has_post:
        add_dv(o, _own(bp, p, 0, bp.xc))
      elif bp.c_h_post is None:
        add_dv(o, _u_own(bp, refs, tile, head0, o, p))
      else:
        refs["su"][o] = _u_own(bp, refs, tile, head0, o, p)

    def on_ds(h, ds):
      q_own = refs["q"][h].astype(jnp.float32)[bp.q_front:bp.q_front + bq]
      refs["dk_acc"][h] = refs["dk_acc"][h] + dot(ds.T, q_own, ((1,), (0,)))
    _tile_ds(bp, refs, tile, head0, on_p=on_p, on_ds=on_ds, weight_grads=False)
    if bp.c_h_post is not None:
      head_loop(bp.heads_per_program, lambda o: add_dv(
          o, mixed(refs["su"], refs["mix_post"], head0, o, bp.c_h_post)))

  def finish():
    scale = 1.0 / math.sqrt(bp.head_dim)
    refs["dk"][...] = (refs["dk_acc"][...] * scale).astype(refs["dk"].dtype)
    refs["dv"][...] = refs["dv_acc"][...].astype(refs["dv"].dtype)

  _accumulating(bp, refs, "ji", ["dk_acc", "dv_acc"], body, finish)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers.
# ---------------------------------------------------------------------------------------------

WINDOW_NAMES = ("q", "k", "v", "do", "lse", "di")


def window_shapes(bp: BwdPlan) -> dict[str, tuple[int, int, int]]:
  """name -> (rows or columns, rows before r0 / columns before c0, 1 for query rows or 0 for
  key columns) of every window a kernel reads (`ops_pallas` gathers them)."""
  return {"q": (bp.q_rows, bp.q_front, 1), "k": (bp.k_cols, bp.k_front, 0),
          "v": (bp.v_cols, bp.v_front, 0), "do": (bp.rows_u, 0, 1),
          "lse": (bp.rows_p, bp.halo_rows_post, 1), "di": (bp.rows_x, 0, 1)}


def _in_specs(bp, order, segs, weights, names):
  """In-specs for the named windows, segments and SMEM weights.

  order "ij": grid (b, g, i, j); "ji": grid (b, g, j, i). Skipped (future) tiles map to the
  last / first needed block, so they trigger no new copy.
  """
  hp, sq = bp.heads_per_program, pl.squeezed
  last_j = lambda i: ((i + 1) * bp.block_q - 1) // bp.block_k
  first_i = lambda j: (j * bp.block_k) // bp.block_q
  if order == "ij":
    qi = lambda b, g, i, j: (b, i)
    kj = lambda b, g, i, j: (b, jnp.minimum(j, last_j(i)))
  else:
    qi = lambda b, g, j, i: (b, jnp.maximum(i, first_i(j)))
    kj = lambda b, g, j, i: (b, j)
  g_of = lambda *a: a[1]
  shapes = window_shapes(bp)
  specs = []
  for name in names:
    extent, _, is_rows = shapes[name]
    pick = qi if is_rows else kj
    width = LANES if name in ("lse", "di") else bp.head_dim
    specs.append(pl.BlockSpec((sq, hp, sq, extent, width),
                              lambda *a, pick=pick: (pick(*a)[0], g_of(*a), pick(*a)[1], 0, 0)))
  names = list(names)
  if segs:
    specs += [pl.BlockSpec((sq, sq, bp.seg_rows, LANES), lambda *a: (*qi(*a), 0, 0)),
              pl.BlockSpec((sq, sq, SUBLANES, bp.k_cols), lambda *a: (*kj(*a), 0, 0))]
    names += ["segq", "segk"]
  present = [n for n, on in (("w_pre", bp.c_pre), ("w_post", bp.c_post),
                             ("mix_pre", bp.c_h_pre), ("mix_post", bp.c_h_post)) if on]
  assert len(present) == len(weights)
  specs += [pl.BlockSpec(memory_space=pltpu.SMEM) for _ in weights]
  return specs, names + present


def _scratch(bp, *, dx: bool, su: bool):
  """VMEM scratch (shapes, names) holding a head group's tiles for head mixing."""
  hp, f32 = bp.heads_per_program, jnp.float32
  out = []
  if bp.c_h_pre is not None:
    out.append((pltpu.VMEM((hp, bp.rows_p, bp.cols_u), f32), "spre"))
    if dx:
      out.append((pltpu.VMEM((hp, bp.rows_x, bp.cols_x), f32), "sdx"))
  if bp.c_h_post is not None:
    out.append((pltpu.VMEM((hp, bp.rows_u, bp.cols_u), f32), "sda"))
    if su:
      out.append((pltpu.VMEM((hp, bp.block_q, bp.block_k), f32), "su"))
  return [s for s, _ in out], [n for _, n in out]


def _taps(bp) -> int:
  return 3 * sum(math.prod(c) for c in (bp.c_pre, bp.c_post) if c is not None)


def _partials(bp, specs):
  """(out_specs, out_shapes, out_names, scratch, scratch_names) of per-(b, h, i) partial sums:
  specs = ((name, rows, on), ...); each is [B, H, n_q, rows, LANES] float32."""
  hp, sq = bp.heads_per_program, pl.squeezed
  res = ([], [], [], [], [])
  for name, rows, on in specs:
    if not on:
      continue
    res[0].append(pl.BlockSpec((sq, hp, sq, rows, LANES), lambda b, g, i, j: (b, g, i, 0, 0)))
    res[1].append(jax.ShapeDtypeStruct((bp.batch, bp.heads, bp.n_q, rows, LANES), jnp.float32))
    res[2].append(name + "_out")
    res[3].append(pltpu.VMEM((hp, rows, LANES), jnp.float32))
    res[4].append(name)
  return res


def _call(kernel, bp, name, grid, specs, names, args, outs, scratch, *, interpret):
  """One pallas_call ("mta_<kind>"); outs = (out_specs, out_shapes, out_names); scratch =
  (shapes, names)."""
  out_specs, out_shapes, out_names = outs
  return pl.pallas_call(
      functools.partial(kernel, bp, names + out_names + scratch[1]),
      name=name, grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shapes,
      scratch_shapes=scratch[0],
      compiler_params=compiler_params(specs, args, out_specs, out_shapes, scratch[0],
                                      (bp.q_rows, bp.k_cols), _taps(bp)),
      cost_estimate=bp.cost(*bp.tile_work(name.removeprefix("mta_")), args, out_shapes),
      interpret=interpret,
  )(*args)


def dpost_call(bp, windows, segs, weights, *, interpret: bool):
  """-> D [B, H, n_q, bq, LANES] and the post-weight-gradient partials (or None):
  dwkp [B, H, n_q, c_q' * c_k', LANES], dwmp [B, H, n_q, c_h', LANES] (every lane equal)."""
  assert bp.has_post and not bp.x_halo
  names = WINDOW_NAMES[:5]
  specs, names = _in_specs(bp, "ij", segs, weights, names)
  po = _partials(bp, [("d", bp.block_q, True),
                      ("dwkp", math.prod(bp.c_post or (1,)), bp.c_post),
                      ("dwmp", bp.c_h_post or 1, bp.c_h_post)])
  mix_shapes, mix_names = _scratch(bp, dx=False, su=True)
  outs = _call(_dpost_kernel, bp, "mta_dpost", (bp.batch, bp.heads // bp.heads_per_program,
                                                bp.n_q, bp.n_k),
               specs, names, (*windows, *segs, *weights), po[:3],
               (po[3] + mix_shapes, po[4] + mix_names), interpret=interpret)
  outs = dict(zip(po[2], outs))
  return outs["d_out"], outs.get("dwkp_out"), outs.get("dwmp_out")


def dq_call(bp, windows, segs, weights, *, dq_dtype, interpret: bool):
  """-> dq [B, H, n_q * bq, D], and the pre-weight-gradient partials (or None):
  dwk [B, H, n_q, c_q * c_k, LANES], dwm [B, H, n_q, c_h, LANES] (every lane equal)."""
  hp, sq = bp.heads_per_program, pl.squeezed
  specs, names = _in_specs(bp, "ij", segs, weights, WINDOW_NAMES)
  out_spec = pl.BlockSpec((sq, hp, bp.block_q, bp.head_dim), lambda b, g, i, j: (b, g, i, 0))
  out_shape = jax.ShapeDtypeStruct((bp.batch, bp.heads, bp.n_q * bp.block_q, bp.head_dim),
                                   dq_dtype)
  po = _partials(bp, [("dwk", math.prod(bp.c_pre or (1,)), bp.c_pre),
                      ("dwm", bp.c_h_pre or 1, bp.c_h_pre)])
  mix_shapes, mix_names = _scratch(bp, dx=True, su=False)
  outs = _call(_dq_kernel, bp, "mta_dq", (bp.batch, bp.heads // hp, bp.n_q, bp.n_k),
               specs, names, (*windows, *segs, *weights),
               ([out_spec] + po[0], [out_shape] + po[1], ["dq"] + po[2]),
               ([pltpu.VMEM((hp, bp.block_q, bp.head_dim), jnp.float32)] + po[3] + mix_shapes,
                ["dq_acc"] + po[4] + mix_names), interpret=interpret)
  outs = dict(zip(["dq"] + po[2], outs))
  return outs["dq"], outs.get("dwk_out"), outs.get("dwm_out")


def dkv_call(bp, windows, segs, weights, *, dk_dtype, dv_dtype, interpret: bool):
  """-> dk, dv [B, H, n_k * bk, D]."""
  hp, sq = bp.heads_per_program, pl.squeezed
  specs, names = _in_specs(bp, "ji", segs, weights, WINDOW_NAMES)
  spec = pl.BlockSpec((sq, hp, bp.block_k, bp.head_dim), lambda b, g, j, i: (b, g, j, 0))
  shape = lambda dt: jax.ShapeDtypeStruct(
      (bp.batch, bp.heads, bp.n_k * bp.block_k, bp.head_dim), dt)
  acc = pltpu.VMEM((hp, bp.block_k, bp.head_dim), jnp.float32)
  mix_shapes, mix_names = _scratch(bp, dx=True, su=True)
  return _call(_dkv_kernel, bp, "mta_dkv", (bp.batch, bp.heads // hp, bp.n_k, bp.n_q),
               specs, names, (*windows, *segs, *weights),
               ([spec, spec], [shape(dk_dtype), shape(dv_dtype)], ["dk", "dv"]),
               ([acc, acc] + mix_shapes, ["dk_acc", "dv_acc"] + mix_names),
               interpret=interpret)
