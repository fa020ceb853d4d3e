"""Pallas backward kernels of the fused MTA op (tiling and wiring: `ops_pallas.py`).

Covered: every op WITHOUT post-softmax ops (pre conv of any size, pre head mixing of any group
size, segments, the causal mask; also plain causal softmax). With a post-softmax conv or post
mixing the gradient is the chunked implementation's exact VJP instead (`ops_pallas`).

As in flash attention, the backward recomputes the weights from the forward's log-sum-exp
`lse` and uses D = rowsum(dout * out):

    dV_o  = P_o^T dout_o           dX_o = P_o * (dout_o V_o^T - D_o)
    dC_i  = sum_o W[o, i] dX_o     (transpose of the pre head mixing; dW[o, i] = <dX_o, C_i>)
    dS0_i = ConvT(dC_i) * Mask     (transpose of the pre conv;  dKer[a, b] = <dC, shifted S0>)
    dQ_i  = dS0_i K_i / sqrt(d)    dK_i = dS0_i^T Q_i / sqrt(d)

A program owns the [block_q, block_k] tile (query block i, key block j) of dS0. The transposed
conv reads dC on c_q - 1 rows BELOW the tile and c_k // 2 columns either side, so the program
recomputes P and dX on that "x region" (rows [i bq, i bq + bq + c_q - 1), columns
[j bk - c_k // 2, j bk + bk + c_k // 2)), which needs S0 on c_q - 1 more rows above and
c_k // 2 more columns either side (the q / k windows). Every weight gradient term is summed
over the program's own tile only, so each (row, column) counts once; the per-program partial
sums are reduced outside (XLA).

Two kernels, as in flash attention: `dq` (grid b, g, i, j; keys innermost) accumulates dQ and
the weight-gradient partials of query block i; `dkv` (grid b, g, j, i; queries innermost)
accumulates dK and dV of key block j. Both recompute the tile.

Precision: dS stays float32 in the dQ / dK matmuls (bf16 q / k are widened), as in the xla
reference's own gradient; rounding dS to bf16 first (as softmax flash kernels do) doubles the
gradient error of bf16 inputs. P is rounded to v's dtype for dV, as the forward rounds it for A V.
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
  """Static tiling of the backward (hashable: it parameterises the kernels)."""
  batch: int
  length: int
  heads: int
  head_dim: int
  heads_per_program: int
  block_q: int
  block_k: int
  c_pre: tuple[int, int] | None
  c_h_pre: int | None
  segments: bool
  lane_align: int

  @property
  def hr(self) -> int:      # conv row halo (c_q - 1)
    return 0 if self.c_pre is None else self.c_pre[0] - 1

  @property
  def hc(self) -> int:      # conv column halo (c_k // 2)
    return 0 if self.c_pre is None else self.c_pre[1] // 2

  @property
  def rows_x(self) -> int:  # rows of the x region (P, dX, dC)
    return self.block_q + self.hr

  @property
  def cols_x(self) -> int:
    return self.block_k + 2 * self.hc

  @property
  def q_rows(self) -> int:  # q window: x region rows plus the conv's rows above
    return self.rows_x + self.hr

  def _align(self, n: int) -> int:
    return -(-n // self.lane_align) * self.lane_align

  @property
  def k_cols(self) -> int:  # k window: x region columns plus the conv's columns either side
    return self._align(self.cols_x + 2 * self.hc)

  @property
  def v_cols(self) -> int:
    return self._align(self.cols_x)


class _Tile:
  """Masks and segment ids of one backward tile, shared by every head."""

  def __init__(self, bp: BwdPlan, refs, i, j):
    bq, bk, hr, hc = bp.block_q, bp.block_k, bp.hr, bp.hc
    seg_in = seg_cols = None
    if bp.segments:
      seg_in = refs["segq"][:, :1]     # [q_rows, 1]
      seg_cols = refs["segk"][:1, :]   # [1, k_cols]
    self.seg_in = seg_in
    self.ok_in = (valid(bp, i * bq - hr, bp.q_rows, j * bk - 2 * hc, bp.k_cols, seg_in,
                         seg_cols) if bp.has_pre else None)
    seg_xr = None if seg_in is None else seg_in[hr:hr + bp.rows_x]
    seg_xc = None if seg_cols is None else seg_cols[:, hc:hc + bp.cols_x]
    self.seg_xr = seg_xr
    ok_x = valid(bp, i * bq, bp.rows_x, j * bk - hc, bp.cols_x, seg_xr, seg_xc)
    row = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bp.rows_x, bp.cols_x), 0)
    self.ok_x = ok_x & (row < bp.length)  # padded rows past the end carry no gradient
    seg_or = None if seg_xr is None else seg_xr[:bq]
    seg_oc = None if seg_xc is None else seg_xc[:, hc:hc + bk]
    self.ok_own = valid(bp, i * bq, bq, j * bk, bk, seg_or, seg_oc)


def _s0(bp, refs, tile, h):
  """S0 = QK^T / sqrt(d) on the q / k windows, Mask_0 applied if a pre op follows."""
  s = dot(refs["q"][h], refs["k"][h], ((1,), (1,))) / math.sqrt(bp.head_dim)
  return jnp.where(tile.ok_in, s, 0.0) if bp.has_pre else s


def _c(bp, refs, tile, head0, h):
  """C_h (S after the pre conv, before mixing) on the x region."""
  s = _s0(bp, refs, tile, h)
  if bp.c_pre is None:
    return s[:bp.rows_x, :bp.cols_x]
  c_q, c_k = bp.c_pre
  return conv_one(s, refs["w_pre"], head0 + h, c_q, c_k, bp.rows_x, bp.cols_x, tile.seg_in)


def _p_and_dx(bp, refs, tile, o, x):
  """P_o and dX_o on the x region from the final logits x (before the NEG mask)."""
  x = jnp.where(tile.ok_x, x, NEG)
  p = jnp.where(tile.ok_x, jnp.exp(x - refs["lse"][o][:, :1]), 0.0)
  dp = dot(refs["do"][o], refs["v"][o], ((1,), (1,)))[:, :bp.cols_x]
  return p, p * (dp - refs["di"][o][:, :1])


def _conv_t(bp, refs, tile, head, dc):
  """dS0 on the own [block_q, block_k] tile: the transpose of the pre conv applied to dC."""
  if bp.c_pre is None:
    return dc[:bp.block_q, :bp.block_k]
  c_q, c_k = bp.c_pre
  bq, bk, w_ref = bp.block_q, bp.block_k, refs["w_pre"]
  out = None
  for a in range(c_q):
    r = c_q - 1 - a  # the output row r' receives dC row r' + r
    term = None
    for b in range(c_k):
      cc = c_k - 1 - b
      t = w_ref[(head * c_q + a) * c_k + b] * dc[r:r + bq, cc:cc + bk]
      term = t if term is None else term + t
    if tile.seg_xr is not None and r:
      term = jnp.where(tile.seg_xr[r:r + bq] == tile.seg_xr[:bq], term, 0.0)
    out = term if out is None else out + term
  return out


def _ds_own(bp, refs, tile, head, dc):
  """dS0 (the gradient of QK^T / sqrt(d)) on the own tile: conv transpose, then Mask_0's."""
  ds = _conv_t(bp, refs, tile, head, dc)
  return jnp.where(tile.ok_own, ds, 0.0) if bp.has_pre else ds


