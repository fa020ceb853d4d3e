"""Memory-efficient exact Multi-Token Attention: query blocks, causal key skipping, remat.

`multi_token_attention(..., implementation="chunked")` computes exactly what the "xla"
reference in `ops.py` computes (docs/MTA.md Sec. 2-5), without ever holding a [T, T] tensor:

  * Queries are processed in blocks of `block` rows. A block also recomputes the rows its
    convolutions read from above it ("halo"): c_q - 1 logit rows for the pre-softmax conv and
    c_q' - 1 weight rows for the post-softmax conv, so halo = (c_q - 1) + (c_q' - 1).
  * A block only looks at keys [0, block_end): every later key is in the future of every row of
    the block, so its logit is masked (to 0 before the pre conv, to -inf before softmax) and
    contributes nothing; the conv's zero padding on the right is then exact. Blocks are grouped
    in at most `bands` bands (one `lax.scan` each, keys up to the band's end), so the work is
    ~ T^2 / 2 plus at most one band of future keys, not T^2.
  * Every block body runs under `jax.checkpoint`: the backward pass recomputes the block's
    logits instead of storing them, so live memory is O(block x T), linear in T.

The key-query convolution is a shift-and-add (c_q * c_k fused multiply-adds over shifted views
of the block's logits) with a hand-written VJP; the kernel gradient is one variadic reduction
per kernel row (its c_k sums in a single pass). On CPU, forward + backward is 5-7x faster than
`conv_general_dilated` and than autodiff of the shift-and-add (whose kernel gradient becomes
c_q * c_k separate passes over the slab). Head mixing is a plain 2-D matmul per (batch, group)
on CPU and GPU. Lowered for TPU, head mixing is c_h elementwise float32 multiply-adds per head
and the conv loops over its kernel rows (`head_mix_elementwise`, `shift_conv_looped`): the TPU
compiler spent minutes on the HIGHEST-precision matmul with a contraction of 16 and kept the
unrolled conv's shifted slabs as buffers (docs/SCALING.md).
Measurements of the alternatives (including the algebraic "wider attention" rewrite) are in
docs/BENCHMARKS.md.

Names in `implementations.IMPLEMENTATIONS`:
  "chunked"          block = 256 rows, at most 4 bands (measured on CPU: blocks of 128-512
                     cost about the same; 4 bands compile ~2x faster than 8 at equal run time)
  "chunked_convxla"  the same blocking, but the conv is `conv_general_dilated` (for comparison;
                     this is what a backend with a fast depthwise conv would pick)
Use `make_chunked(block=..., conv=..., bands=...)` for other settings.

Dropout (training only) is supported: an independent Bernoulli(1 - rate) keep-mask per weight,
drawn per block from `fold_in(dropout_rng, block_index)` (the same distribution as the
reference, not the same random numbers).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mta_jax import ops

Array = jax.Array

DEFAULT_BLOCK = 256
DEFAULT_BANDS = 4
_NEG = -1e30  # finite "-inf": masked logits; exp underflows to exactly 0 for every valid row


# ---------------------------------------------------------------------------------------------
# Key-query convolution on a block of rows: shift-and-add with a hand-written VJP.
# ---------------------------------------------------------------------------------------------


def shift_conv_autodiff(x, kernel, rmask):
  """out[b,h,i,j] = sum_{a,c} kernel[h,a,c] * m[b,s_a,i] * x[b,h,i+a,j+c-half].

  x: [B, H, R + c_q - 1, C] (the first c_q - 1 rows are the halo), kernel: [H, c_q, c_k],
  rmask: None or [B, c_q, R] row masks indexed by s = c_q - 1 - a (ops.row_masks layout).
  Returns [B, H, R, C]. Columns outside [0, C) read zero.
  """
  _, _, rows_in, cols = x.shape
  _, c_q, c_k = kernel.shape
  half = (c_k - 1) // 2
  rows = rows_in - (c_q - 1)
  xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (half, half))) if half else x
  out = None
  for a in range(c_q):
    term = None
    for c in range(c_k):
      t = kernel[None, :, a, c, None, None] * xp[:, :, a:a + rows, c:c + cols]
      term = t if term is None else term + t
    if rmask is not None:
      term = term * rmask[:, None, c_q - 1 - a, :, None]
    out = term if out is None else out + term
  return out


@jax.custom_vjp
def shift_conv(x: Array, kernel: Array, rmask: Array | None) -> Array:
  """Depthwise key-query conv of a row block (see `shift_conv_autodiff`), fast VJP."""
  return shift_conv_autodiff(x, kernel, rmask)


def _shift_conv_fwd(x, kernel, rmask):
  return shift_conv_autodiff(x, kernel, rmask), (x, kernel, rmask)


def _shift_conv_bwd(res, g):
  x, kernel, rmask = res
  batch, heads, rows_in, cols = x.shape
  _, c_q, c_k = kernel.shape
  half = (c_k - 1) // 2
  rows = rows_in - (c_q - 1)
  # Cotangent of row i for tap row a, masked: gm_a[i, j] = g[i, j] * m[s_a, i].
  if rmask is None:
    gms = [g] * c_q
  else:
    gms = [g * rmask[:, None, c_q - 1 - a, :, None] for a in range(c_q)]

  # dx[r, j] = sum_{a,c} w[a,c] gm_a[r - a, j - (c - half)]: the transposed shift-and-add.
  dx = None
  if rmask is None:
    gp = jnp.pad(g, ((0, 0), (0, 0), (c_q - 1, c_q - 1), (half, half)))
  for a in range(c_q):
    if rmask is not None:
      gp_a = jnp.pad(gms[a], ((0, 0), (0, 0), (a, c_q - 1 - a), (half, half)))
      r0 = 0
    else:
      gp_a, r0 = gp, c_q - 1 - a
    for c in range(c_k):
      t = kernel[None, :, a, c, None, None] * gp_a[:, :, r0:r0 + rows_in,
                                                    2 * half - c:2 * half - c + cols]
      dx = t if dx is None else dx + t

  # dw[h, a, c] = sum_{b,i,j} gm_a[i, j] x[i + a, j + c - half]: per tap row a, ONE variadic
  # reduction computes all c_k sums in a single pass over the slab, keeping (heads, rows) and
  # summing (batch, columns); rows are summed afterwards. (c_q * c_k separate reductions are
  # ~20x slower on CPU; a single 66-operand reduction ~1.5x slower than c_q of c_k operands.)
  xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (half, half))) if half else x
  sums = []
  for a in range(c_q):
    prods = tuple(gms[a] * xp[:, :, a:a + rows, c:c + cols] for c in range(c_k))
    zeros = tuple(jnp.zeros((), g.dtype) for _ in prods)
    sums += jax.lax.reduce(prods, zeros,
                           lambda xs, ys: tuple(u + w for u, w in zip(xs, ys)), (0, 3))
  dw = jnp.stack(sums, axis=-1).sum(axis=1).reshape(heads, c_q, c_k)
  del batch
  drmask = None if rmask is None else jnp.zeros_like(rmask)
  return dx, dw.astype(kernel.dtype), drmask


shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)


# The same conv with a loop over the c_q kernel rows (c_k taps unrolled in the body): the TPU
# path. Unrolled, the TPU compile keeps many of the c_q * c_k lane-shifted copies of the slab as
# buffers (the op's XLA temporaries were ~8x the looped version's) and takes ~1.7x longer
# (docs/SCALING.md). The same sums; dx adds them in another order.


def _row_taps(xp, a, kernel, rows: int, cols: int):
  """sum_c kernel[h, a, c] * xp[b, h, a + i, c + j] for kernel row `a` (a traced index)."""
  xa = jax.lax.dynamic_slice_in_dim(xp, a, rows, 2)
  w = jax.lax.dynamic_index_in_dim(kernel, a, 1, keepdims=False)  # [H, c_k]
  term = None
  for c in range(kernel.shape[2]):
    t = w[None, :, c, None, None] * xa[:, :, :, c:c + cols]
    term = t if term is None else term + t
  return term


def _row_mask(rmask, s):
  return jax.lax.dynamic_index_in_dim(rmask, s, 1, keepdims=False)[:, None, :, None]


def _shift_conv_looped_fwd_only(x, kernel, rmask):
  _, _, rows_in, cols = x.shape
  _, c_q, c_k = kernel.shape
  half = (c_k - 1) // 2
  rows = rows_in - (c_q - 1)
  xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (half, half))) if half else x

  def body(a, out):
    term = _row_taps(xp, a, kernel, rows, cols)
    return out + (term if rmask is None else term * _row_mask(rmask, c_q - 1 - a))

  return jax.lax.fori_loop(0, c_q, body, jnp.zeros(x.shape[:2] + (rows, cols), x.dtype))


@jax.custom_vjp
def shift_conv_looped(x: Array, kernel: Array, rmask: Array | None) -> Array:
  """`shift_conv` with a loop over kernel rows (the TPU path), hand-written VJP likewise."""
  return _shift_conv_looped_fwd_only(x, kernel, rmask)


def _shift_conv_looped_fwd(x, kernel, rmask):
  return _shift_conv_looped_fwd_only(x, kernel, rmask), (x, kernel, rmask)


def _shift_conv_looped_bwd(res, g):
  x, kernel, rmask = res
  _, _, rows_in, cols = x.shape
  _, c_q, c_k = kernel.shape
  half = (c_k - 1) // 2
  rows = rows_in - (c_q - 1)
  pad_cols = lambda y: jnp.pad(y, ((0, 0), (0, 0), (0, 0), (half, half))) if half else y
  xp = pad_cols(x)
  flipped = kernel[:, :, ::-1]  # dx reads the cotangent shifted the other way along columns

  def body(dx, a):
    gm = g if rmask is None else g * _row_mask(rmask, c_q - 1 - a)
    # dx[a + i, j] += sum_c w[a, c] gm[i, j - (c - half)]
    t = _row_taps(pad_cols(gm), 0, jax.lax.dynamic_slice_in_dim(flipped, a, 1, 1), rows, cols)
    dx = jax.lax.dynamic_update_slice_in_dim(
        dx, jax.lax.dynamic_slice_in_dim(dx, a, rows, 2) + t, a, 2)
    # dw[h, a, c] = sum_{b, i, j} gm[i, j] x[i + a, j + c - half]: one variadic reduction.
    xa = jax.lax.dynamic_slice_in_dim(xp, a, rows, 2)
    prods = tuple(gm * xa[:, :, :, c:c + cols] for c in range(c_k))
    zeros = tuple(jnp.zeros((), g.dtype) for _ in prods)
    sums = jax.lax.reduce(prods, zeros, lambda xs, ys: tuple(u + v for u, v in zip(xs, ys)),
                          (0, 3))
    return dx, jnp.stack(sums, axis=-1).sum(axis=1)  # [H, c_k]

  dx, dw = jax.lax.scan(body, jnp.zeros_like(x), jnp.arange(c_q))
  drmask = None if rmask is None else jnp.zeros_like(rmask)
  return dx, jnp.moveaxis(dw, 0, 1).astype(kernel.dtype), drmask


shift_conv_looped.defvjp(_shift_conv_looped_fwd, _shift_conv_looped_bwd)


def shift_conv_block(x: Array, kernel: Array, rmask: Array | None) -> Array:
  """conv="shift": `shift_conv_looped` when lowering for TPU, `shift_conv` elsewhere (faster on
  CPU: one fused pass over the slab)."""
  return jax.lax.platform_dependent(x, kernel, rmask, tpu=shift_conv_looped, default=shift_conv)


def xla_conv(x: Array, kernel: Array, rmask: Array | None) -> Array:
  """The same block conv with `conv_general_dilated` (ops.kq_conv_reference's primitive)."""
  heads = x.shape[1]
  _, c_q, c_k = kernel.shape
  half = (c_k - 1) // 2
  rows = x.shape[2] - (c_q - 1)
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=(1, 1),
      dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=heads,
      precision=jax.lax.Precision.HIGHEST)
  rhs = kernel.astype(x.dtype)[:, None]
  if rmask is None:
    return conv(x, rhs, padding=((0, 0), (half, half)))
  out = None
  for a in range(c_q):
    term = conv(x[:, :, a:a + rows], rhs[:, :, a:a + 1], padding=((0, 0), (half, half)))
    term = term * rmask[:, None, c_q - 1 - a, :, None]
    out = term if out is None else out + term
  return out


