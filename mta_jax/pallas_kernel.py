"""The Pallas kernels of the fused MTA forward (tiling and gradients: `ops_pallas.py`).

One program = (batch row b, head group g, query block i, key block j); j is the innermost,
sequential grid axis. A program reads a query window (block_q rows plus the conv row halos
above), a key window (block_k columns plus the conv column halos on both sides), the value
block, segment-id windows and the conv / mixing weights (scalars in SMEM), and computes on it
exactly the op of docs/MTA.md restricted to its tile (the order of the stages is that of ops.py):

    S = QK^T / sqrt(d) -> Mask_0 -> pre conv -> pre mix -> Mask_-inf         (`_pre_logits`)
    A = softmax(S)     (online over key blocks, or exp(S - lse) with lse from pass 1)
    A -> post conv -> Mask_0 -> post mix -> accumulate A V

Everything is written on 2-D [rows, columns] tiles, one per head, with static loops over heads
and conv taps (the conv is c_q * c_k scalar-times-shifted-tile multiply-adds; the mixing c_h^2
scalar-times-tile multiply-adds): per-head 2-D matmuls and elementwise ops are what Mosaic
lowers most reliably.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES, SUBLANES = 128, 8
NEG = -1e30  # finite "-inf" for masked logits: exp(NEG - m) is exactly 0 for every real m


def _dot(a, b, contract):
  # Explicit DEFAULT for bf16: a global "highest" matmul precision would ask Mosaic for an fp32
  # contraction of bf16 operands, which it rejects.
  prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32,
                             precision=prec)


def _valid(plan, row0, rows, col0, cols, seg_rows, seg_cols):
  """[rows, cols] bool: absolute query row0 + r may attend key col0 + c (causal, same doc)."""
  r = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  c = col0 + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  ok = (c <= r) & (c >= 0) & (r >= 0) & (c < plan.length)
  if seg_rows is not None:
    ok = ok & (seg_rows == seg_cols)
  return ok


def _conv(xs, w_ref, head0, c_q, c_k, out_rows, out_cols, seg_rows):
  """Depthwise key-query conv of per-head tiles (a cross-correlation, docs/MTA.md).

  xs: per-head [out_rows + c_q - 1, >= out_cols + c_k - 1] tiles whose (0, 0) is the tap
  [0, 0] of output (0, 0); w_ref: the flat [heads * c_q * c_k] kernel in SMEM; head0: the
  global index of xs[0]. seg_rows: None or the [out_rows + c_q - 1, 1] segment ids of the
  input rows: tap row a of output row t then reads row t + a only within the same document.
  """
  outs = []
  for h, x in enumerate(xs):
    out = None
    for a in range(c_q):
      term = None
      for c in range(c_k):
        w = w_ref[((head0 + h) * c_q + a) * c_k + c]
        t = w * x[a:a + out_rows, c:c + out_cols]
        term = t if term is None else term + t
      if seg_rows is not None and a != c_q - 1:
        same = seg_rows[a:a + out_rows] == seg_rows[c_q - 1:c_q - 1 + out_rows]
        term = jnp.where(same, term, 0.0)
      out = term if out is None else out + term
    outs.append(out)
  return outs


def _mix(xs, w_ref, head0, c_h):
  """Head mixing (Eq. 7) of per-head tiles: new head o = sum_i W[group, o, i] * old head i."""
  outs = []
  for g0 in range(0, len(xs), c_h):
    group = (head0 + g0) // c_h
    for o in range(c_h):
      acc = None
      for i in range(c_h):
        t = w_ref[(group * c_h + o) * c_h + i] * xs[g0 + i]
        acc = t if acc is None else acc + t
      outs.append(acc)
  return outs


def _pre_logits(plan, refs, head0, i, j):
  """Per-head S after the pre-softmax ops, masked with NEG, on rows [r0 - halo_post, r0 +
  block_q) and columns [c0 - halo_cols_post, c0 + block_k + halo_cols_post).

  Returns (tiles, valid mask, segment ids of the tile rows or None, of its columns or None).
  """
  hr_pre, hr_post = plan.halo_rows_pre, plan.halo_rows_post
  hc_pre, hc_post = plan.halo_cols_pre, plan.halo_cols_post
  row_w0 = i * plan.block_q - hr_pre - hr_post  # absolute row of window row 0
  col_w0 = j * plan.block_k - hc_pre - hc_post
  rows_in, cols_in = plan.q_rows, plan.k_cols
  rows_out = rows_in - hr_pre
  cols_out = plan.k_cols_nominal - 2 * hc_pre
  seg_r = seg_c = None
  if plan.segments:
    seg_r = refs["segq"][:, :1]   # [rows_in, 1]
    seg_c = refs["segk"][:1, :]   # [1, cols_in]

  q, k = refs["q"], refs["k"]
  scale = math.sqrt(plan.head_dim)
  s = [_dot(q[h], k[h], ((1,), (1,))) / scale for h in range(plan.heads_per_program)]
  if plan.has_pre:
    ok = _valid(plan, row_w0, rows_in, col_w0, cols_in, seg_r, seg_c)
    s = [jnp.where(ok, x, 0.0) for x in s]                     # Mask_0
  if plan.c_pre is not None:
    c_q, c_k = plan.c_pre
    s = _conv(s, refs["w_pre"], head0, c_q, c_k, rows_out, cols_out, seg_r)
  else:
    s = [x[:, :cols_out] for x in s]
  if plan.c_h_pre is not None:
    s = _mix(s, refs["mix_pre"], head0, plan.c_h_pre)
  seg_r = None if seg_r is None else seg_r[hr_pre:]
  seg_c = None if seg_c is None else seg_c[:, hc_pre:hc_pre + cols_out]
  ok = _valid(plan, row_w0 + hr_pre, rows_out, col_w0 + hc_pre, cols_out, seg_r, seg_c)
  return [jnp.where(ok, x, NEG) for x in s], ok, seg_r, seg_c


def _should_run(plan, i, j):
  """Key block j has a key at or before the last row of query block i."""
  return j * plan.block_k <= (i + 1) * plan.block_q - 1


# ---------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------


def _lse_kernel(plan, names, *refs):
  """Pass 1: log-sum-exp of every row of S over all keys (rows with the post-conv halo)."""
  refs = dict(zip(names, refs))
  m_ref, l_ref = refs["m"], refs["l"]
  g, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  head0 = g * plan.heads_per_program

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when(_should_run(plan, i, j))
  def _():
    s, _, _, _ = _pre_logits(plan, refs, head0, i, j)
    rows, cols = s[0].shape
    c = j * plan.block_k - plan.halo_cols_post + jax.lax.broadcasted_iota(
        jnp.int32, (rows, cols), 1)
    own = (c >= j * plan.block_k) & (c < (j + 1) * plan.block_k)  # each key counted once
    for h, x in enumerate(s):
      x = jnp.where(own, x, NEG)
      m_prev, l_prev = m_ref[h][:, :1], l_ref[h][:, :1]
      m_new = jnp.maximum(m_prev, x.max(axis=1, keepdims=True))
      l_new = l_prev * jnp.exp(m_prev - m_new) + jnp.exp(x - m_new).sum(axis=1, keepdims=True)
      m_ref[h] = jnp.broadcast_to(m_new, m_ref.shape[1:])
      l_ref[h] = jnp.broadcast_to(l_new, l_ref.shape[1:])

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    refs["lse"][...] = m_ref[...] + jnp.log(l_ref[...])


def _post_tile(plan, refs, head0, i, j):
  """Pass 2 tile: exact weights from the stored lse, post conv / mask / mix -> [block_q,
  block_k] per head."""
  s, ok, seg_r, seg_c = _pre_logits(plan, refs, head0, i, j)
  lse = refs["lse"]
  a = [jnp.where(ok, jnp.exp(x - lse[h][:, :1]), 0.0) for h, x in enumerate(s)]
  bq, bk = plan.block_q, plan.block_k
  if plan.c_post is not None:
    c_q, c_k = plan.c_post
    a = _conv(a, refs["w_post"], head0, c_q, c_k, bq, bk, seg_r)
    hr, hc = plan.halo_rows_post, plan.halo_cols_post
    seg_r = None if seg_r is None else seg_r[hr:]
    seg_c = None if seg_c is None else seg_c[:, hc:hc + bk]
  ok = _valid(plan, i * bq, bq, j * bk, bk, seg_r, seg_c)
  a = [jnp.where(ok, x, 0.0) for x in a]                          # Mask_0
  if plan.c_h_post is not None:
    a = _mix(a, refs["mix_post"], head0, plan.c_h_post)
  return a


def _output_kernel(plan, names, *refs):
  """Pass 2 (with post ops) or the single online-softmax pass (without): A V."""
  refs = dict(zip(names, refs))
  acc_ref, v_ref = refs["acc"], refs["v"]
  g, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  head0 = g * plan.heads_per_program

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    if not plan.has_post:
      refs["m"][...] = jnp.full(refs["m"].shape, NEG, jnp.float32)
      refs["l"][...] = jnp.zeros(refs["l"].shape, jnp.float32)

  @pl.when(_should_run(plan, i, j))
  def _():
    if plan.has_post:
      for h, p in enumerate(_post_tile(plan, refs, head0, i, j)):
        acc_ref[h] = acc_ref[h] + _dot(p.astype(v_ref.dtype), v_ref[h], ((1,), (0,)))
      return
    m_ref, l_ref = refs["m"], refs["l"]
    s, _, _, _ = _pre_logits(plan, refs, head0, i, j)
    for h, x in enumerate(s):
      m_prev, l_prev = m_ref[h][:, :1], l_ref[h][:, :1]
      m_new = jnp.maximum(m_prev, x.max(axis=1, keepdims=True))
      alpha = jnp.exp(m_prev - m_new)
      p = jnp.exp(x - m_new)
      l_ref[h] = jnp.broadcast_to(l_prev * alpha + p.sum(axis=1, keepdims=True),
                                  l_ref.shape[1:])
      m_ref[h] = jnp.broadcast_to(m_new, m_ref.shape[1:])
      acc_ref[h] = acc_ref[h] * alpha + _dot(p.astype(v_ref.dtype), v_ref[h], ((1,), (0,)))

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    acc = acc_ref[...]
    if not plan.has_post:
      acc = acc / refs["l"][...][:, :, :1]
    refs["out"][...] = acc.astype(refs["out"].dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers.
# ---------------------------------------------------------------------------------------------


def _last_needed_block(plan, i):
  return ((i + 1) * plan.block_q - 1) // plan.block_k


def _common_specs(plan, segs, weights):
  """In-specs and names for q / k windows, segment windows and the SMEM weights."""
  hp, sq = plan.heads_per_program, pl.squeezed
  kj = lambda i, j: jnp.minimum(j, _last_needed_block(plan, i))  # skipped blocks: no new copy
  specs = [
      pl.BlockSpec((sq, hp, sq, plan.q_rows, plan.head_dim), lambda b, g, i, j: (b, g, i, 0, 0)),
      pl.BlockSpec((sq, hp, sq, plan.k_cols, plan.head_dim),
                   lambda b, g, i, j: (b, g, kj(i, j), 0, 0)),
  ]
  names = ["q", "k"]
  if segs:
    specs += [pl.BlockSpec((sq, sq, plan.q_rows, LANES), lambda b, g, i, j: (b, i, 0, 0)),
              pl.BlockSpec((sq, sq, SUBLANES, plan.k_cols),
                           lambda b, g, i, j: (b, kj(i, j), 0, 0))]
    names += ["segq", "segk"]
  present = [n for n, on in (("w_pre", plan.c_pre), ("w_post", plan.c_post),
                             ("mix_pre", plan.c_h_pre), ("mix_post", plan.c_h_post)) if on]
  assert len(present) == len(weights)
  specs += [pl.BlockSpec(memory_space=pltpu.SMEM) for _ in weights]
  names += present
  return specs, names, kj


def _grid(plan):
  return (plan.batch, plan.heads // plan.heads_per_program, plan.n_q, plan.n_k)


_PARAMS = dict(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def lse_call(plan, qw, kw, segs, weights, *, interpret: bool):
  """Pass 1 -> [B, H, n_q, block_q + halo_rows_post, LANES] float32 (lane-broadcast)."""
  hp, sq, rows = plan.heads_per_program, pl.squeezed, plan.block_q + plan.halo_rows_post
  specs, names, _ = _common_specs(plan, segs, weights)
  lse_shape = (plan.batch, plan.heads, plan.n_q, rows, LANES)
  return pl.pallas_call(
      functools.partial(_lse_kernel, plan, names + ["lse", "m", "l"]),
      grid=_grid(plan),
      in_specs=specs,
      out_specs=pl.BlockSpec((sq, hp, sq, rows, LANES), lambda b, g, i, j: (b, g, i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(lse_shape, jnp.float32),
      scratch_shapes=[pltpu.VMEM((hp, rows, LANES), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(**_PARAMS),
      interpret=interpret,
  )(qw, kw, *segs, *weights)


def output_call(plan, qw, kw, vb, segs, weights, lse, *, out_dtype, interpret: bool):
  """Pass 2 / the online pass -> [B, H, n_q * block_q, D] in out_dtype."""
  hp, sq = plan.heads_per_program, pl.squeezed
  specs, names, kj = _common_specs(plan, segs, weights)
  specs.append(pl.BlockSpec((sq, hp, plan.block_k, plan.head_dim),
                            lambda b, g, i, j: (b, g, kj(i, j), 0)))
  names.append("v")
  args = [qw, kw, *segs, *weights, vb]
  scratch = [pltpu.VMEM((hp, plan.block_q, plan.head_dim), jnp.float32)]
  scratch_names = ["acc"]
  if lse is not None:
    rows = plan.block_q + plan.halo_rows_post
    specs.append(pl.BlockSpec((sq, hp, sq, rows, LANES), lambda b, g, i, j: (b, g, i, 0, 0)))
    names.append("lse")
    args.append(lse)
  else:
    scratch += [pltpu.VMEM((hp, plan.block_q, LANES), jnp.float32)] * 2
    scratch_names += ["m", "l"]
  out_shape = (plan.batch, plan.heads, plan.n_q * plan.block_q, plan.head_dim)
  return pl.pallas_call(
      functools.partial(_output_kernel, plan, names + ["out"] + scratch_names),
      grid=_grid(plan),
      in_specs=specs,
      out_specs=pl.BlockSpec((sq, hp, plan.block_q, plan.head_dim),
                             lambda b, g, i, j: (b, g, i, 0)),
      out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(**_PARAMS),
      interpret=interpret,
  )(*args)