def _kernel_grad_partials(bp, refs, tile, h, dc):
  """Adds <dC_own, shifted S0> for every tap of head h's pre conv to refs["dwk"][h]."""
  c_q, c_k = bp.c_pre
  bq, bk, hc = bp.block_q, bp.block_k, bp.hc
  s0 = _s0(bp, refs, tile, h)
  dc_own = dc[:bq, hc:hc + bk]
  tap = jax.lax.broadcasted_iota(jnp.int32, refs["dwk"].shape[1:], 0)
  taps = jnp.zeros(refs["dwk"].shape[1:], jnp.float32)  # [c_q * c_k, LANES], row = tap
  for a in range(c_q):
    same = None
    if tile.seg_in is not None and a != c_q - 1:
      same = tile.seg_in[a:a + bq] == tile.seg_in[c_q - 1:c_q - 1 + bq]
    for b in range(c_k):
      t = dc_own * s0[a:a + bq, hc + b:hc + b + bk]
      if same is not None:
        t = jnp.where(same, t, 0.0)
      taps = jnp.where(tap == a * c_k + b, _total(t), taps)
  refs["dwk"][h] = refs["dwk"][h] + taps


def _total(x):
  """[1, 1] sum of a 2-D tile (lanes first, then sublanes)."""
  return x.sum(axis=1, keepdims=True).sum(axis=0, keepdims=True)