# "shift" looks shift_conv_block up at each call, so that tests can force the TPU path on CPU.
_CONVS = {"shift": lambda x, kernel, rmask: shift_conv_block(x, kernel, rmask), "xla": xla_conv}


def head_mix_2d(x_BxHxRxC: Array, w_GxCxC: Array) -> Array:
  """ops.head_mix as one [c_h, c_h] x [c_h, R*C] matmul per (batch, group).

  Same arithmetic as ops.head_mix; written so XLA emits a plain GEMM with the long axis
  minor (the 5-D einsum of ops.head_mix transposes the slab on CPU, ~3x slower).
  """
  b, h, r, c = x_BxHxRxC.shape
  groups, c_h, _ = w_GxCxC.shape
  x = x_BxHxRxC.reshape(b, groups, c_h, r * c)
  w = jnp.broadcast_to(w_GxCxC.astype(x.dtype), (b, groups, c_h, c_h))
  y = jax.lax.dot_general(w, x, (((3,), (2,)), ((0, 1), (0, 1))),
                          precision=jax.lax.Precision.HIGHEST)
  return y.reshape(b, h, r, c)


def _mix_heads_elementwise(x_BxGxCxRxK: Array, w_GxOxI: Array) -> Array:
  """y[b, g, o] = sum_i w[g, o, i] * x[b, g, i]: c_h multiply-adds of whole [R, K] slabs."""
  out = None
  for i in range(w_GxOxI.shape[-1]):
    t = w_GxOxI[None, :, :, i, None, None] * x_BxGxCxRxK[:, :, i:i + 1]
    out = t if out is None else out + t
  return out


