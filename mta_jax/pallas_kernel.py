"""The Pallas kernels of the fused MTA forward (tiling: `ops_pallas.py`; backward kernels:
`pallas_backward.py`).

One program = (batch row b, head group g, query block i, key block j); j is the innermost,
sequential grid axis. A program reads a query window (block_q rows plus the conv row halos
above), a key window (block_k columns plus the conv column halos on both sides), the value
block, segment-id windows and the conv / mixing weights (scalars in SMEM), and computes on it
exactly the op of docs/MTA.md restricted to its tile (the order of the stages is that of ops.py):

    S = QK^T / sqrt(d) -> Mask_0 -> pre conv -> pre mix -> Mask_-inf    (`_for_each_logits`)
    A = softmax(S)     (online over key blocks, or exp(S - lse) with lse from pass 1)
    A -> post conv -> Mask_0 -> post mix -> accumulate A V

Everything is written on 2-D [rows, columns] tiles, one head at a time: a loop over the heads
of the program (`head_loop`; unrolling them made Mosaic keep every head's tiles live in VMEM),
static loops over conv taps (c_q * c_k scalar-times-shifted-tile multiply-adds), head mixing
from a VMEM scratch holding the group's tiles (c_h scalar-times-tile multiply-adds per head).
Per-head 2-D matmuls and elementwise ops are what Mosaic lowers most reliably.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES, SUBLANES = 128, 8
NEG = -1e30  # finite "-inf" for masked logits: exp(NEG - m) is exactly 0 for every real m


def dot(a, b, contract):
  # Explicit DEFAULT for bf16: a global "highest" matmul precision would ask Mosaic for an fp32
  # contraction of bf16 operands, which it rejects.
  prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32,
                             precision=prec)


def valid(plan, row0, rows, col0, cols, seg_rows, seg_cols):
  """[rows, cols] bool: absolute query row0 + r may attend key col0 + c (causal, same doc)."""
  r = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  c = col0 + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  ok = (c <= r) & (c >= 0) & (r >= 0) & (c < plan.length)
  if seg_rows is not None:
    ok = ok & (seg_rows == seg_cols)
  return ok


def conv_one(x, w_ref, head, c_q, c_k, out_rows, out_cols, seg_rows):
  """Depthwise key-query conv of one head's tile (a cross-correlation, docs/MTA.md).

  x: [out_rows + c_q - 1, >= out_cols + c_k - 1] whose (0, 0) is the tap [0, 0] of output
  (0, 0); w_ref: the flat [heads * c_q * c_k] kernel in SMEM; head: the global head index
  (may be traced). seg_rows: None or the [out_rows + c_q - 1, 1] segment ids of the input
  rows: tap row a of output row t then reads row t + a only within the same document.
  """
  out = None
  for a in range(c_q):
    term = None
    for c in range(c_k):
      w = w_ref[(head * c_q + a) * c_k + c]
      t = w * x[a:a + out_rows, c:c + out_cols]
      term = t if term is None else term + t
    if seg_rows is not None and a != c_q - 1:
      same = seg_rows[a:a + out_rows] == seg_rows[c_q - 1:c_q - 1 + out_rows]
      term = jnp.where(same, term, 0.0)
    out = term if out is None else out + term
  return out


def head_loop(n, body):
  """`body(h)` for h in [0, n): a loop, not an unrolled sequence (one head's tiles live at a
  time, which keeps Mosaic's VMEM bounded for any number of heads per program)."""
  if n == 1:
    body(0)
    return
  def step(h, carry):
    body(h)
    return carry
  jax.lax.fori_loop(0, n, step, 0)


def mixed(src_ref, w_ref, head0, o, c_h):
  """Head mixing (Eq. 7) for local output head o: sum_i W[group, o', i] * src_ref[base + i],
  with the group's tiles read from a VMEM scratch (one input tile live at a time)."""
  glob = head0 + o
  group, o_in = glob // c_h, glob % c_h
  base = o - o_in
  row = (group * c_h + o_in) * c_h
  def step(i, acc):
    return acc + w_ref[row + i] * src_ref[base + i]
  return jax.lax.fori_loop(1, c_h, step, w_ref[row] * src_ref[base])


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """The static tiling of one call, shared by the forward and backward plans
  (ops_pallas.Plan, pallas_backward.BwdPlan; hashable: it parameterises the kernels), and what
  both derive from it: the convs' halos, which stages are on, the grid's tile counts."""
  batch: int
  length: int
  heads: int
  head_dim: int
  heads_per_program: int
  block_q: int
  block_k: int
  c_pre: tuple[int, int] | None       # (c_q, c_k) of the pre-softmax conv
  c_post: tuple[int, int] | None
  c_h_pre: int | None                 # head-mixing group sizes
  c_h_post: int | None
  segments: bool
  lane_align: int                     # pad key windows to a multiple of this (TPU: 128)

  @property
  def halo_rows_pre(self) -> int:   # c_q - 1 logit rows above
    return 0 if self.c_pre is None else self.c_pre[0] - 1

  @property
  def halo_cols_pre(self) -> int:   # c_k // 2 columns either side
    return 0 if self.c_pre is None else self.c_pre[1] // 2

  @property
  def halo_rows_post(self) -> int:
    return 0 if self.c_post is None else self.c_post[0] - 1

  @property
  def halo_cols_post(self) -> int:
    return 0 if self.c_post is None else self.c_post[1] // 2

  @property
  def has_pre(self) -> bool:
    return self.c_pre is not None or self.c_h_pre is not None

  @property
  def has_post(self) -> bool:
    return self.c_post is not None or self.c_h_post is not None

  def align(self, n: int) -> int:
    """n rounded up to the lane alignment (key windows; TPU: 128, interpret mode: 1)."""
    return -(-n // self.lane_align) * self.lane_align

  @property
  def conv_pre(self) -> int:        # MACs per element of each stage (0 when off)
    return math.prod(self.c_pre) if self.c_pre else 0

  @property
  def conv_post(self) -> int:
    return math.prod(self.c_post) if self.c_post else 0

  @property
  def mix_pre(self) -> int:
    return self.c_h_pre or 0

  @property
  def mix_post(self) -> int:
    return self.c_h_post or 0

  @property
  def executed_tiles(self) -> int:
    """(query block, key block) tiles a kernel runs, per batch row and head: key blocks
    entirely in the future of a query block are skipped."""
    last = lambda i: ((i + 1) * self.block_q - 1) // self.block_k
    return sum(min(self.n_k, last(i) + 1) for i in range(self.n_q))

  def cost(self, tile_macs: int, tile_exps: int, args, out_shapes) -> pl.CostEstimate:
    """XLA's cost estimate of a kernel doing tile_macs multiply-adds and tile_exps
    exponentials per executed tile and head (so its scheduler and cost analysis see the
    kernel's work); bytes: every input and output once."""
    n = self.executed_tiles * self.batch * self.heads
    nbytes = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return pl.CostEstimate(flops=2 * tile_macs * n, transcendentals=tile_exps * n,
                           bytes_accessed=sum(nbytes(x) for x in (*args, *out_shapes)))

  @property
  def n_q(self) -> int:
    return -(-self.length // self.block_q)

  @property
  def n_k(self) -> int:
    return -(-self.length // self.block_k)


class _Tile:
  """Masks and segment ids of one (query block i, key block j) tile, shared by all heads.

  Rows [r0 - halo_rows_post, r0 + block_q), columns [c0 - halo_cols_post, c0 + block_k +
  halo_cols_post) are the "out" tile of the pre-softmax stage (S after the pre ops).
  """

  def __init__(self, plan, refs, i, j):
    hr_pre, hr_post = plan.halo_rows_pre, plan.halo_rows_post
    hc_pre, hc_post = plan.halo_cols_pre, plan.halo_cols_post
    self.row_w0 = i * plan.block_q - hr_pre - hr_post  # absolute row of window row 0
    self.col_w0 = j * plan.block_k - hc_pre - hc_post
    self.rows_out = plan.q_rows - hr_pre
    self.cols_out = plan.k_cols_nominal - 2 * hc_pre
    seg_r = seg_c = None
    if plan.segments:
      seg_r = refs["segq"][:, :1]   # [rows_in, 1]
      seg_c = refs["segk"][:1, :]   # [1, cols_in]
    self.seg_in = seg_r
    self.ok_in = (valid(plan, self.row_w0, plan.q_rows, self.col_w0, plan.k_cols, seg_r, seg_c)
                  if plan.has_pre else None)
    self.seg_r = None if seg_r is None else seg_r[hr_pre:]
    self.seg_c = None if seg_c is None else seg_c[:, hc_pre:hc_pre + self.cols_out]
    self.ok = valid(plan, self.row_w0 + hr_pre, self.rows_out, self.col_w0 + hc_pre,
                     self.cols_out, self.seg_r, self.seg_c)


def _pre_head(plan, refs, tile, head0, h):
  """One head's S after Mask_0 and the pre conv (before mixing): [rows_out, cols_out]."""
  s = dot(refs["q"][h], refs["k"][h], ((1,), (1,))) / math.sqrt(plan.head_dim)
  if plan.has_pre:
    s = jnp.where(tile.ok_in, s, 0.0)                            # Mask_0
  if plan.c_pre is not None:
    c_q, c_k = plan.c_pre
    return conv_one(s, refs["w_pre"], head0 + h, c_q, c_k, tile.rows_out, tile.cols_out,
                     tile.seg_in)
  return s[plan.halo_rows_pre:, :tile.cols_out]


def _for_each_logits(plan, refs, tile, head0, consume):
  """consume(o, S_o) for every local head o, S_o the final pre-softmax logits (masked with
  NEG). With pre mixing the unmixed tiles go through the "spre" VMEM scratch first."""
  if plan.c_h_pre is None:
    head_loop(plan.heads_per_program,
               lambda h: consume(h, jnp.where(tile.ok, _pre_head(plan, refs, tile, head0, h),
                                              NEG)))
    return
  spre = refs["spre"]
  def store(h):
    spre[h] = _pre_head(plan, refs, tile, head0, h)
  head_loop(plan.heads_per_program, store)
  head_loop(plan.heads_per_program, lambda o: consume(
      o, jnp.where(tile.ok, mixed(spre, refs["mix_pre"], head0, o, plan.c_h_pre), NEG)))


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
    tile = _Tile(plan, refs, i, j)
    c = j * plan.block_k - plan.halo_cols_post + jax.lax.broadcasted_iota(
        jnp.int32, (tile.rows_out, tile.cols_out), 1)
    own = (c >= j * plan.block_k) & (c < (j + 1) * plan.block_k)  # each key counted once

    def consume(h, x):
      x = jnp.where(own, x, NEG)
      m_prev, l_prev = m_ref[h][:, :1], l_ref[h][:, :1]
      m_new = jnp.maximum(m_prev, x.max(axis=1, keepdims=True))
      l_new = l_prev * jnp.exp(m_prev - m_new) + jnp.exp(x - m_new).sum(axis=1, keepdims=True)
      m_ref[h] = jnp.broadcast_to(m_new, m_ref.shape[1:])
      l_ref[h] = jnp.broadcast_to(l_new, l_ref.shape[1:])

    _for_each_logits(plan, refs, tile, head0, consume)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    refs["lse"][...] = m_ref[...] + jnp.log(l_ref[...])


def _post_ok(plan, tile, i, j):
  """Validity of the [block_q, block_k] output tile (after the post conv's halo is consumed)."""
  seg_r, seg_c = tile.seg_r, tile.seg_c
  if plan.c_post is not None and seg_r is not None:
    hr, hc = plan.halo_rows_post, plan.halo_cols_post
    seg_r, seg_c = seg_r[hr:], seg_c[:, hc:hc + plan.block_k]
  bq, bk = plan.block_q, plan.block_k
  return valid(plan, i * bq, bq, j * bk, bk, seg_r, seg_c)


def _post_pass(plan, refs, tile, head0, i, j):
  """Pass 2 tile: exact weights from the stored lse, post conv / Mask_0 / post mix, A V."""
  lse, acc_ref, v_ref = refs["lse"], refs["acc"], refs["v"]
  ok = _post_ok(plan, tile, i, j)

  def add_av(o, a):
    acc_ref[o] = acc_ref[o] + dot(a.astype(v_ref.dtype), v_ref[o], ((1,), (0,)))

  def consume(o, x):
    a = jnp.where(tile.ok, jnp.exp(x - lse[o][:, :1]), 0.0)
    if plan.c_post is not None:
      c_q, c_k = plan.c_post
      a = conv_one(a, refs["w_post"], head0 + o, c_q, c_k, plan.block_q, plan.block_k,
                    tile.seg_r)
    a = jnp.where(ok, a, 0.0)                                      # Mask_0
    if plan.c_h_post is None:
      add_av(o, a)
    else:
      refs["apost"][o] = a

  _for_each_logits(plan, refs, tile, head0, consume)
  if plan.c_h_post is not None:
    head_loop(plan.heads_per_program, lambda o: add_av(
        o, mixed(refs["apost"], refs["mix_post"], head0, o, plan.c_h_post)))


def _online_pass(plan, refs, tile, head0):
  """The single pass without post ops: online softmax (flash attention) per head."""
  m_ref, l_ref, acc_ref, v_ref = refs["m"], refs["l"], refs["acc"], refs["v"]

  def consume(h, x):
    m_prev, l_prev = m_ref[h][:, :1], l_ref[h][:, :1]
    m_new = jnp.maximum(m_prev, x.max(axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(x - m_new)
    l_ref[h] = jnp.broadcast_to(l_prev * alpha + p.sum(axis=1, keepdims=True), l_ref.shape[1:])
    m_ref[h] = jnp.broadcast_to(m_new, m_ref.shape[1:])
    acc_ref[h] = acc_ref[h] * alpha + dot(p.astype(v_ref.dtype), v_ref[h], ((1,), (0,)))

  _for_each_logits(plan, refs, tile, head0, consume)


def _output_kernel(plan, names, *refs):
  """Pass 2 (with post ops) or the single online-softmax pass (without): A V."""
  refs = dict(zip(names, refs))
  acc_ref = refs["acc"]
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
    tile = _Tile(plan, refs, i, j)
    if plan.has_post:
      _post_pass(plan, refs, tile, head0, i, j)
    else:
      _online_pass(plan, refs, tile, head0)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    acc = acc_ref[...]
    if not plan.has_post:
      acc = acc / refs["l"][...][:, :, :1]
      refs["lse_out"][...] = refs["m"][...] + jnp.log(refs["l"][...])
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

# Mosaic's default scoped-VMEM limit, and what a call asks for when its estimate exceeds it
# (below the VMEM of a v5e and of a v5p core).
DEFAULT_SCOPED_VMEM = 16 * 2**20
LARGE_SCOPED_VMEM = 64 * 2**20


def _tile_bytes(shape, dtype) -> int:
  """VMEM bytes of a block: the last two dimensions padded to the (8, 128) tiling."""
  shape = tuple(d for d in shape if isinstance(d, int))
  *lead, rows, cols = (1,) * max(0, 2 - len(shape)) + shape
  return (math.prod(lead) * (-(-rows // SUBLANES) * SUBLANES) * (-(-cols // LANES) * LANES)
          * jnp.dtype(dtype).itemsize)


def compiler_params(in_specs, args, out_specs, out_shapes, scratch, work_tile, taps):
  """CompilerParams asking for LARGE_SCOPED_VMEM when an estimate exceeds Mosaic's default.

  The estimate: double-buffered in / out blocks, the scratch, and float32 working tiles of
  `work_tile` = (rows, cols) for Mosaic's temporaries: 16, plus two per conv tap (each
  shifted tap slice of the unrolled conv is a relayout copy). It is a trigger, not a bound
  (the online pass of the 880M layer without post ops needed 36 MiB where the estimate
  without the tap term said 21), so past the default the call asks for the large limit.
  """
  est = sum(2 * _tile_bytes(sp.block_shape, a.dtype) for sp, a in zip(in_specs, args)
            if sp.block_shape is not None)
  est += sum(2 * _tile_bytes(sp.block_shape, o.dtype) for sp, o in zip(out_specs, out_shapes))
  est += sum(_tile_bytes(sc.shape, sc.dtype) for sc in scratch)
  est += (16 + 2 * taps) * _tile_bytes(work_tile, jnp.float32)
  limit = LARGE_SCOPED_VMEM if est > DEFAULT_SCOPED_VMEM else None
  return pltpu.CompilerParams(**_PARAMS, vmem_limit_bytes=limit)


def _taps(plan) -> int:
  return sum(math.prod(c) for c in (plan.c_pre, plan.c_post) if c is not None)


def tile_work(plan, kernel: str) -> tuple[int, int]:
  """(multiply-adds, exponentials) of one forward tile and head: the logits on the windows,
  the pre conv / mixing and softmax on the "out" rows and columns, and for "output" the post
  conv / mixing and A V on the block. kernel: "lse" or "output"."""
  rows = plan.q_rows - plan.halo_rows_pre
  cols = plan.k_cols_nominal - 2 * plan.halo_cols_pre
  macs = plan.q_rows * plan.k_cols_nominal * plan.head_dim
  macs += rows * cols * (plan.conv_pre + plan.mix_pre)
  if kernel == "output":
    macs += plan.block_q * plan.block_k * (plan.conv_post + plan.mix_post + plan.head_dim)
  return macs, rows * cols


def _mix_scratch(plan, with_post: bool):
  """VMEM scratch (shapes, names) holding a head group's tiles for head mixing."""
  hp, shapes, names = plan.heads_per_program, [], []
  if plan.c_h_pre is not None:
    rows = plan.q_rows - plan.halo_rows_pre
    cols = plan.k_cols_nominal - 2 * plan.halo_cols_pre
    shapes.append(pltpu.VMEM((hp, rows, cols), jnp.float32))
    names.append("spre")
  if with_post and plan.c_h_post is not None:
    shapes.append(pltpu.VMEM((hp, plan.block_q, plan.block_k), jnp.float32))
    names.append("apost")
  return shapes, names


def lse_call(plan, qw, kw, segs, weights, *, interpret: bool):
  """Pass 1 -> [B, H, n_q, block_q + halo_rows_post, LANES] float32 (lane-broadcast)."""
  hp, sq, rows = plan.heads_per_program, pl.squeezed, plan.block_q + plan.halo_rows_post
  specs, names, _ = _common_specs(plan, segs, weights)
  lse_shape = (plan.batch, plan.heads, plan.n_q, rows, LANES)
  mix_shapes, mix_names = _mix_scratch(plan, with_post=False)
  args = (qw, kw, *segs, *weights)
  out_spec = pl.BlockSpec((sq, hp, sq, rows, LANES), lambda b, g, i, j: (b, g, i, 0, 0))
  out_shape = jax.ShapeDtypeStruct(lse_shape, jnp.float32)
  scratch = [pltpu.VMEM((hp, rows, LANES), jnp.float32)] * 2 + mix_shapes
  return pl.pallas_call(
      functools.partial(_lse_kernel, plan, names + ["lse", "m", "l"] + mix_names),
      name="mta_lse",
      grid=_grid(plan),
      in_specs=specs,
      out_specs=out_spec,
      out_shape=out_shape,
      scratch_shapes=scratch,
      compiler_params=compiler_params(specs, args, [out_spec], [out_shape], scratch,
                                      (plan.q_rows, plan.k_cols), _taps(plan)),
      cost_estimate=plan.cost(*tile_work(plan, "lse"), args, [out_shape]),
      interpret=interpret,
  )(*args)


def output_call(plan, qw, kw, vb, segs, weights, lse, *, out_dtype, interpret: bool):
  """Pass 2 / the online pass -> (out [B, H, n_q * block_q, D] in out_dtype, and for the
  online pass its log-sum-exp [B, H, n_q, block_q, LANES] (lane-broadcast), else None)."""
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
  mix_shapes, mix_names = _mix_scratch(plan, with_post=True)
  scratch += mix_shapes
  scratch_names += mix_names
  out_shape = (plan.batch, plan.heads, plan.n_q * plan.block_q, plan.head_dim)
  out_specs = [pl.BlockSpec((sq, hp, plan.block_q, plan.head_dim),
                            lambda b, g, i, j: (b, g, i, 0))]
  out_shapes = [jax.ShapeDtypeStruct(out_shape, out_dtype)]
  out_names = ["out"]
  if lse is None:  # the online pass also returns its log-sum-exp (for the backward kernels)
    out_specs.append(pl.BlockSpec((sq, hp, sq, plan.block_q, LANES),
                                  lambda b, g, i, j: (b, g, i, 0, 0)))
    out_shapes.append(jax.ShapeDtypeStruct(
        (plan.batch, plan.heads, plan.n_q, plan.block_q, LANES), jnp.float32))
    out_names.append("lse_out")
  outs = pl.pallas_call(
      functools.partial(_output_kernel, plan, names + out_names + scratch_names),
      name="mta_output",
      grid=_grid(plan),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shapes,
      scratch_shapes=scratch,
      compiler_params=compiler_params(specs, args, out_specs, out_shapes, scratch,
                                      (plan.q_rows, plan.k_cols), _taps(plan)),
      cost_estimate=plan.cost(*tile_work(plan, "output"), args, out_shapes),
      interpret=interpret,
  )(*args)
  return outs[0], (outs[1] if lse is None else None)