def _mix_grad_partials(bp, refs, o, dx):
  """Adds <dX_o, C_i> (own tile) for the inputs i of o's mixing group to refs["dwm"][o]."""
  c_h, bq, bk, hc = bp.c_h_pre, bp.block_q, bp.block_k, bp.hc
  base = o - o % c_h  # heads_per_program is a multiple of c_h, and so is head0
  dx_own = dx[:bq, hc:hc + bk]
  def step(i, acc):
    c_own = refs["spre"][base + i][:bq, hc:hc + bk]
    row = jax.lax.broadcasted_iota(jnp.int32, (c_h, LANES), 0)
    return acc + jnp.where(row == i, _total(dx_own * c_own), 0.0)
  acc = jax.lax.fori_loop(0, c_h, step, jnp.zeros((c_h, LANES), jnp.float32))
  refs["dwm"][o] = refs["dwm"][o] + acc


def _tile_ds(bp, refs, tile, head0, *, on_p, on_ds, weight_grads):
  """Runs the tile: on_p(o, P_o) for dV, on_ds(h, dS0_h own tile) for dQ / dK."""
  hp = bp.heads_per_program
  if bp.c_h_pre is None:
    def per_head(h):
      p, dx = _p_and_dx(bp, refs, tile, h, _c(bp, refs, tile, head0, h))
      on_p(h, p)
      if weight_grads and bp.c_pre is not None:
        _kernel_grad_partials(bp, refs, tile, h, dx)
      on_ds(h, _ds_own(bp, refs, tile, head0 + h, dx))
    head_loop(hp, per_head)
    return

  def store_c(h):
    refs["spre"][h] = _c(bp, refs, tile, head0, h)
  head_loop(hp, store_c)

  def per_out_head(o):
    p, dx = _p_and_dx(bp, refs, tile, o, mixed(refs["spre"], refs["mix_pre"], head0, o,
                                                  bp.c_h_pre))
    on_p(o, p)
    if weight_grads:
      _mix_grad_partials(bp, refs, o, dx)
    refs["sdx"][o] = dx
  head_loop(hp, per_out_head)

  def per_in_head(h):
    dc = _mixed_t(refs["sdx"], refs["mix_pre"], head0, h, bp.c_h_pre)
    if weight_grads and bp.c_pre is not None:
      _kernel_grad_partials(bp, refs, tile, h, dc)
    on_ds(h, _ds_own(bp, refs, tile, head0 + h, dc))
  head_loop(hp, per_in_head)


def _mixed_t(src_ref, w_ref, head0, h, c_h):
  """Transpose of the head mixing for local input head h: sum_o W[group, o, h'] src[base + o]."""
  glob = head0 + h
  group, h_in = glob // c_h, glob % c_h
  base = h - h_in
  def step(o, acc):
    return acc + w_ref[(group * c_h + o) * c_h + h_in] * src_ref[base + o]
  return jax.lax.fori_loop(1, c_h, step, w_ref[group * c_h * c_h + h_in] * src_ref[base])


def _should_run(bp, i, j):
  return j * bp.block_k <= (i + 1) * bp.block_q - 1