@jax.custom_vjp
def head_mix_elementwise(x_BxHxRxC: Array, w_GxCxC: Array) -> Array:
  """ops.head_mix as c_h elementwise multiply-adds per output head, in x's dtype (float32 here).

  The TPU path of the chunked op: a float32 matmul at Precision.HIGHEST with a contraction of
  only c_h (head_mix_2d) is emitted by the TPU compiler as a multi-pass bf16 kernel whose
  compile dominated the op's (docs/SCALING.md); these multiply-adds are exact float32 without
  it. The VJP is written by hand (below) so that the
  weight gradient is one pass over the slab rather than c_h * c_h reductions.
  """
  b, h, r, c = x_BxHxRxC.shape
  groups, c_h, _ = w_GxCxC.shape
  y = _mix_heads_elementwise(x_BxHxRxC.reshape(b, groups, c_h, r, c),
                             w_GxCxC.astype(x_BxHxRxC.dtype))
  return y.reshape(b, h, r, c)


def _head_mix_elementwise_fwd(x, w):
  return head_mix_elementwise(x, w), (x, w)


def _head_mix_elementwise_bwd(res, g):
  x, w = res
  b, h, r, c = x.shape
  groups, c_h, _ = w.shape
  g5 = g.reshape(b, groups, c_h, r, c)
  # dx[b, g, i] = sum_o w[g, o, i] * dy[b, g, o]: the same multiply-adds with w transposed.
  dx = _mix_heads_elementwise(g5, jnp.swapaxes(w, 1, 2).astype(g.dtype)).reshape(x.shape)
  # dw[g, o, i] = sum_{b, r, k} dy[b, g, o] * x[b, g, i]: one variadic reduction over the
  # slab computes all c_h x c_h sums in one pass (a matmul over the slab at HIGHEST costs the
  # TPU compiler as much as the forward GEMM did).
  x5 = x.reshape(g5.shape)
  prods = tuple(g5 * x5[:, :, i:i + 1] for i in range(c_h))
  zeros = tuple(jnp.zeros((), g.dtype) for _ in prods)
  sums = jax.lax.reduce(prods, zeros, lambda xs, ys: tuple(u + v for u, v in zip(xs, ys)),
                        (0, 3, 4))
  return dx, jnp.stack(sums, axis=-1).astype(w.dtype)


