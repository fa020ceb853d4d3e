"""Transformer building blocks: parameters with logical axes, RMSNorm, embeddings, SwiGLU, RoPE.

Every parameter carries `logical_axes` metadata (names from `sharding.LOGICAL_RULES`); the
sharding of parameters and optimizer state is derived from it, nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mta_jax.sharding import constrain

Array = jax.Array

# Llama-style initialisation: every projection drawn from N(0, 0.02^2).
INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, init, shape: tuple[int, ...], logical_axes: tuple,
          dtype=jnp.float32) -> nnx.Param:
  """An nnx.Param initialised by `init(key, shape, dtype)` and tagged with its logical axes."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
  key = rngs.params() if rngs is not None else None
  return nnx.Param(init(key, shape, dtype), logical_axes=tuple(logical_axes))


def normal(std: float):
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """RMSNorm over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               logical_axes: tuple = ("norm",)):
    self.eps = eps
    self.scale = param(rngs, ones, (dim,), logical_axes, param_dtype)

  def __call__(self, x: Array) -> Array:
    return rms_norm(x, self.scale[...], self.eps)


class Embed(nnx.Module):
  """Token embedding; `attend` reuses it as the tied output projection."""

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.embedding = param(rngs, normal(INIT_STD), (vocab_size, dim), ("vocab", "embed"),
                           param_dtype)

  def __call__(self, tokens_BxT: Array, dtype) -> Array:
    # The lookup gathers the table's FSDP shards first (as every FSDP weight is gathered before
    # use) and keeps its vocab rows split over 'tensor': XLA then looks up locally, masks and
    # all-reduces. Gathering from the (vocab, embed)-sharded table directly made the SPMD
    # partitioner replicate the whole gather ("involuntary full rematerialization") on meshes
    # with both fsdp and tensor > 1.
    table = constrain(self.embedding[...].astype(dtype), ("vocab", None))
    return constrain(jnp.take(table, tokens_BxT, axis=0),
                     ("act_batch", "act_length", "act_embed"))

  def attend(self, x_BxTxD: Array) -> Array:
    """Logits [B, T, V] in float32 (the loss and softmax want full precision)."""
    return jnp.einsum("btd,vd->btv", x_BxTxD, self.embedding[...].astype(x_BxTxD.dtype),
                      preferred_element_type=jnp.float32)


class SwiGLU(nnx.Module):
  """FFN(x) = W2 (silu(W1 x) * W3 x)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.w1 = param(rngs, normal(INIT_STD), (dim, hidden), ("embed", "mlp"), param_dtype)
    self.w3 = param(rngs, normal(INIT_STD), (dim, hidden), ("embed", "mlp"), param_dtype)
    self.w2 = param(rngs, normal(INIT_STD), (hidden, dim), ("mlp", "embed"), param_dtype)

  def __call__(self, x_BxTxD: Array) -> Array:
    dt = x_BxTxD.dtype
    gate = jnp.einsum("btd,df->btf", x_BxTxD, self.w1[...].astype(dt))
    up = jnp.einsum("btd,df->btf", x_BxTxD, self.w3[...].astype(dt))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.w2[...].astype(dt))


def apply_rope(x_BxTxHxD: Array, positions_BxT: Array, theta: float) -> Array:
  """Rotary embedding on interleaved pairs (x[2i], x[2i+1]), as Llama's reference code.

  Positions are per token, so packed documents each restart at position 0.
  """
  head_dim = x_BxTxHxD.shape[-1]
  freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions_BxT.astype(jnp.float32)[..., None] * freqs  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BxTxHxD.astype(jnp.float32)
  x_even, x_odd = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
  return out.reshape(x.shape).astype(x_BxTxHxD.dtype)