def _dq_kernel(bp, names, *refs):
  refs = dict(zip(names, refs))
  g, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  head0 = g * bp.heads_per_program
  acc_names = ["dq_acc"] + [n for n in ("dwk", "dwm") if n in refs]

  @pl.when(j == 0)
  def _():
    for n in acc_names:
      refs[n][...] = jnp.zeros(refs[n].shape, jnp.float32)

  @pl.when(_should_run(bp, i, j))
  def _():
    tile = _Tile(bp, refs, i, j)
    k_lo = 2 * bp.hc

    def on_ds(h, ds):
      k_own = refs["k"][h].astype(jnp.float32)[k_lo:k_lo + bp.block_k]  # f32: see Precision
      refs["dq_acc"][h] = refs["dq_acc"][h] + dot(ds, k_own, ((1,), (0,)))
    _tile_ds(bp, refs, tile, head0, on_p=lambda o, p: None, on_ds=on_ds, weight_grads=True)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    scale = 1.0 / math.sqrt(bp.head_dim)
    refs["dq"][...] = (refs["dq_acc"][...] * scale).astype(refs["dq"].dtype)
    for n in acc_names[1:]:
      refs[n + "_out"][...] = refs[n][...]


def _dkv_kernel(bp, names, *refs):
  refs = dict(zip(names, refs))
  g, j, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  head0 = g * bp.heads_per_program

  @pl.when(i == 0)
  def _():
    refs["dk_acc"][...] = jnp.zeros(refs["dk_acc"].shape, jnp.float32)
    refs["dv_acc"][...] = jnp.zeros(refs["dv_acc"].shape, jnp.float32)

  @pl.when(_should_run(bp, i, j))
  def _():
    tile = _Tile(bp, refs, i, j)
    bq, bk, hr, hc = bp.block_q, bp.block_k, bp.hr, bp.hc

    def on_p(o, p):
      do_own = refs["do"][o][:bq]
      p_own = p[:bq, hc:hc + bk]
      refs["dv_acc"][o] = refs["dv_acc"][o] + dot(p_own.T.astype(do_own.dtype), do_own,
                                                   ((1,), (0,)))

    def on_ds(h, ds):
      q_own = refs["q"][h].astype(jnp.float32)[hr:hr + bq]
      refs["dk_acc"][h] = refs["dk_acc"][h] + dot(ds.T, q_own, ((1,), (0,)))
    _tile_ds(bp, refs, tile, head0, on_p=on_p, on_ds=on_ds, weight_grads=False)

  @pl.when(i == pl.num_programs(3) - 1)
  def _():
    scale = 1.0 / math.sqrt(bp.head_dim)
    refs["dk"][...] = (refs["dk_acc"][...] * scale).astype(refs["dk"].dtype)
    refs["dv"][...] = refs["dv_acc"][...].astype(refs["dv"].dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers.
# ---------------------------------------------------------------------------------------------

def _in_specs(bp, order, segs, weights):
  """In-specs for q / k / v / dout / lse / di windows, segments and SMEM weights.

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
  orows = bp.rows_x
  def win(rows, width, pick):
    return pl.BlockSpec((sq, hp, sq, rows, width),
                        lambda *a: (pick(*a)[0], g_of(*a), pick(*a)[1], 0, 0))
  specs = [win(bp.q_rows, bp.head_dim, qi), win(bp.k_cols, bp.head_dim, kj),
           win(bp.v_cols, bp.head_dim, kj), win(orows, bp.head_dim, qi),
           win(orows, LANES, qi), win(orows, LANES, qi)]
  names = ["q", "k", "v", "do", "lse", "di"]
  if segs:
    specs += [pl.BlockSpec((sq, sq, bp.q_rows, LANES), lambda *a: (*qi(*a), 0, 0)),
              pl.BlockSpec((sq, sq, SUBLANES, bp.k_cols), lambda *a: (*kj(*a), 0, 0))]
    names += ["segq", "segk"]
  present = [n for n, on in (("w_pre", bp.c_pre), ("mix_pre", bp.c_h_pre)) if on]
  assert len(present) == len(weights)
  specs += [pl.BlockSpec(memory_space=pltpu.SMEM) for _ in weights]
  return specs, names + present


def _mix_scratch(bp):
  if bp.c_h_pre is None:
    return [], []
  shape = pltpu.VMEM((bp.heads_per_program, bp.rows_x, bp.cols_x), jnp.float32)
  return [shape, shape], ["spre", "sdx"]


def dq_call(bp, windows, segs, weights, *, dq_dtype, interpret: bool):
  """-> dq [B, H, n_q * bq, D], and the weight-gradient partials (or None):
  dwk [B, H, n_q, c_q * c_k, LANES], dwm [B, H, n_q, c_h, LANES] (every lane equal)."""
  hp, sq = bp.heads_per_program, pl.squeezed
  specs, names = _in_specs(bp, "ij", segs, weights)
  grid = (bp.batch, bp.heads // hp, bp.n_q, bp.n_k)
  out_specs = [pl.BlockSpec((sq, hp, bp.block_q, bp.head_dim), lambda b, g, i, j: (b, g, i, 0))]
  out_shapes = [jax.ShapeDtypeStruct((bp.batch, bp.heads, bp.n_q * bp.block_q, bp.head_dim),
                                     dq_dtype)]
  out_names, scratch, scratch_names = ["dq"], [pltpu.VMEM((hp, bp.block_q, bp.head_dim),
                                                          jnp.float32)], ["dq_acc"]
  for name, rows, on in (("dwk", math.prod(bp.c_pre or (1,)), bp.c_pre),
                         ("dwm", bp.c_h_pre or 1, bp.c_h_pre)):
    if not on:
      continue
    out_specs.append(pl.BlockSpec((sq, hp, sq, rows, LANES),
                                  lambda b, g, i, j: (b, g, i, 0, 0)))
    out_shapes.append(jax.ShapeDtypeStruct((bp.batch, bp.heads, bp.n_q, rows, LANES),
                                           jnp.float32))
    out_names.append(name + "_out")
    scratch.append(pltpu.VMEM((hp, rows, LANES), jnp.float32))
    scratch_names.append(name)
  mix_shapes, mix_names = _mix_scratch(bp)
  args = (*windows, *segs, *weights)
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, bp, names + out_names + scratch_names + mix_names),
      name="mta_dq",
      grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shapes,
      scratch_shapes=scratch + mix_shapes,
      compiler_params=compiler_params(specs, args, out_specs, out_shapes, scratch + mix_shapes,
                                      (bp.q_rows, bp.k_cols), 3 * math.prod(bp.c_pre or (0,))),
      interpret=interpret,
  )(*args)
  outs = dict(zip(out_names, outs))
  return outs["dq"], outs.get("dwk_out"), outs.get("dwm_out")


def dkv_call(bp, windows, segs, weights, *, dk_dtype, dv_dtype, interpret: bool):
  """-> dk, dv [B, H, n_k * bk, D]."""
  hp, sq = bp.heads_per_program, pl.squeezed
  specs, names = _in_specs(bp, "ji", segs, weights)
  grid = (bp.batch, bp.heads // hp, bp.n_k, bp.n_q)
  spec = pl.BlockSpec((sq, hp, bp.block_k, bp.head_dim), lambda b, g, j, i: (b, g, j, 0))
  shape = lambda dt: jax.ShapeDtypeStruct(
      (bp.batch, bp.heads, bp.n_k * bp.block_k, bp.head_dim), dt)
  acc = pltpu.VMEM((hp, bp.block_k, bp.head_dim), jnp.float32)
  mix_shapes, mix_names = _mix_scratch(bp)
  args = (*windows, *segs, *weights)
  out_shapes = [shape(dk_dtype), shape(dv_dtype)]
  scratch = [acc, acc] + mix_shapes
  return pl.pallas_call(
      functools.partial(_dkv_kernel, bp, names + ["dk", "dv", "dk_acc", "dv_acc"] + mix_names),
      name="mta_dkv",
      grid=grid, in_specs=specs, out_specs=[spec, spec], out_shape=out_shapes,
      scratch_shapes=scratch,
      compiler_params=compiler_params(specs, args, [spec, spec], out_shapes, scratch,
                                      (bp.q_rows, bp.k_cols), 3 * math.prod(bp.c_pre or (0,))),
      interpret=interpret,
  )(*args)