head_mix_elementwise.defvjp(_head_mix_elementwise_fwd, _head_mix_elementwise_bwd)


def head_mix_block(x_BxHxRxC: Array, w_GxCxC: Array) -> Array:
  """The chunked op's head mixing: head_mix_elementwise when lowering for TPU, head_mix_2d
  (one GEMM, measured faster on CPU) elsewhere; chosen at lowering time, so an ahead-of-time
  compile for a TPU topology on a CPU host gets the TPU path."""
  return jax.lax.platform_dependent(x_BxHxRxC, w_GxCxC, tpu=head_mix_elementwise,
                                    default=head_mix_2d)


# ---------------------------------------------------------------------------------------------
# One query block.
# ---------------------------------------------------------------------------------------------


def _block_mask(row0, rows: int, cols: int, seg_rows, seg_cols):
  """[B or 1, 1, rows, cols] bool: absolute row row0 + t may attend column j (causal, same doc).

  Rows with a negative index (above the sequence) attend nothing.
  """
  r = row0 + jnp.arange(rows)[:, None]
  j = jnp.arange(cols)[None, :]
  mask = ((j <= r) & (r >= 0))[None, None]
  if seg_rows is not None:
    mask = mask & (seg_rows[:, None, :, None] == seg_cols[:, None, None, :])
  return mask


