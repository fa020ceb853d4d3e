"""A fused Pallas (TPU Mosaic) forward kernel for exact Multi-Token Attention.

`multi_token_attention(..., implementation="pallas")` computes exactly what the "xla"
reference in `ops.py` computes (every feature: pre / post key-query convs of any size, pre /
post head mixing of any group size, segments, the causal mask), without writing a [T, T]
tensor to memory. The kernel lives in `mta_jax/pallas_kernel.py`; this module plans the
tiling, builds the halo windows and wires up the gradient.

Forward (fused, one or two Pallas calls):
  * A program owns one batch row, one head group (all heads of a head-mixing group, so the
    mixing is local), one block of `block_q` query rows and one block of `block_k` keys; keys
    are the innermost (sequential) grid axis. Key blocks entirely in the future of the query
    block are skipped (and not even copied in).
  * Halos: the pre-softmax conv reads c_q - 1 logit rows above the block and c_k // 2 columns
    either side, the post-softmax conv the same again on the weights. The kernel reads
    overlapping query / key windows (block + halo rows or columns), gathered by XLA before the
    call: an O(T x head_dim) copy, negligible next to the O(T^2) work inside.
  * Without post-softmax ops: one pass with an online softmax (flash attention).
    With them: pass 1 stores the log-sum-exp of every row (the post conv's halo rows too);
    pass 2 recomputes the logits, forms the exact normalised weights on the halo, applies the
    post conv / mask / mixing and accumulates A v.

Backward (`mta_jax/pallas_backward.py`), for every op, flash-attention style: the forward
returns the log-sum-exp of every row, the backward recomputes the weights on a halo. With
post-softmax ops a first kernel computes D = rowsum(P * dP) (the softmax backward's row term,
which no longer equals rowsum(dout * out)) and the post weights' gradients; then one kernel
computes dq (with the pre weights' gradients) and one dk / dv. Weight gradients come out as
per-program partial sums, reduced here. No [T, T] buffer. tests/test_ops_pallas.py holds the
whole gradient to the reference.

Platforms: on TPU the kernel is compiled by Mosaic; on every other backend (CPU, GPU) the same
kernel runs in Pallas interpret mode (exact but slow: meant for tests). The choice is made at
lowering time (`jax.lax.platform_dependent`), so ahead-of-time compiles for a TPU topology
from a CPU host get the Mosaic kernel.

Attention dropout is not implemented in the kernel: dropout_rate > 0 raises (use "chunked").

VMEM (TPU): a program holds every head of a mixing group, but loops over them (one head's
[rows, columns] tiles live at a time); head mixing reads the group's tiles from VMEM scratch.
The paper's 880M layer (16 heads mixed, 6 x 11 convs, 128 x 128 tiles) compiles for v5e.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from mta_jax import pallas_backward as pb
from mta_jax import pallas_kernel as pk

Array = jax.Array

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128


@dataclasses.dataclass(frozen=True)
class Plan(pk.TileGrid):
  """The forward's tiling: query / key windows with both convs' halos."""

  @property
  def q_rows(self) -> int:
    """Rows of a query window: the block plus both convs' row halos."""
    return self.block_q + self.halo_rows_pre + self.halo_rows_post

  @property
  def k_cols_nominal(self) -> int:
    return self.block_k + 2 * (self.halo_cols_pre + self.halo_cols_post)

  @property
  def k_cols(self) -> int:
    """Columns of a key window (padded to the lane alignment; extra columns are never read)."""
    return self.align(self.k_cols_nominal)


