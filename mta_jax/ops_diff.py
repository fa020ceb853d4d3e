"""Differential attention (DIFF Transformer, Ye et al., arXiv:2410.05258), functional.

One DIFF head h has two query/key halves (q1, k1), (q2, k2) of width d and one value of width
2d. Its attention map is the difference of two softmax maps:

    A_h = softmax(q1 k1^T / sqrt(d)) - lambda * softmax(q2 k2^T / sqrt(d))      (causal)
    o_h = A_h v_h                                                              [T, 2d]

with one scalar lambda per layer (`diff_lambda`). The per-head RMSNorm scaled by
(1 - lambda_init) that follows is the attention module's group norm with depth scaling.

Layout (the DIFF paper's released code): q and k are [batch, length, 2 * heads, d] with the two
halves of head h at indices 2h and 2h + 1; v is [batch, length, heads, 2d].

Implementations:
  "xla"      the reference: materialises the [B, H, T, T] differential map in float32 (also the
             path with attention dropout, which acts on that map).
  otherwise  "fused": both softmax maps through `jax.nn.dot_product_attention`, the baseline's
             fast path. Attention is linear in v, so each map is applied to the two d-wide
             halves of v as four ordinary heads of width d, and the results are subtracted.
             Exact (same maths), never materialises a T x T map where the backend fuses.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mta_jax import ops

Array = jax.Array


def lambda_init(layer: int) -> float:
  """lambda_init(l) = 0.8 - 0.6 exp(-0.3 l), l = 0-based layer index (the DIFF paper)."""
  return 0.8 - 0.6 * math.exp(-0.3 * layer)


def diff_lambda(lq1: Array, lk1: Array, lq2: Array, lk2: Array, layer: int) -> Array:
  """The reparameterised scalar exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init(layer), float32."""
  f32 = lambda x: x.astype(jnp.float32)
  return (jnp.exp(jnp.sum(f32(lq1) * f32(lk1))) - jnp.exp(jnp.sum(f32(lq2) * f32(lk2)))
          + lambda_init(layer))


def _check(q: Array, k: Array, v: Array) -> None:
  if q.ndim != 4 or q.shape != k.shape:
    raise ValueError(f"q and k must both be [batch, length, 2 * heads, d]; got {q.shape} and "
                     f"{k.shape}.")
  b, t, h2, d = q.shape
  if h2 % 2 or v.shape != (b, t, h2 // 2, 2 * d):
    raise ValueError(f"v must be [batch, length, heads, 2d] = {(b, t, h2 // 2, 2 * d)} for q "
                     f"{q.shape} (two query/key halves per head); got {v.shape}.")


def differential_weights(q: Array, k: Array, lam: Array, *,
                         segment_ids: Array | None = None) -> Array:
  """The differential attention map [B, H, T, T] in float32 (the reference path)."""
  b, t, h2, d = q.shape
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
  s = jnp.where(ops.attention_mask(t, segment_ids), s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).reshape(b, h2 // 2, 2, t, t)
  return p[:, :, 0] - lam * p[:, :, 1]


def _fused(q: Array, k: Array, v: Array, lam: Array, segment_ids: Array | None) -> Array:
  heads, d = v.shape[2], q.shape[3]
  q1, q2 = q[:, :, 0::2], q[:, :, 1::2]
  k1, k2 = k[:, :, 0::2], k[:, :, 1::2]
  va, vb = v[..., :d], v[..., d:]
  out = ops.dot_product_attention(
      jnp.concatenate([q1, q1, q2, q2], axis=2), jnp.concatenate([k1, k1, k2, k2], axis=2),
      jnp.concatenate([va, vb, va, vb], axis=2), segment_ids=segment_ids)
  o1 = jnp.concatenate([out[:, :, :heads], out[:, :, heads:2 * heads]], axis=-1)
  o2 = jnp.concatenate([out[:, :, 2 * heads:3 * heads], out[:, :, 3 * heads:]], axis=-1)
  return (o1.astype(jnp.float32) - lam * o2.astype(jnp.float32)).astype(v.dtype)


def differential_attention(q: Array, k: Array, v: Array, lam: Array, *,
                           segment_ids: Array | None = None, implementation: str = "fused",
                           dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """Causal differential attention: q, k [B, T, 2H, d], v [B, T, H, 2d] -> [B, T, H, 2d]."""
  _check(q, k, v)
  if implementation != "xla" and dropout_rate == 0.0:
    return _fused(q, k, v, lam, segment_ids)
  a = differential_weights(q, k, lam, segment_ids=segment_ids)
  a = ops.attention_dropout(a, dropout_rate, dropout_rng)
  return jnp.einsum("bhqk,bkhd->bqhd", a, v.astype(jnp.float32)).astype(v.dtype)