def _mta_block(q_blk, k_blk, v_blk, seg_rows, seg_cols, rm_pre, rm_post, kq_pre, kq_post,
               mix_pre, mix_post, rng, *, row0, halo_pre, halo_post, conv, dropout_rate,
               out_dtype):
  """docs/MTA.md Sec. 2 for query rows [row0 + halo, row0 + rows) against keys [0, cols).

  q_blk: [B, H, rows, D] (first halo_pre + halo_post rows are the halo), k_blk/v_blk:
  [B, H, cols, D], seg_rows: [B, rows] or None, seg_cols: [B, cols] or None.
  Returns [B, H, rows - halo, D] in out_dtype (accumulated in float32).
  """
  f32 = jnp.float32
  rows, cols = q_blk.shape[2], k_blk.shape[2]
  head_dim = q_blk.shape[-1]
  seg = lambda lo: None if seg_rows is None else seg_rows[:, lo:]

  s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, preferred_element_type=f32,
                 precision=jax.lax.Precision.HIGHEST)
  s = s / math.sqrt(head_dim)
  if kq_pre is not None or mix_pre is not None:
    s = jnp.where(_block_mask(row0, rows, cols, seg(0), seg_cols), s, 0.0)  # Mask_0
  if kq_pre is not None:
    s = conv(s, kq_pre.astype(f32), rm_pre)  # rows [row0 + halo_pre, row0 + rows)
  if mix_pre is not None:
    s = head_mix_block(s, mix_pre.astype(f32))

  lo = halo_pre
  mask = _block_mask(row0 + lo, rows - lo, cols, seg(lo), seg_cols)
  p = jax.nn.softmax(jnp.where(mask, s, _NEG), axis=-1)
  p = jnp.where(mask, p, 0.0)  # exact zeros (also for rows above the sequence)

  if kq_post is not None:
    p = conv(p, kq_post.astype(f32), rm_post)
    lo += halo_post
    mask = _block_mask(row0 + lo, rows - lo, cols, seg(lo), seg_cols)
  if kq_post is not None or mix_post is not None:
    p = jnp.where(mask, p, 0.0)  # Mask_0
  if mix_post is not None:
    p = head_mix_block(p, mix_post.astype(f32))
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, p.shape)
    p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=f32,
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# The implementation.
# ---------------------------------------------------------------------------------------------


def _padded(q, k, v, segment_ids, *, halo: int, padded: int, c_q, c_qp):
  """q, k, v as [B, H, T, D], queries with `halo` zero rows in front (rows above the sequence),
  everything padded at the end to `padded` rows (whole blocks); the segment ids of query rows
  and key columns and the conv row masks (c_q / c_qp None: that conv is off) padded alike."""
  length = q.shape[1]
  to_bhtd = lambda x: jnp.swapaxes(x, 1, 2)
  qt = jnp.pad(to_bhtd(q), ((0, 0), (0, 0), (halo, padded - length), (0, 0)))
  kt = jnp.pad(to_bhtd(k), ((0, 0), (0, 0), (0, padded - length), (0, 0)))
  vt = jnp.pad(to_bhtd(v), ((0, 0), (0, 0), (0, padded - length), (0, 0)))

  seg_q = seg_k = rm_pre = rm_post = None
  if segment_ids is not None:
    seg_k = jnp.pad(segment_ids, ((0, 0), (0, padded - length)), mode="edge")
    seg_q = jnp.pad(seg_k, ((0, 0), (halo, 0)), mode="edge")  # front rows are masked anyway
    pad_rm = lambda m: None if m is None else jnp.pad(  # None: a width-1 kernel
        m, ((0, 0), (0, 0), (halo, padded - length)))
    if c_q is not None:
      rm_pre = pad_rm(ops.row_masks(segment_ids, c_q))
    if c_qp is not None:
      rm_post = pad_rm(ops.row_masks(segment_ids, c_qp))
  return qt, kt, vt, seg_q, seg_k, rm_pre, rm_post