def make_plan(q: Array, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
              segment_ids, *, block_q: int, block_k: int, lane_align: int) -> Plan:
  batch, length, heads, head_dim = q.shape
  c_h_pre = None if head_mix_pre is None else head_mix_pre.shape[1]
  c_h_post = None if head_mix_post is None else head_mix_post.shape[1]
  hp = math.lcm(c_h_pre or 1, c_h_post or 1)  # divides heads: both group sizes do
  round8 = lambda n: -(-n // 8) * 8
  return Plan(
      batch=batch, length=length, heads=heads, head_dim=head_dim, heads_per_program=hp,
      block_q=min(block_q, round8(length)), block_k=min(block_k, round8(length)),
      c_pre=None if kq_kernel_pre is None else tuple(kq_kernel_pre.shape[1:]),
      c_post=None if kq_kernel_post is None else tuple(kq_kernel_post.shape[1:]),
      c_h_pre=c_h_pre, c_h_post=c_h_post, segments=segment_ids is not None,
      lane_align=lane_align)


def kernel_flops(q, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, *,
                 backward: bool = True, block_q: int = DEFAULT_BLOCK_Q,
                 block_k: int = DEFAULT_BLOCK_K) -> int:
  """FLOPs of the kernels of one call (forward, and with `backward` the gradient's kernels),
  as their cost estimates tell XLA: every recomputation counted, future key blocks skipped.
  Arguments may be jax.ShapeDtypeStruct."""
  plan = make_plan(q, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, None,
                   block_q=block_q, block_k=block_k, lane_align=1)
  kinds = ["lse", "output"] if plan.has_post else ["output"]
  macs = sum(pk.tile_work(plan, kind)[0] for kind in kinds)
  if backward:
    bp = pb.BwdPlan(**dataclasses.asdict(plan))
    macs += bp.tile_work("dq")[0] + bp.tile_work("dkv")[0]
    if plan.has_post:
      macs += dataclasses.replace(bp, x_halo=False).tile_work("dpost")[0]
  return 2 * macs * plan.executed_tiles * plan.batch * plan.heads


# ---------------------------------------------------------------------------------------------
# Halo windows (XLA, outside the kernel; O(T x head_dim)).
# ---------------------------------------------------------------------------------------------


def _windows(x_BxHxTxD: Array, n: int, block: int, width: int, front: int) -> Array:
  """[B, H, n, width, D]: window m holds rows [m * block - front, m * block - front + width).

  Rows outside [0, T) read zero (they are masked inside the kernel anyway).
  """
  length = x_BxHxTxD.shape[2]
  back = max(0, (n - 1) * block - front + width - length)
  xp = jnp.pad(x_BxHxTxD, ((0, 0), (0, 0), (front, back), (0, 0)))
  idx = jnp.arange(n)[:, None] * block + jnp.arange(width)[None, :]
  return jnp.take(xp, idx, axis=2)


def _seg_windows(seg_BxT: Array, n: int, block: int, width: int, front: int) -> Array:
  """[B, n, width] segment-id windows (same rows as `_windows`; edge-padded)."""
  length = seg_BxT.shape[1]
  back = max(0, (n - 1) * block - front + width - length)
  sp = jnp.pad(seg_BxT, ((0, 0), (front, back)), mode="edge")
  idx = jnp.arange(n)[:, None] * block + jnp.arange(width)[None, :]
  return jnp.take(sp, idx, axis=1)


def _seg_pair(plan: pk.TileGrid, segment_ids, rows, cols):
  """() without segments, else the (query-row, key-column) segment-id windows of
  rows = (width, front) / cols = (width, front), in the layouts the TPU likes: query ids along
  sublanes (lane-broadcast) [B, n_q, width, LANES], key ids along lanes [B, n_k, 8, width]."""
  if not plan.segments:
    return ()
  sq = _seg_windows(segment_ids, plan.n_q, plan.block_q, *rows)
  sk = _seg_windows(segment_ids, plan.n_k, plan.block_k, *cols)
  return (jnp.broadcast_to(sq[..., None], (*sq.shape, pk.LANES)).astype(jnp.int32),
          jnp.broadcast_to(sk[:, :, None, :], (sk.shape[0], sk.shape[1], pk.SUBLANES,
                                                sk.shape[2])).astype(jnp.int32))


def _prepare(plan: Plan, q, k, v, segment_ids):
  to_bhtd = lambda x: jnp.swapaxes(x, 1, 2)
  row_front = plan.halo_rows_pre + plan.halo_rows_post
  col_front = plan.halo_cols_pre + plan.halo_cols_post
  qw = _windows(to_bhtd(q), plan.n_q, plan.block_q, plan.q_rows, row_front)
  kw = _windows(to_bhtd(k), plan.n_k, plan.block_k, plan.k_cols, col_front)
  padded = plan.n_k * plan.block_k
  vb = jnp.pad(to_bhtd(v), ((0, 0), (0, 0), (0, padded - plan.length), (0, 0)))
  segs = _seg_pair(plan, segment_ids, (plan.q_rows, row_front), (plan.k_cols, col_front))
  return qw, kw, vb, segs


def _flat_weights(kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post):
  return tuple(w.astype(jnp.float32).reshape(-1)
               for w in (kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post)
               if w is not None)


def pallas_forward(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                   segment_ids, *, block_q: int, block_k: int, interpret: bool,
                   out_dtype=None):
  """The fused forward -> (out [B, T, H, D] in out_dtype (default q's), lse [B, H, T] float32:
  the log-sum-exp of every row's logits, from pass 1 or the online pass)."""
  plan = make_plan(q, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, segment_ids,
                   block_q=block_q, block_k=block_k, lane_align=1 if interpret else pk.LANES)
  qw, kw, vb, segs = _prepare(plan, q, k, v, segment_ids)
  weights = _flat_weights(kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post)
  lse = None
  if plan.has_post:
    lse = pk.lse_call(plan, qw, kw, segs, weights, interpret=interpret)
  out, lse_online = pk.output_call(plan, qw, kw, vb, segs, weights, lse,
                                   out_dtype=out_dtype or q.dtype,
                                   interpret=interpret)  # [B, H, n_q * block_q, D]
  # Pass 1's rows [r0 - halo_rows_post, r0 + block_q) of block i -> the block's own rows.
  lse_rows = lse_online if lse is None else lse[:, :, :, plan.halo_rows_post:]
  b, h = lse_rows.shape[:2]
  lse_rows = lse_rows[..., 0].reshape(b, h, -1)[:, :, :plan.length]
  return jnp.swapaxes(out[:, :, :plan.length], 1, 2), lse_rows


def _on_platform(fn, *args, **kwargs):
  """fn(*args, interpret=...): Mosaic on TPU, the interpreter elsewhere; decided when lowering
  (so ahead-of-time compiles for a TPU topology from a CPU host get the Mosaic kernels)."""
  f = functools.partial(fn, **kwargs)
  return jax.lax.platform_dependent(*args, tpu=functools.partial(f, interpret=False),
                                    default=functools.partial(f, interpret=True))


# ---------------------------------------------------------------------------------------------
# Gradient: the Pallas backward kernels (`pallas_backward`).
# ---------------------------------------------------------------------------------------------


def _bwd_windows(bp: pb.BwdPlan, q, k, v, dout, lse, di):
  """The windows the backward kernels read, in pb.WINDOW_NAMES order (di may be None)."""
  lanes = lambda x_BxHxT: jnp.broadcast_to(x_BxHxT[..., None], (*x_BxHxT.shape, pk.LANES))
  arrays = {"q": q, "k": k, "v": v, "do": dout}
  arrays = {n: jnp.swapaxes(x, 1, 2) for n, x in arrays.items()}
  arrays["lse"] = lanes(lse)
  if di is not None:
    arrays["di"] = lanes(di)
  out = []
  for name, (extent, front, is_rows) in pb.window_shapes(bp).items():
    if name in arrays:
      n, block = (bp.n_q, bp.block_q) if is_rows else (bp.n_k, bp.block_k)
      out.append(_windows(arrays[name], n, block, extent, front))
  return tuple(out)


def _bwd_segs(bp: pb.BwdPlan, segment_ids):
  return _seg_pair(bp, segment_ids, (bp.seg_rows, bp.q_front), (bp.k_cols, bp.k_front))


def _reduce_partials(x, like):
  """Per-program partial sums [B, H, n_q, rows, LANES] -> the gradient of `like`."""
  return x[..., 0].sum(axis=(0, 2)).reshape(like.shape).astype(like.dtype)


def pallas_backward(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                    segment_ids, out, lse, dout, *, block_q: int, block_k: int,
                    interpret: bool):
  """(dq, dk, dv, and the gradients of the four weights (None where absent)) by the
  backward kernels. lse: [B, H, T] float32 from the forward; out: its float32 output."""
  weights_in = (kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post)
  plan = make_plan(q, *weights_in, segment_ids, block_q=block_q, block_k=block_k,
                   lane_align=1 if interpret else pk.LANES)
  bp = pb.BwdPlan(**dataclasses.asdict(plan))
  weights = _flat_weights(*weights_in)
  dout = dout.astype(q.dtype)
  grads = [None] * 4
  if bp.has_post:  # D = rowsum(P * dP) needs its own pass (and gives the post weights' grads)
    bpd = dataclasses.replace(bp, x_halo=False)
    d, dwkp, dwmp = pb.dpost_call(bpd, _bwd_windows(bpd, q, k, v, dout, lse, None),
                                  _bwd_segs(bpd, segment_ids), weights, interpret=interpret)
    di = d[..., 0].reshape(bp.batch, bp.heads, -1)[:, :, :bp.length]
    grads[1] = None if dwkp is None else _reduce_partials(dwkp, kq_kernel_post)
    grads[3] = None if dwmp is None else _reduce_partials(dwmp, head_mix_post)
  else:  # flash attention's identity
    di = jnp.swapaxes(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1),
                      1, 2)
  windows = _bwd_windows(bp, q, k, v, dout, lse, di)
  segs = _bwd_segs(bp, segment_ids)
  dq, dwk, dwm = pb.dq_call(bp, windows, segs, weights, dq_dtype=q.dtype, interpret=interpret)
  dk, dv = pb.dkv_call(bp, windows, segs, weights, dk_dtype=k.dtype, dv_dtype=v.dtype,
                       interpret=interpret)
  grads[0] = None if dwk is None else _reduce_partials(dwk, kq_kernel_pre)
  grads[2] = None if dwm is None else _reduce_partials(dwm, head_mix_pre)
  back = lambda x: jnp.swapaxes(x[:, :, :bp.length], 1, 2)
  return (back(dq), back(dk), back(dv), *grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _mta_pallas_vjp(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                    segment_ids, block_q, block_k):
  out, _ = _on_platform(pallas_forward, q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre,
                        head_mix_post, segment_ids, block_q=block_q, block_k=block_k)
  return out


def _vjp_fwd(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, segment_ids,
             block_q, block_k):
  res = (q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, segment_ids)
  # Without post ops the backward's D = rowsum(dout * out) uses the float32 output: rounding it
  # to bf16 first would double the gradient error of bf16 inputs (the reference differentiates
  # in float32).
  out32, lse = _on_platform(pallas_forward, *res, block_q=block_q, block_k=block_k,
                            out_dtype=jnp.float32)
  return out32.astype(q.dtype), res + (out32, lse)


def _vjp_bwd(block_q, block_k, res, g):
  out, lse = res[8:]
  dq, dk, dv, *d_weights = _on_platform(pallas_backward, *res[:8], out, lse, g,
                                        block_q=block_q, block_k=block_k)
  return dq, dk, dv, *d_weights, None


_mta_pallas_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def _mta_pallas(q, k, v, *, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                segment_ids, dropout_rate, dropout_rng, block_q=DEFAULT_BLOCK_Q,
                block_k=DEFAULT_BLOCK_K):
  del dropout_rng
  if dropout_rate > 0.0:
    raise ValueError("implementation='pallas' has no attention dropout; set the attention "
                     "dropout to 0 or use implementation='chunked'.")
  return _mta_pallas_vjp(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                         segment_ids, block_q, block_k)


def make_pallas(block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
  """The fused-forward implementation with query / key blocks of the given sizes."""
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if b < 8 or b % 8:
      raise ValueError(f"{name} must be a positive multiple of 8; got {b}.")
  return functools.partial(_mta_pallas, block_q=block_q, block_k=block_k)

