"""Functional attention ops: causal softmax attention and Multi-Token Attention (MTA).

Everything here is pure JAX; the Flax modules in `attention.py` only project, rotate and call
`implementations.multi_token_attention`, which dispatches to `mta_xla` below (the reference) or
a faster exact implementation. The semantics are those of Golovneva et al., "Multi-Token
Attention" (arXiv:2504.00927), written out in docs/MTA.md; the numbered equations below are the
paper's.

Shapes use the suffix convention of nanodo: `q_BxTxHxD` is [batch, length, heads, head_dim],
`s_BxHxTxT` are logits [batch, heads, query, key].

One MTA attention, in order (docs/MTA.md Sec. 2):

    S  = q k^T / sqrt(d)                                   scale first
    S  = Mask_0(S)                  (if a pre-softmax op)  invalid logits -> 0
    S  = Conv_pre(S)                (Eq. 5)                depthwise 2-D conv over (query, key)
    S  = HeadMix_pre(S)             (Eq. 7)                mix logits of heads within a group
    A  = Softmax(Mask_-inf(S))      float32
    A  = Conv_post(A)               (Eq. 6)
    A  = Mask_0(A)                  (if a post-softmax op) no renormalisation
    A  = HeadMix_post(A)
    A  = Dropout(A)                 (training only)
    out = A v

Conv tap [h, a, b] reads the logit at query i - (c_q - 1) + a and key j - (c_k - 1) // 2 + b:
causal along queries, centred along keys (a cross-correlation, no kernel flip). With
`segment_ids`, every contiguous run of equal ids behaves as its own sequence: a tap that would
read a row of another document reads zero, exactly as the zero padding of a lone sequence.
(Mask_0 already zeroes every column of another document; rows need the extra mask.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Validation: every public entry point checks its arguments here, with messages that say the fix.
# ---------------------------------------------------------------------------------------------


def _check_qkv(q: Array, k: Array, v: Array) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(
          f"{name} must be [batch, length, heads, head_dim] (rank 4); got shape {x.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k {k.shape} and v {v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(
        f"q {q.shape} and k {k.shape} must agree in batch, heads and head_dim "
        "(for grouped-query attention repeat K/V heads before calling).")
  if q.shape[1] != k.shape[1]:
    raise ValueError(
        f"q length {q.shape[1]} != k length {k.shape[1]}: this op computes full causal "
        "self-attention over one sequence; pass q, k and v of the same length.")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
        f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them first.")


def check_kq_kernel(kernel: Array, heads: int, name: str = "kq_kernel") -> None:
  """Raises ValueError unless `kernel` is a valid [heads, c_q, c_k] key-query kernel."""
  if kernel.ndim != 3:
    raise ValueError(f"{name} must be [heads, c_q, c_k] (rank 3); got shape {kernel.shape}.")
  h, c_q, c_k = kernel.shape
  if h != heads:
    raise ValueError(
        f"{name} has {h} head kernels but the attention has {heads} heads; "
        "the convolution is depthwise: one [c_q, c_k] kernel per head.")
  if c_q < 1 or c_k < 1:
    raise ValueError(f"{name} kernel size must be positive; got c_q={c_q}, c_k={c_k}.")
  if c_k % 2 == 0:
    raise ValueError(
        f"{name} has even key width c_k={c_k}; the key axis is centred, so c_k must be odd "
        f"(e.g. {c_k - 1} or {c_k + 1}).")


def check_head_mix(w: Array, heads: int, name: str = "head_mix") -> None:
  """Raises ValueError unless `w` is a valid [groups, c_h, c_h] head-mixing weight."""
  if w.ndim != 3 or w.shape[1] != w.shape[2]:
    raise ValueError(f"{name} must be [groups, c_h, c_h]; got shape {w.shape}.")
  groups, c_h, _ = w.shape
  if heads % c_h != 0:
    raise ValueError(
        f"{name} group size c_h={c_h} does not divide the {heads} heads; "
        "choose c_h among the divisors of the head count.")
  if groups * c_h != heads:
    raise ValueError(
        f"{name} has {groups} groups of {c_h} heads = {groups * c_h}, but there are {heads} "
        f"heads; use {heads // c_h} groups.")


def _check_segment_ids(segment_ids: Array, batch: int, length: int) -> None:
  if segment_ids.shape != (batch, length):
    raise ValueError(
        f"segment_ids must be [batch, length] = {(batch, length)}; got {segment_ids.shape}.")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integers; got dtype {segment_ids.dtype}.")


def check_mta_args(q, k, v, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                   segment_ids) -> None:
  """The shape / dtype checks every MTA entry point runs before tracing."""
  _check_qkv(q, k, v)
  batch, length, heads, _ = q.shape
  for name, kern in (("kq_kernel_pre", kq_kernel_pre), ("kq_kernel_post", kq_kernel_post)):
    if kern is not None:
      check_kq_kernel(kern, heads, name)
  for name, w in (("head_mix_pre", head_mix_pre), ("head_mix_post", head_mix_post)):
    if w is not None:
      check_head_mix(w, heads, name)
  if segment_ids is not None:
    _check_segment_ids(segment_ids, batch, length)


# ---------------------------------------------------------------------------------------------
# Building blocks (shared by every implementation).
# ---------------------------------------------------------------------------------------------


def attention_mask(length: int, segment_ids: Array | None) -> Array:
  """Boolean [B or 1, 1, T, T] mask: True where query i may attend key j (causal, same doc)."""
  idx = jnp.arange(length)
  mask = (idx[None, :] <= idx[:, None])[None, None]
  if segment_ids is not None:
    same_doc = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = mask & same_doc
  return mask


def row_masks(segment_ids: Array | None, c_q: int) -> Array | None:
  """[B, c_q, T] floats: m[b, s, i] = 1 iff row i - s exists and lies in row i's document.

  Tap row a of a kernel reads query row i - s with s = c_q - 1 - a. Returns None when there
  are no segments (then only the zero padding at the top of the sequence matters, which the
  convolution's own padding supplies).
  """
  if segment_ids is None or c_q == 1:
    return None
  length = segment_ids.shape[1]
  # Row i - s of the segment ids, with a sentinel above the first row (never equal to an id).
  sentinel = jnp.min(segment_ids) - 1
  shifted = [jnp.pad(segment_ids, ((0, 0), (s, 0)), constant_values=sentinel)[:, :length]
             for s in range(c_q)]
  return jnp.stack([(p == segment_ids).astype(jnp.float32) for p in shifted], axis=1)


def kq_conv_reference(x_BxHxTxT: Array, kernel_HxQxK: Array,
                      segment_ids: Array | None = None) -> Array:
  """Depthwise key-query convolution with `jax.lax.conv_general_dilated` (the definition).

  Without segments this is one 2-D depthwise cross-correlation, padded causally along queries
  and symmetrically along keys. With segments, each kernel row a is applied as a 1-D conv along
  keys to query row i - s (s = c_q - 1 - a), and the term is kept only where that row belongs
  to row i's document.
  """
  _, heads, _, _ = x_BxHxTxT.shape
  _, c_q, c_k = kernel_HxQxK.shape
  half = (c_k - 1) // 2
  rhs = kernel_HxQxK.astype(x_BxHxTxT.dtype)[:, None]  # [O=H, I/groups=1, c_q, c_k]
  conv = functools.partial(
      jax.lax.conv_general_dilated,
      window_strides=(1, 1),
      dimension_numbers=("NCHW", "OIHW", "NCHW"),
      feature_group_count=heads,
      precision=jax.lax.Precision.HIGHEST,
  )
  if segment_ids is None or c_q == 1:
    return conv(x_BxHxTxT, rhs, padding=((c_q - 1, 0), (half, half)))
  masks_BxQxT = row_masks(segment_ids, c_q)
  out = jnp.zeros_like(x_BxHxTxT)
  for a in range(c_q):
    s = c_q - 1 - a
    term = conv(x_BxHxTxT, rhs[:, :, a:a + 1, :], padding=((s, 0), (half, half)))
    term = term[:, :, :x_BxHxTxT.shape[2], :]  # rows i read row i - s
    out = out + term * masks_BxQxT[:, None, s, :, None]
  return out


def head_mix(x_BxHxTxT: Array, w_GxCxC: Array) -> Array:
  """Eq. 7: new head (g, o) = sum_i W[g, o, i] * old head (g, i), at every (query, key)."""
  b, h, tq, tk = x_BxHxTxT.shape
  groups, c_h, _ = w_GxCxC.shape
  x = x_BxHxTxT.reshape(b, groups, c_h, tq, tk)
  y = jnp.einsum("goi,bgiqk->bgoqk", w_GxCxC.astype(x.dtype), x,
                 precision=jax.lax.Precision.HIGHEST)
  return y.reshape(b, h, tq, tk)


def attention_dropout(p_BxHxTxT: Array, rate: float, rng: Array | None) -> Array:
  if rate <= 0.0:
    return p_BxHxTxT
  if rng is None:
    raise ValueError("attention dropout_rate > 0 needs a dropout_rng (or set dropout_rate=0 "
                     "for evaluation).")
  keep = jax.random.bernoulli(rng, 1.0 - rate, p_BxHxTxT.shape)
  return jnp.where(keep, p_BxHxTxT / (1.0 - rate), 0.0)


# ---------------------------------------------------------------------------------------------
# The reference implementation ("xla").
# ---------------------------------------------------------------------------------------------


def _weights_xla(q, k, *, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
                 segment_ids):
  """The attention weights A [B, H, T, T] (float32), following docs/MTA.md Sec. 2 line by line."""
  _, length, _, head_dim = q.shape
  f32 = jnp.float32
  mask = attention_mask(length, segment_ids)

  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32,
                 precision=jax.lax.Precision.HIGHEST)
  s = s / math.sqrt(head_dim)

  if kq_kernel_pre is not None or head_mix_pre is not None:
    s = jnp.where(mask, s, 0.0)  # Mask_0
  if kq_kernel_pre is not None:
    s = kq_conv_reference(s, kq_kernel_pre.astype(f32), segment_ids)  # Eq. 5
  if head_mix_pre is not None:
    s = head_mix(s, head_mix_pre.astype(f32))  # Eq. 7 on logits
  s = jnp.where(mask, s, -jnp.inf)  # Mask_-inf
  p = jax.nn.softmax(s, axis=-1)

  if kq_kernel_post is not None:
    p = kq_conv_reference(p, kq_kernel_post.astype(f32), segment_ids)  # Eq. 6
  if kq_kernel_post is not None or head_mix_post is not None:
    p = jnp.where(mask, p, 0.0)  # Mask_0
  if head_mix_post is not None:
    p = head_mix(p, head_mix_post.astype(f32))  # Eq. 7 on probabilities
  return p


def mta_xla(q, k, v, *, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post,
            segment_ids, dropout_rate, dropout_rng):
  """Materialises the [B, H, T, T] weights with `_weights_xla`, then drops out and applies A v."""
  p = _weights_xla(q, k, kq_kernel_pre=kq_kernel_pre, kq_kernel_post=kq_kernel_post,
                   head_mix_pre=head_mix_pre, head_mix_post=head_mix_post,
                   segment_ids=segment_ids)
  p = attention_dropout(p, dropout_rate, dropout_rng)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(q.dtype)


def attention_weights(q: Array, k: Array, *, kq_kernel_pre: Array | None = None,
                      kq_kernel_post: Array | None = None, head_mix_pre: Array | None = None,
                      head_mix_post: Array | None = None,
                      segment_ids: Array | None = None) -> Array:
  """The MTA attention weights A [batch, heads, query, key] in float32 (for analysis and plots).

  Same arguments and semantics as `implementations.multi_token_attention` (without v and
  dropout); rows need not sum to 1 when a post-softmax op is present.
  """
  check_mta_args(q, k, k, kq_kernel_pre, kq_kernel_post, head_mix_pre, head_mix_post, segment_ids)
  return jax.jit(_weights_xla)(q, k, kq_kernel_pre=kq_kernel_pre, kq_kernel_post=kq_kernel_post,
                               head_mix_pre=head_mix_pre, head_mix_post=head_mix_post,
                               segment_ids=segment_ids)


def dot_product_attention(q: Array, k: Array, v: Array, *,
                          segment_ids: Array | None = None) -> Array:
  """Causal softmax attention via `jax.nn.dot_product_attention` (the baseline's fast path)."""
  _check_qkv(q, k, v)
  kwargs = {}
  if segment_ids is not None:
    _check_segment_ids(segment_ids, q.shape[0], q.shape[1])
    kwargs["mask"] = attention_mask(q.shape[1], segment_ids)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, **kwargs)


def identity_kq_kernel(heads: int, c_q: int, c_k: int, dtype=jnp.float32) -> Array:
  """[heads, c_q, c_k] kernel that leaves the logits unchanged (a 1 at [h, c_q-1, c_k//2])."""
  kernel = jnp.zeros((heads, c_q, c_k), dtype)
  return kernel.at[:, c_q - 1, c_k // 2].set(1)


def identity_head_mix(heads: int, c_h: int, dtype=jnp.float32) -> Array:
  """[heads // c_h, c_h, c_h] stack of identity matrices."""
  return jnp.broadcast_to(jnp.eye(c_h, dtype=dtype), (heads // c_h, c_h, c_h))