def _mta_chunked(q, k, v, *, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                 segment_ids, dropout_rate, dropout_rng, block=DEFAULT_BLOCK, conv="shift",
                 bands=DEFAULT_BANDS):
  batch, length, heads, _ = q.shape
  conv_fn = _CONVS[conv]
  c_q = kq_kernel_pre.shape[1] if kq_kernel_pre is not None else 1
  c_qp = kq_kernel_post.shape[1] if kq_kernel_post is not None else 1
  halo_pre, halo_post = c_q - 1, c_qp - 1
  halo = halo_pre + halo_post
  block = max(1, min(block, length))
  n_blocks = -(-length // block)
  padded = n_blocks * block

  qt, kt, vt, seg_q, seg_k, rm_pre_all, rm_post_all = _padded(
      q, k, v, segment_ids, halo=halo, padded=padded,
      c_q=c_q if kq_kernel_pre is not None else None,
      c_qp=c_qp if kq_kernel_post is not None else None)
  block_fn = jax.checkpoint(functools.partial(
      _mta_block, halo_pre=halo_pre, halo_post=halo_post, conv=conv_fn,
      dropout_rate=dropout_rate, out_dtype=jnp.float32), prevent_cse=False)
  dyn = lambda x, start, size, axis: (
      None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis))

  # Blocks are grouped into at most `bands` bands; a band is one lax.scan over its blocks, all
  # against the keys up to the band's end (so one compiled body per band: compile time and
  # code size stay bounded while at most one band's worth of future keys is computed).
  per_band = -(-n_blocks // max(1, bands))
  outs = []
  for b0 in range(0, n_blocks, per_band):
    b1 = min(n_blocks, b0 + per_band)
    cols = b1 * block               # keys [0, cols): later keys are in every row's future
    k_band, v_band = kt[:, :, :cols], vt[:, :, :cols]
    seg_cols = None if seg_k is None else seg_k[:, :cols]

    def step(carry, n, cols=cols, k_band=k_band, v_band=v_band, seg_cols=seg_cols):
      start = n * block             # first output row; padded-q rows [start, start + rows)
      rows = block + halo
      rng = None if dropout_rate <= 0.0 else jax.random.fold_in(dropout_rng, n)
      out = block_fn(
          dyn(qt, start, rows, 2), k_band, v_band, dyn(seg_q, start, rows, 1), seg_cols,
          # Row masks of the conv OUTPUT rows (padded index = absolute + halo).
          dyn(rm_pre_all, start + halo_pre, rows - halo_pre, 2),
          dyn(rm_post_all, start + halo, block, 2),
          kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, rng,
          row0=start - halo)
      return carry, out

    _, out = jax.lax.scan(step, None, jnp.arange(b0, b1))  # [n, B, H, block, D]
    outs.append(jnp.moveaxis(out, 0, 2).reshape(batch, heads, (b1 - b0) * block, -1))
  out = jnp.concatenate(outs, axis=2)[:, :, :length]
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def make_chunked(block: int = DEFAULT_BLOCK, conv: str = "shift", bands: int = DEFAULT_BANDS):
  """An exact MTA implementation with query blocks of `block` rows and conv "shift" | "xla"."""
  if conv not in _CONVS:
    raise ValueError(f"conv must be one of {tuple(_CONVS)}; got {conv!r}.")
  if block < 1:
    raise ValueError(f"block must be >= 1; got {block}.")
  return functools.partial(_mta_chunked, block=block, conv=conv, bands=bands)

